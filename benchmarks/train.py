"""Trains a small LLaDA on dllm_reference/tasks.py with LLaDA's SFT objective, on the CPU;
or, with `--arch sdar`, a small SDAR with its block-diffusion objective.

    python -m benchmarks.train --out examples/llada-tasks [--steps N] [--seed S] ...
    python -m benchmarks.train --suite long --canvas 128 --out examples/llada-long ...
    python -m benchmarks.train --arch sdar --block-length 32 --suite long \
        --init-from examples/llada-long --out runs/sdar32-a ...  (examples/sdar-long/README.md)

The model is dllm_reference/modeling.py's ReferenceLLaDA with trainable weights, the
tokenizer is dllm_reference/tiny_llada.py's character vocabulary, and the checkpoint is
written in LLaDA's original format (so the plugin and the reference load it alike). A
partial checkpoint is saved every `--save-every` steps; at the end the held-out accuracy
is measured and a README.md recording the run goes into the output folder; `tasks.json`
names the suite, which the evaluators read. The defaults are the recipe of the bundled
examples/llada-tasks.
"""

import argparse
import itertools
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.eval_reference import evaluate, format_report
from dllm_reference import tasks, tiny_sdar
from dllm_reference.modeling import ReferenceDecoder, ReferenceLLaDA
from dllm_reference.sdar import ReferenceSDAR
from dllm_reference.tiny_llada import build_tokenizer, build_vocab, llada_config, write_checkpoint
from vllm_dllm.configs.sdar import DEFAULT_BLOCK_SIZE
from vllm_dllm.params import DEFAULTS
from vllm_dllm.sampling.policies import select_threshold

MASK_EPS = 1e-3  # LLaDA's forward process: t ~ U(0, 1) mapped to p = (1 - eps) t + eps
# Families drawn in this repeating order. Short suite: sorting and uppercasing are learnt
# early and arithmetic next; word problems are learnt last, so they get half of all
# examples. Long suite: counting is mostly copying, running sums need the arithmetic too.
DEFAULT_MIX = {
    "short": "arithmetic,word_problem,sort,word_problem,arithmetic,word_problem,uppercase,word_problem",
    "long": "running_sum,count,running_sum",
}
# Response tokens per example: answer + <|eot_id|> + <|endoftext|> padding.
DEFAULT_CANVAS = {"short": 32, "long": 128}
BLOCK_LENGTH = 32  # the served block length (generation_config.json)


class Encoder:
    """Turns problems into padded token batches with the response on a fixed canvas."""

    def __init__(self, vocab: dict[str, int], canvas: int):
        self.canvas = canvas
        self.tokenizer = build_tokenizer(vocab)
        self.eot = vocab["<|eot_id|>"]
        self.eos = vocab["<|endoftext|>"]

    def example(self, problem: tasks.Problem) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer.encode(tasks.render_chat(problem.prompt)).ids
        answer = self.tokenizer.encode(problem.answer).ids + [self.eot]
        assert len(answer) <= self.canvas, problem
        # LLaDA SFT fills the rest of the response with EOS, and the model learns to emit it.
        return prompt, answer + [self.eos] * (self.canvas - len(answer))

    def batch(self, problems: list[tasks.Problem]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B, L], key-padding mask [B, L], response start [B], answer length with
        its `<|eot_id|>` [B]; rows right-padded."""
        examples = [self.example(p) for p in problems]
        length = max(len(p) + len(r) for p, r in examples)
        tokens = torch.full((len(examples), length), self.eos)
        attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
        for row, (prompt, response) in enumerate(examples):
            seq = prompt + response
            tokens[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        starts = torch.tensor([len(p) for p, _ in examples])
        answered = torch.tensor([r.index(self.eos) if self.eos in r else len(r)
                                 for _, r in examples])
        return tokens, attention_mask, starts, answered


def init_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """The "mitchell" init LLaDA's config names: N(0, 1/fan_in), and each block's output
    projections further shrunk by 1/sqrt(2 (layer + 1)) so deep residuals start small.

    In short trials it trained faster than a flat N(0, 0.02), whose tiny q/k keep
    attention near uniform for long.
    """
    g = torch.Generator().manual_seed(seed)
    d, mlp, vocab = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]

    def normal(rows: int, fan_in: int, shrink: float = 1.0) -> torch.Tensor:
        return torch.randn(rows, fan_in, generator=g) / math.sqrt(fan_in) / shrink

    state = {"model.transformer.wte.weight": normal(vocab, d)}
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shrink = math.sqrt(2 * (i + 1))
        state[p + "attn_norm.weight"] = torch.ones(d)
        state[p + "ff_norm.weight"] = torch.ones(d)
        for name in ("q_proj", "k_proj", "v_proj"):
            state[p + f"{name}.weight"] = normal(d, d)
        state[p + "attn_out.weight"] = normal(d, d, shrink)
        state[p + "ff_proj.weight"] = normal(mlp, d)
        state[p + "up_proj.weight"] = normal(mlp, d)
        state[p + "ff_out.weight"] = normal(d, mlp, shrink)
    state["model.transformer.ln_f.weight"] = torch.ones(d)
    state["model.transformer.ff_out.weight"] = normal(vocab, d)
    return state


def training_masks(starts: torch.Tensor, answered: torch.Tensor, length: int, canvas: int,
                   generator: torch.Generator, ordered_fraction: float = 0.0,
                   block_length: int = BLOCK_LENGTH
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens are masked, which of them are scored, and the scored tokens' weights
    ([B, L] bool, [B, L] bool, [B, L] float) for rows whose response starts at `starts`
    with an answer of `answered` tokens (its `<|eot_id|>` included). The loss divides the
    weighted sum by the canvas.

    LLaDA's SFT masking: per row t ~ U(eps, 1), each response token masked with
    probability t (the prompt never), every masked token scored with weight 1/t (then
    divided by the response length, which is the fixed canvas here).

    With `ordered_fraction` > 0, that fraction of the rows is masked the way left-to-right
    block decoding sees the canvas instead: the answer given up to a random position of it
    (its `<|eot_id|>` included, positions near the end likelier), all masked from there
    on, and the rest of that position's block scored (weight canvas / block length: the
    block's mean). Under independent masking a row almost never has its answer given up to
    a point and nothing after it, yet low-confidence decoding works from such states; a
    model trained without them learns to find the answer's end from the padding it sees,
    and on a canvas masked to the right it does not stop.
    """
    batch = len(starts)
    pos = torch.arange(length)[None]
    response = (pos >= starts[:, None]) & (pos < starts[:, None] + canvas)
    t = (1 - MASK_EPS) * torch.rand(batch, generator=generator) + MASK_EPS
    masked = response & (torch.rand(batch, length, generator=generator) < t[:, None])
    scored, weight = masked, 1.0 / t
    if ordered_fraction > 0:
        ordered = torch.rand(batch, generator=generator) < ordered_fraction
        # Drawn towards the answer's end (its distance from the end goes as u², u uniform),
        # where the decision to stop is made: a third of the cuts fall in the last tenth.
        from_end = (torch.rand(batch, generator=generator) ** 2 * answered).long()
        cut = starts + answered - 1 - from_end
        block_end = starts + ((cut - starts) // block_length + 1) * block_length
        after = response & (pos >= cut[:, None])
        masked = torch.where(ordered[:, None], after, masked)
        scored = torch.where(ordered[:, None], after & (pos < block_end[:, None]), scored)
        weight = torch.where(ordered, canvas / block_length, weight)
    return masked, scored, weight[:, None].expand(batch, length)


def threshold_rows(batch: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The rows a batch masks as threshold decoding leaves them (none at fraction 0,
    drawing nothing from `generator`)."""
    if fraction <= 0:
        return torch.zeros(0, dtype=torch.long)
    return (torch.rand(batch, generator=generator) < fraction).nonzero()[:, 0]


@torch.no_grad()
def threshold_state_masks(model: ReferenceLLaDA, tokens: torch.Tensor,
                          attention_mask: torch.Tensor, starts: torch.Tensor,
                          answered: torch.Tensor, canvas: int, mask_id: int,
                          generator: torch.Generator, threshold: float = DEFAULTS["threshold"],
                          max_forwards: int = 3, block_length: int = BLOCK_LENGTH
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`training_masks`' triple for rows masked the way threshold decoding leaves them
    inside a block: the answer given up to the start of a random block it touches, all
    masked from there, then 0 … `max_forwards` (per row) forwards of the model, each giving
    the block's masked tokens it is at least `threshold` confident of and its most
    confident one, as threshold decoding commits them. The given tokens are the answer's
    (a wrong confident guess is not kept: the row stays an example of the right answer).
    The block's masked tokens are scored, weight canvas / block length.

    This is where the model's own confidence picks what is visible, which neither random
    nor ordered masking reproduces: after a block's first forward the easy tokens
    (separators, copies) are given and the hard ones (a sum's digits) are not, and a model
    never trained on such states commits from them at 0.90–0.99 and is wrong.
    """
    batch, length = tokens.shape
    pos = torch.arange(length)[None]
    blocks = (answered + block_length - 1) // block_length
    block_start = starts + (torch.rand(batch, generator=generator) * blocks).long() * block_length
    in_block = (pos >= block_start[:, None]) & (pos < block_start[:, None] + block_length)
    masked = (pos >= block_start[:, None]) & (pos < starts[:, None] + canvas)
    forwards = torch.randint(0, max_forwards + 1, (batch,), generator=generator)
    for i in range(int(forwards.max())):
        logits = model(torch.where(masked, mask_id, tokens), attention_mask)
        open_ = masked & in_block
        conf = torch.softmax(logits.float(), -1).amax(-1).masked_fill(~open_, float("-inf"))
        commit = select_threshold(conf, torch.full((batch,), threshold))
        # A row past its forwards, or whose block this forward would finish, stays as it is.
        done = (forwards <= i) | (commit.sum(1) == open_.sum(1))
        masked &= ~(commit & ~done[:, None])
    scored = masked & in_block
    return masked, scored, torch.full((batch, length), canvas / block_length)


def sft_loss_sum(model: ReferenceLLaDA, tokens: torch.Tensor, attention_mask: torch.Tensor,
                 starts: torch.Tensor, answered: torch.Tensor, mask_id: int,
                 generator: torch.Generator, canvas: int, ordered_fraction: float = 0.0,
                 threshold_fraction: float = 0.0) -> torch.Tensor:
    """The SFT loss of `training_masks`, summed over the rows (the caller divides by the
    batch size); with `threshold_fraction` > 0 that fraction of the rows is masked by
    `threshold_state_masks` instead."""
    masked, scored, weight = training_masks(starts, answered, tokens.shape[1], canvas,
                                            generator, ordered_fraction)
    rows = threshold_rows(len(starts), threshold_fraction, generator)
    if len(rows):
        weight = weight.clone()
        masked[rows], scored[rows], weight[rows] = threshold_state_masks(
            model, tokens[rows], attention_mask[rows], starts[rows], answered[rows],
            canvas, mask_id, generator)
    logits = model(torch.where(masked, mask_id, tokens), attention_mask)
    ce = F.cross_entropy(logits[scored], tokens[scored], reduction="none")
    return (ce * weight[scored]).sum() / canvas


def block_diffusion_mask(length: int, block_length: int) -> torch.Tensor:
    """[2L, 2L] attention of the vectorised block-diffusion pass (BD3-LM, arXiv:2503.09573
    §3.2, the mask of its Fig. 2; SDAR trains with the same, `block_diff_mask` in its
    modeling_sdar.py): rows 0..L-1 are the noisy copy, L..2L-1 the clean one. A noisy row of
    block b sees its own noisy block and the clean blocks before b; a clean row sees the
    clean blocks up to its own. Blocks are cut from position 0, as decoding cuts them."""
    block = torch.arange(length) // block_length
    same = block[:, None] == block[None, :]
    before = block[:, None] > block[None, :]
    noisy_rows = torch.cat([same, before], dim=1)
    clean_rows = torch.cat([torch.zeros_like(same), same | before], dim=1)
    return torch.cat([noisy_rows, clean_rows], dim=0)


def block_diffusion_logits(model: ReferenceDecoder, noisy: torch.Tensor, tokens: torch.Tensor,
                           attention_mask: torch.Tensor, block_length: int) -> torch.Tensor:
    """The noisy rows' logits [B, L, V] of the vectorised pass: the noisy and the clean copy
    of each row side by side under `block_diffusion_mask`, padding keys left out."""
    length = tokens.shape[1]
    keys = torch.cat([attention_mask, attention_mask], dim=1).bool()[:, None, None, :]
    return model.forward_masked(torch.cat([noisy, tokens], dim=1), torch.arange(length).repeat(2),
                                block_diffusion_mask(length, block_length) & keys)[:, :length]


def weight_end_block(weight: torch.Tensor, starts: torch.Tensor, answered: torch.Tensor,
                     block_length: int, end_weight: float) -> torch.Tensor:
    """`weight` [B, L] with the block holding each row's `<|eot_id|>` (at response
    position `answered` - 1) multiplied by `end_weight`; blocks cut from position 0."""
    block = torch.arange(weight.shape[1])[None] // block_length
    end_block = (starts + answered - 1) // block_length
    return torch.where(block == end_block[:, None], weight * end_weight, weight)


def weight_stops(weight: torch.Tensor, tokens: torch.Tensor, stop_ids: torch.Tensor,
                 stop_weight: float) -> torch.Tensor:
    """`weight` [B, L] multiplied by `stop_weight` where the answer could end: the gold token
    is `<|eot_id|>` or a separator between items (`stop_ids`). There the model decides to
    stop or go on, once per item, and a rule that compares only some digits of the item
    with the end number in the prompt is right almost everywhere else."""
    return torch.where(torch.isin(tokens, stop_ids), weight * stop_weight, weight)


@torch.no_grad()
def block_threshold_states(model: ReferenceDecoder, tokens: torch.Tensor,
                           attention_mask: torch.Tensor, starts: torch.Tensor, canvas: int,
                           mask_id: int, generator: torch.Generator, block_length: int,
                           threshold: float = DEFAULTS["threshold"], max_forwards: int = 3
                           ) -> torch.Tensor:
    """Which response tokens are masked [B, L] when every block of a row is where threshold
    decoding leaves it: the whole response masked, then 0 … `max_forwards` (per row)
    block-diffusion forwards, each giving in every block the masked tokens the model is at
    least `threshold` confident of and its most confident one, as decoding commits them
    (the given tokens are the answer's). A block this forward would finish stays as it is,
    so that it keeps tokens to learn from. `threshold_state_masks` is LLaDA's version, for
    one block of the canvas; here every block is denoised given the clean blocks before
    it, so all blocks of the row move at once."""
    batch, length = tokens.shape
    pos = torch.arange(length)[None]
    masked = (pos >= starts[:, None]) & (pos < starts[:, None] + canvas)
    forwards = torch.randint(0, max_forwards + 1, (batch,), generator=generator)
    blocks = -(-length // block_length)
    pad = blocks * block_length - length
    for i in range(int(forwards.max())):
        logits = block_diffusion_logits(model, torch.where(masked, mask_id, tokens), tokens,
                                        attention_mask, block_length)
        conf = torch.softmax(logits.float(), -1).amax(-1).masked_fill(~masked, float("-inf"))
        per_block = F.pad(conf, (0, pad), value=float("-inf")).view(batch * blocks, block_length)
        commit = select_threshold(per_block, torch.full((batch * blocks,), threshold))
        open_ = per_block > float("-inf")
        done = (commit.sum(1) == open_.sum(1)).view(batch, blocks)
        commit = commit.view(batch, blocks * block_length)[:, :length]
        keep = (forwards > i)[:, None] & ~done.repeat_interleave(block_length, 1)[:, :length]
        masked &= ~(commit & keep)
    return masked


def block_diffusion_loss_sum(model: ReferenceDecoder, tokens: torch.Tensor,
                             attention_mask: torch.Tensor, starts: torch.Tensor,
                             answered: torch.Tensor, mask_id: int,
                             generator: torch.Generator, canvas: int,
                             block_length: int, end_weight: float = 1.0,
                             stop_ids: torch.Tensor | None = None,
                             stop_weight: float = 1.0, threshold_fraction: float = 0.0
                             ) -> torch.Tensor:
    """SDAR's SFT loss (arXiv:2510.06303 §3; its `forward_add_noise_packed`: one t per
    sequence, each response token masked with probability t, the prompt never; loss 1/t per
    masked response token, over the response length), summed over the rows, with the
    sequence's noisy and clean copies in one 2L pass under `block_diffusion_mask`, so every
    block is denoised given the clean blocks before it, as decoding sees it.

    `end_weight` multiplies the weight of the block holding the answer's `<|eot_id|>`:
    whether to stop is decided there once per answer, while the padding blocks after it,
    trivially `<|endoftext|>`, make up most of the canvas's loss. A noisy block sees only
    clean blocks besides itself, so weighting it changes no other block's context.

    With `threshold_fraction` > 0 that fraction of the rows is masked by
    `block_threshold_states` instead, every masked token scored with weight 1 before the
    end-block and stop weights."""
    masked, scored, weight = training_masks(starts, answered, tokens.shape[1], canvas,
                                            generator)
    rows = threshold_rows(len(starts), threshold_fraction, generator)
    if len(rows):
        weight = weight.clone()
        masked[rows] = scored[rows] = block_threshold_states(
            model, tokens[rows], attention_mask[rows], starts[rows], canvas, mask_id,
            generator, block_length)
        weight[rows] = 1.0
    weight = weight_end_block(weight, starts, answered, block_length, end_weight)
    if stop_ids is not None:
        weight = weight_stops(weight, tokens, stop_ids, stop_weight)
    logits = block_diffusion_logits(model, torch.where(masked, mask_id, tokens), tokens,
                                    attention_mask, block_length)
    ce = F.cross_entropy(logits[scored], tokens[scored], reduction="none")
    return (ce * weight[scored]).sum() / canvas


class _HeadScales(ReferenceLLaDA):
    """LLaDA recording, per layer, the mean per-head RMS of its q and k (RoPE rotates
    pairs of channels, so the post-RoPE heads have the pre-RoPE norms)."""

    def project(self, i: int, x: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(i, x, positions)
        real = self.real[:, None, :].expand(-1, q.shape[1], -1)
        self.scales.append(tuple(float(t.pow(2).mean(-1).sqrt()[real].mean()) for t in (q, k)))
        return q, k, v


@torch.no_grad()
def head_scales(config: dict, state: dict[str, torch.Tensor], tokens: torch.Tensor,
                attention_mask: torch.Tensor) -> list[tuple[float, float]]:
    """Per layer, the mean RMS of a LLaDA's q and k heads over the real tokens of a batch."""
    model = _HeadScales(config, state)
    model.real, model.scales = attention_mask.bool(), []
    model(tokens, attention_mask)
    return model.scales


def sdar_from_llada(config: dict, state: dict[str, torch.Tensor], block_length: int,
                    scales: list[tuple[float, float]]) -> tuple[dict, dict[str, torch.Tensor]]:
    """An SDAR checkpoint (config, Qwen3 weight names) holding LLaDA weights: the same layer
    but for SDAR's per-head q/k RMSNorms, whose gains start at LLaDA's mean q and k head RMS
    of layer i (`scales[i]`, from `head_scales`), so that attention keeps the sharpness
    LLaDA learnt. (Gains of one cap every attention logit at sqrt(head_dim); Adam moves a
    gain by about lr a step, and in a trial they had grown only to 1.02-1.08 after 400
    steps at 5e-4, while LLaDA's heads have RMS 1.0-2.0.) `<|MASK|>` takes the embedding
    LLaDA learnt for its `<|mdm_mask|>`."""
    llada_vocab, vocab = build_vocab(), tiny_sdar.build_sdar_vocab()
    sdar = tiny_sdar.sdar_config(
        vocab, hidden_size=config["d_model"], num_hidden_layers=config["n_layers"],
        num_attention_heads=config["n_heads"],
        num_key_value_heads=config.get("n_kv_heads") or config["n_heads"],
        intermediate_size=config["mlp_hidden_size"],
        max_position_embeddings=config["max_sequence_length"], block_size=block_length,
        rope_theta=config["rope_theta"], rms_norm_eps=config["rms_norm_eps"])
    assert sdar["vocab_size"] == config["embedding_size"], "the vocabularies must share rows"
    head_dim = sdar["head_dim"]
    llada_mask, sdar_mask = llada_vocab["<|mdm_mask|>"], vocab[tiny_sdar.MASK_TOKEN]

    def rows(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[sdar_mask] = w[llada_mask]
        return w

    out = {"model.embed_tokens.weight": rows(state["model.transformer.wte.weight"]),
           "model.norm.weight": state["model.transformer.ln_f.weight"],
           "lm_head.weight": rows(state["model.transformer.ff_out.weight"])}
    names = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
             "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
             "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    for i in range(config["n_layers"]):
        for old, new in names.items():
            out[f"model.layers.{i}.{new}.weight"] = state[f"model.transformer.blocks.{i}.{old}.weight"]
        q_scale, k_scale = scales[i]
        out[f"model.layers.{i}.self_attn.q_norm.weight"] = torch.full((head_dim,), q_scale)
        out[f"model.layers.{i}.self_attn.k_norm.weight"] = torch.full((head_dim,), k_scale)
    return sdar, out


def lr_at(step: int, total: int, peak: float, warmup: int, final_ratio: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: ReferenceLLaDA, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Norm gains are not decayed: pulling them towards 0 would fight the normalisation.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95))


def save(model: ReferenceDecoder, out: Path, vocab: dict[str, int], suite: str, canvas: int,
         block_length: int | None = None) -> None:
    """`block_length`: an SDAR checkpoint (block diffusion) trained with that block."""
    # Written beside the target and swapped in, so a reader never sees half a checkpoint.
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    # Served with the canvas it was trained on.
    if block_length is None:
        write_checkpoint(tmp, model.checkpoint_state_dict(), model.config, vocab,
                         dllm_defaults={"gen_length": canvas,
                                        "block_length": min(canvas, BLOCK_LENGTH)})
    else:
        tiny_sdar.write_checkpoint(tmp, model.checkpoint_state_dict(), model.config, vocab,
                                   dllm_defaults={"gen_length": canvas,
                                                  "block_length": block_length})
    (tmp / "tasks.json").write_text(json.dumps({"suite": suite}) + "\n")
    if (out / "README.md").exists():
        shutil.copy(out / "README.md", tmp / "README.md")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train_step(model: ReferenceDecoder, encoder: Encoder, problems: list[tasks.Problem],
               mask_id: int, generator: torch.Generator, ordered_fraction: float = 0.0,
               threshold_fraction: float = 0.0, block_length: int | None = None,
               end_weight: float = 1.0, stop_ids: torch.Tensor | None = None,
               stop_weight: float = 1.0) -> float:
    """Accumulates the gradient of one batch; returns its loss. `block_length`: SDAR's
    block-diffusion loss instead of LLaDA's.

    Word problems are about twice as long as the rest, so each family is run as its own
    micro-batch to avoid padding the short ones; the summed gradient is the batch's.
    """
    total = 0.0
    for family in tasks.FAMILIES:
        group = [p for p in problems if p.family == family]
        if not group:
            continue
        if block_length is None:
            loss = sft_loss_sum(model, *encoder.batch(group), mask_id, generator,
                                encoder.canvas, ordered_fraction, threshold_fraction)
        else:
            loss = block_diffusion_loss_sum(model, *encoder.batch(group), mask_id, generator,
                                            encoder.canvas, block_length, end_weight,
                                            stop_ids, stop_weight, threshold_fraction)
        loss = loss / len(problems)
        loss.backward()
        total += loss.item()
    return total


def describe(config: dict, n_params: int) -> str:
    """The model line of a README, from a LLaDA or an SDAR config."""
    if config.get("model_type") == "sdar":
        d, layers, heads = (config["hidden_size"], config["num_hidden_layers"],
                            config["num_attention_heads"])
        mlp = config["intermediate_size"]
    else:
        d, layers, heads, mlp = (config["d_model"], config["n_layers"], config["n_heads"],
                                 config["mlp_hidden_size"])
    return (f"d_model {d}, {layers} layers, {heads} heads (head_dim {d // heads}), "
            f"mlp_hidden_size {mlp}, rope_theta {config['rope_theta']:g}, "
            f"{n_params:,} parameters")


def write_readme(out: Path, args: argparse.Namespace, config: dict, n_params: int,
                 wall_s: float, final_loss: float, report: str) -> None:
    command = "python -m benchmarks.train " + shlex.join(sys.argv[1:])
    earlier = ""
    if args.init_from:
        # Keep the whole lineage: the earlier stage's record, one heading level down.
        record = (args.init_from / "README.md").read_text()
        record = record[record.index("## Training record"):].split("\n## ")[0]
        earlier = (f"- started from `{args.init_from}`, trained as follows:\n\n"
                   + record.replace("## Training record", "### Earlier stage") + "\n")
    if args.arch == "sdar":
        what = (f"A small SDAR (original checkpoint format, float32, block size "
                f"{args.block_length}) trained with SDAR's block-diffusion objective")
        tokenizer = ("the character vocabulary of `dllm_reference/tiny_llada.py` with SDAR's "
                     "`<|MASK|>`, LLaDA's chat template")
    else:
        what = "A small LLaDA (original checkpoint format, float32) trained with LLaDA's SFT objective"
        tokenizer = "the character vocabulary of `dllm_reference/tiny_llada.py`, LLaDA's chat template"
    weighting = (f"; the block holding the answer's end weighted {args.end_weight:g}x"
                 if args.end_weight != 1.0 else "")
    if args.stop_weight != 1.0:
        weighting += f"; where the answer could end weighted {args.stop_weight:g}x"
    (out / "README.md").write_text(f"""# {out.name}

{what} on the
synthetic tasks of `dllm_reference/tasks.py` ({args.suite} suite, families: \
{", ".join(tasks.SUITES[args.suite])}).
Tokenizer: {tokenizer}.

## Training record

- command: `{command}`
- seed: {args.seed}
- model: {describe(config, n_params)}
- optimisation: {args.steps} steps of {args.batch_size} examples (family mix \
{args.mix.replace(",", ", ")}), AdamW \
lr {args.lr} (warmup {args.warmup}, cosine to 10%), weight decay {args.weight_decay}, \
grad clip {args.grad_clip}{weighting}
- response canvas: {args.canvas} tokens (answer, `<|eot_id|>`, `<|endoftext|>` padding)
- wall time: {wall_s / 60:.1f} min on {torch.get_num_threads()} CPU thread(s)
- final loss (mean of the last 100 steps): {final_loss:.4f}
{earlier}
## Held-out evaluation (`python -m benchmarks.eval_reference {out} -n {args.eval_prompts}`)

```
{report}
```
""")


def build_model(args: argparse.Namespace) -> ReferenceDecoder:
    """The trainable model a run starts from: `--init-from`'s checkpoint (a LLaDA one
    converted for `--arch sdar`) or a fresh seeded init."""
    if args.init_from:
        # A further stage: the architecture and weights of an earlier run's checkpoint.
        config, state = ReferenceDecoder.load(args.init_from, torch.float32)
    else:
        config = llada_config(build_vocab(), d_model=args.d_model, n_layers=args.n_layers,
                              n_heads=args.n_heads, mlp_hidden_size=args.mlp_hidden_size,
                              max_sequence_length=256)
        config["rope_theta"] = args.rope_theta
        state = init_state_dict(config, args.seed)
    if args.arch == "llada":
        return ReferenceLLaDA(config, state, trainable=True)
    if config.get("model_type") != "sdar":
        # The q/k norm gains are set from the first batch of the run's training stream.
        first = list(itertools.islice(tasks.stream("train", args.seed, tuple(args.mix.split(","))),
                                      args.batch_size))
        tokens, attention_mask, _, _ = Encoder(build_vocab(), args.canvas).batch(first)
        config, state = sdar_from_llada(config, state, args.block_length,
                                        head_scales(config, state, tokens, attention_mask))
    elif config["block_size"] != args.block_length:
        raise SystemExit(f"--block-length {args.block_length}: {args.init_from} was trained "
                         f"with block_size {config['block_size']}")
    return ReferenceSDAR(config, state, trainable=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=14000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--mlp-hidden-size", type=int, default=512)
    parser.add_argument("--rope-theta", type=float, default=500000.0, help="LLaDA-8B's value by default")
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-prompts", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--suite", choices=sorted(tasks.SUITES), default="short")
    parser.add_argument("--canvas", type=int, default=None,
                        help="response tokens per example (default: the suite's)")
    parser.add_argument("--mix", default=None,
                        help="families drawn in this repeating order (repeat one to weight it; "
                             "default: the suite's)")
    parser.add_argument("--ordered-fraction", type=float, default=0.0,
                        help="fraction of rows masked as left-to-right decoding sees them (the "
                             "answer given up to a cut, all masked after it); default 0")
    parser.add_argument("--threshold-fraction", type=float, default=0.0,
                        help="fraction of the rows masked as threshold decoding (0.9) leaves a "
                             "block (--arch sdar: every block) after 0-3 of its forwards, the "
                             "model's own confidence choosing what is given; default 0")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint (a further training stage); with "
                             "--arch sdar a LLaDA checkpoint is converted to SDAR's names")
    parser.add_argument("--arch", choices=("llada", "sdar"), default="llada",
                        help="sdar: block-causal SDAR trained with the block-diffusion loss")
    parser.add_argument("--block-length", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="--arch sdar: the block size (config.json's block_size)")
    parser.add_argument("--stop-weight", type=float, default=1.0,
                        help="--arch sdar: loss weight where the answer could end (the gold "
                             "token is <|eot_id|>, a space or a comma; default 1)")
    parser.add_argument("--end-weight", type=float, default=1.0,
                        help="--arch sdar: loss weight of the block holding the answer's end "
                             "(default 1, SDAR's recipe)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.arch == "sdar" and args.ordered_fraction:
        # It masks a LLaDA canvas as left-to-right decoding sees it; a block-diffusion row
        # already sees the clean blocks before its noisy one.
        parser.error("--ordered-fraction is LLaDA's (--arch llada)")
    if args.arch == "llada" and (args.end_weight != 1.0 or args.stop_weight != 1.0):
        parser.error("--end-weight and --stop-weight are the block-diffusion loss's "
                     "(--arch sdar)")
    args.canvas = args.canvas or DEFAULT_CANVAS[args.suite]
    args.mix = args.mix or DEFAULT_MIX[args.suite]
    mix = tuple(args.mix.split(","))
    unknown = set(mix) - set(tasks.SUITES[args.suite])
    if unknown:
        parser.error(f"--mix: families not in the {args.suite} suite: {sorted(unknown)}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)
    config = model.config
    block_length = args.block_length if args.arch == "sdar" else None
    vocab = build_vocab() if block_length is None else tiny_sdar.build_sdar_vocab()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters", flush=True)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    encoder = Encoder(vocab, args.canvas)
    mask_id = config["mask_token_id"]
    stop_ids = torch.tensor([vocab[t] for t in ("<|eot_id|>", " ", ",")])
    generator = torch.Generator().manual_seed(args.seed)
    problems = tasks.stream("train", args.seed, mix)

    losses: list[float] = []
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        optimizer.zero_grad(set_to_none=True)
        batch = [next(problems) for _ in range(args.batch_size)]
        losses.append(train_step(model, encoder, batch, mask_id, generator,
                                  args.ordered_fraction, args.threshold_fraction,
                                  block_length, args.end_weight, stop_ids,
                                  args.stop_weight))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if (step + 1) % args.log_every == 0:
            recent = losses[-args.log_every:]
            elapsed = time.time() - start
            print(f"step {step + 1} loss {sum(recent) / len(recent):.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} elapsed {elapsed:.0f}s "
                  f"({elapsed / (step + 1):.2f}s/step)", flush=True)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(model, args.out, vocab, args.suite, args.canvas, block_length)
    wall_s = time.time() - start
    save(model, args.out, vocab, args.suite, args.canvas, block_length)
    final_loss = sum(losses[-100:]) / len(losses[-100:])
    print(f"done in {wall_s:.0f}s, final loss {final_loss:.4f}", flush=True)

    if args.eval_prompts == 0:
        return
    report = format_report(evaluate(args.out, args.eval_prompts))
    print(report, flush=True)
    write_readme(args.out, args, config, n_params, wall_s, final_loss, report)


if __name__ == "__main__":
    main()
