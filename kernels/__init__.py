"""Triton kernels behind impl="triton" (installed as dpo_fast.kernels)."""
