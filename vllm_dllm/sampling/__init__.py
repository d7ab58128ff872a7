"""Decoding core: per-request denoising state and the rules that pick which
masked positions to commit. Plain PyTorch, no vLLM imports."""
