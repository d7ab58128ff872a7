"""SDAR: the reference model against transformers' Qwen3 layer, its block-causal attention,
the tiny checkpoints against JetLM/SDAR-8B-Chat's real files (tests/data/sdar-8b-chat), the
block-diffusion training pass, and the real config built by vLLM with dummy weights."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from benchmarks.train import (Encoder, block_diffusion_mask, block_threshold_states, head_scales,
                              sdar_from_llada,
                             weight_end_block, weight_stops)
from dllm_reference import tasks, tiny_sdar
from dllm_reference.modeling import ReferenceDecoder, ReferenceLLaDA
from dllm_reference.sdar import ReferenceSDAR
from dllm_reference.tiny_llada import build_vocab
from tests.helpers import dummy_model_parameters

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "sdar-8b-chat"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory) -> Path:
    return tiny_sdar.write_random_model(tmp_path_factory.mktemp("sdar"), seed=3,
                                        tie_word_embeddings=request.param)


def test_reference_is_qwen3_under_a_causal_mask(tiny):
    """Blocks of one position are causal attention: then SDAR is transformers' Qwen3
    (q/k norms, GQA, RoPE in the activation dtype, tied or not) on the same weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = json.loads((tiny / "config.json").read_text())
    fields = {k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings")}
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**fields, rope_parameters={
        "rope_type": "default", "rope_theta": config["rope_theta"]})).eval()
    state = load_file(str(tiny / "model.safetensors"))
    missing, unexpected = qwen3.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    tokens = torch.randint(0, config["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(0))
    model = ReferenceSDAR.from_pretrained(tiny)
    with torch.no_grad():
        want = qwen3(tokens).logits
        got = model(tokens, block_length=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_q_and_k_norms_are_applied(tiny):
    model = ReferenceSDAR.from_pretrained(tiny)
    tokens = torch.arange(3, 19)
    with torch.no_grad():
        before = model(tokens, block_length=4)
        model.weights["model__layers__0__self_attn__k_norm__weight"].mul_(2)
        after = model(tokens, block_length=4)
    assert not torch.allclose(before, after, atol=1e-3)


def test_a_block_sees_itself_and_the_blocks_before_it(tiny):
    model = ReferenceSDAR.from_pretrained(tiny)
    block = json.loads((tiny / "config.json").read_text())["block_size"]
    tokens = torch.arange(5, 5 + 4 * block)
    later = tokens.clone()
    later[2 * block:] = 7  # blocks 2 and 3 changed
    same_block = tokens.clone()
    same_block[2 * block - 1] = 7  # the last position of block 1
    with torch.no_grad():
        base, with_later, with_same = (model(x, block_length=block)
                                       for x in (tokens, later, same_block))
    assert torch.equal(base[: 2 * block], with_later[: 2 * block])
    assert not torch.allclose(base[block: 2 * block - 1], with_same[block: 2 * block - 1])
    assert torch.equal(base[:block], with_same[:block])


def test_tiny_checkpoint_has_the_real_fields_and_weight_names(tmp_path):
    out = tiny_sdar.write_random_model(tmp_path, num_hidden_layers=2)
    config = json.loads((out / "config.json").read_text())
    real = json.loads((REAL / "config.json").read_text())
    assert config.keys() == real.keys()
    assert (config["model_type"], config["architectures"]) == ("sdar", ["SDARForCausalLM"])
    index = json.loads((REAL / "model.safetensors.index.json").read_text())["weight_map"]
    real_names = {n for n in index
                  if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2}
    assert set(load_file(str(out / "model.safetensors"))) == real_names
    # The mask is `<|MASK|>`, a special token, as SDAR's tokenizer_config.json names it.
    assert json.loads((REAL / "tokenizer_config.json").read_text())["mask_token"] == "<|MASK|>"
    assert json.loads((out / "tokenizer_config.json").read_text())["mask_token"] == "<|MASK|>"
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("1<|MASK|>2").ids == [tokenizer.token_to_id("1"),
                                                   config["mask_token_id"],
                                                   tokenizer.token_to_id("2")]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.token_to_id("<|eot_id|>"),
                                          config["eos_token_id"]]


def test_llada_weights_convert_to_sdar_names_and_keep_attention_sharp():
    config, state = ReferenceDecoder.load(ROOT / "examples" / "llada-long", torch.float32)
    tokens, attention_mask, _, _ = Encoder(build_vocab(), 128).batch(
        tasks.heldout(8, families=tasks.LONG))
    scales = head_scales(config, state, tokens, attention_mask)
    sdar, converted = sdar_from_llada(config, state, 8, scales)
    assert sdar["block_size"] == 8 and sdar["vocab_size"] == config["embedding_size"]
    fresh = tiny_sdar.random_state_dict(sdar, 0)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in fresh.items()}
    assert torch.equal(converted["model.layers.3.mlp.down_proj.weight"],
                       state["model.transformer.blocks.3.ff_out.weight"])
    mask = sdar["mask_token_id"]
    assert torch.equal(converted["model.embed_tokens.weight"][mask],
                       state["model.transformer.wte.weight"][config["mask_token_id"]])
    # The gains are LLaDA's head RMS, so the converted layer is closer to LLaDA than with
    # gains of one (bidirectional forwards on the same batch).
    ones = dict(converted)
    for name in ones:
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            ones[name] = torch.ones_like(ones[name])
    with torch.no_grad():
        want = ReferenceLLaDA(config, state)(tokens, attention_mask)
        real = attention_mask.bool()
        gaps = [(ReferenceSDAR(sdar, weights)(tokens, attention_mask) - want)[real].abs().mean()
                for weights in (converted, ones)]
    assert gaps[0] < 0.75 * gaps[1]


def test_block_diffusion_pass_is_each_block_given_the_clean_ones_before(tiny):
    """The 2L training pass: a noisy block's logits are those of a block-causal forward of
    the clean blocks before it followed by that noisy block."""
    model = ReferenceSDAR.from_pretrained(tiny)
    block = 4
    tokens, attention_mask, starts, _ = Encoder(tiny_sdar.build_sdar_vocab(), 32).batch(
        tasks.heldout(2, families=tasks.SHORT))
    length = tokens.shape[1]
    masked = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    masked &= torch.arange(length)[None] >= starts[:, None]
    noisy = torch.where(masked, model.config["mask_token_id"], tokens)
    keys = torch.cat([attention_mask, attention_mask], 1).bool()[:, None, None, :]
    with torch.no_grad():
        both = model.forward_masked(torch.cat([noisy, tokens], 1), torch.arange(length).repeat(2),
                                    block_diffusion_mask(length, block) & keys)
        for row in range(len(tokens)):
            n = int(attention_mask[row].sum())
            for start in range(0, n, block):
                end = min(start + block, n)
                alone = model(torch.cat([tokens[row, :start], noisy[row, start:end]]),
                              block_length=block)
                torch.testing.assert_close(both[row, start:end], alone[start:end],
                                           rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(both[row, length: length + n],
                                       model(tokens[row, :n], block_length=block),
                                       rtol=1e-4, atol=1e-4)


def test_end_weight_multiplies_the_block_holding_the_answers_end():
    """Rows with responses from 5 and 9, answers of 6 and 8 tokens (`<|eot_id|>` at 10 and
    16), blocks of 4: blocks 2 ([8, 12)) and 4 ([16, 20)) weigh 3x, nothing else."""
    weight = torch.full((2, 24), 0.5)
    got = weight_end_block(weight, torch.tensor([5, 9]), torch.tensor([6, 8]), 4, 3.0)
    want = weight.clone()
    want[0, 8:12] = want[1, 16:20] = 1.5
    assert got.equal(want)


def test_stop_weight_multiplies_where_the_answer_could_end():
    weight = torch.full((1, 6), 0.5)
    tokens = torch.tensor([[7, 3, 9, 3, 5, 1]])
    got = weight_stops(weight, tokens, torch.tensor([3, 5]), 4.0)
    assert got.tolist() == [[0.5, 2.0, 0.5, 2.0, 2.0, 0.5]]


class _SureAtEvenPositions:
    """Predicts the gold token everywhere, sure of it at even positions only, and
    records the noisy half of each input."""

    def __init__(self, tokens: torch.Tensor, vocab: int):
        self.tokens, self.vocab, self.seen = tokens, vocab, []

    def forward_masked(self, x: torch.Tensor, positions: torch.Tensor,
                       attention: torch.Tensor) -> torch.Tensor:
        self.seen.append(x[:, : self.tokens.shape[1]].clone())
        sure = torch.where(torch.arange(self.tokens.shape[1]) % 2 == 0, 20.0, 0.5)
        logits = torch.nn.functional.one_hot(self.tokens, self.vocab).float() * sure[:, None]
        return torch.cat([logits, logits], dim=1)


def test_threshold_states_give_each_block_what_decoding_would_commit():
    """Response from 3 in blocks of 4, each row's forward count drawn from 0-3: a forward
    gives, in every block, the masks the model is sure of (even positions) and the most
    confident one (ties to the left), unless that would finish the block."""
    tokens = torch.arange(1, 15)[None].repeat(16, 1)
    model = _SureAtEvenPositions(tokens, 100)
    masked = block_threshold_states(model, tokens, torch.ones_like(tokens), torch.full((16,), 3),
                                    11, 99, torch.Generator().manual_seed(0), 4, threshold=0.9)
    states = {
        # No forward: the whole response.
        (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13),
        # One: the sure (even) positions, but not 3, the first block's only response token.
        (3, 5, 7, 9, 11, 13),
        # Two: the top one of each block (5, 9); 13 is its block's last mask. A third
        # forward would finish every block, so it changes nothing.
        (3, 7, 11, 13),
    }
    got = {tuple(row.nonzero()[:, 0].tolist()) for row in masked}
    assert got <= states and len(got) > 1
    # Each forward saw the clean answer wherever a token was given.
    assert all(((x == 99) | (x == tokens)).all() for x in model.seen)


def test_block_length_comes_from_the_config():
    from vllm_dllm.configs.sdar import SDARConfig
    from vllm_dllm.model_executor.registry import BY_ARCHITECTURE

    config = SDARConfig.from_pretrained(str(REAL))
    assert (config.block_size, config.mask_token_id, config.head_dim) == (4, 151669, 128)
    assert BY_ARCHITECTURE["SDARForCausalLM"].block_causal
    assert config.dllm_block_length == 4
    assert SDARConfig(block_size=8).dllm_block_length == 8
    assert SDARConfig(block_size=None).dllm_block_length == 4


@pytest.mark.slow
def test_real_config_builds_with_dummy_weights(tmp_path):
    """SDAR-8B-Chat's config.json builds with load_format=dummy and 1 or 2 layers; those
    layers extrapolate to the checkpoint's parameter count (index total_size, bf16) and
    their parameters are exactly the checkpoint's tensors, fused as vLLM fuses them."""
    shutil.copy(REAL / "config.json", tmp_path / "config.json")
    result = dummy_model_parameters(tmp_path, [1, 2])
    assert result[1]["class"] == "SDARForCausalLM" and result[1]["offset"] == 0
    one, two = (sum(result[n]["params"].values()) for n in (1, 2))
    per_layer, rest = two - one, 2 * one - two
    index = json.loads((REAL / "model.safetensors.index.json").read_text())
    layers = json.loads((REAL / "config.json").read_text())["num_hidden_layers"]
    assert (rest + layers * per_layer) * 2 == index["metadata"]["total_size"]

    fused = {"k_proj": "kv_proj", "v_proj": "kv_proj",
             "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

    def module_name(name: str) -> str:
        for old, new in fused.items():
            name = name.replace(f".{old}.", f".{new}.")
        return name

    kept = [n for n in index["weight_map"]
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2]
    assert {module_name(n) for n in kept} == set(result[2]["params"])
