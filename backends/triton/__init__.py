"""Triton backend: fused quantized kernels (issue 5)."""
