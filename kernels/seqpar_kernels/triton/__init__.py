"""Triton kernels (placeholder in this branch: the TritonKernel dispatcher lives on the gated-family branch)."""
