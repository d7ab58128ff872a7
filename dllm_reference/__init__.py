"""Plain-PyTorch reference decoders and tiny model builders, shared by tests/ and benchmarks/.

* `modeling` (LLaDA) and `dream` (Dream): the models written out in plain PyTorch,
  reading the original checkpoint formats.
* `generate` (LLaDA's block decoding with every commit policy and cache mode),
  `dream.diffusion_generate` and `skipping` (ES-dLLM and DyLLM): the decoders the plugin
  is checked against token for token. They share no decoding code with the plugin, only
  the counter-based noise of `vllm_dllm.sampling.noise` (plain PyTorch).
* `tiny_llada`, `tiny_dream`: small random checkpoints in the original Hugging Face
  formats, for tests and for benchmarks that need a model of a given shape.
* `tasks`: the synthetic task suite the bundled checkpoints are trained and scored on.

Nothing here imports vLLM, so the reference runs wherever PyTorch does.
"""
