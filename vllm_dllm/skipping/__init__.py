"""Token skipping inside the forward pass (ES-dLLM, DyLLM): the selection rules,
in plain PyTorch over padded per-request matrices; the pass that applies them
is `engine/pass_rows.py`."""
