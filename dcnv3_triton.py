"""Triton DCNv3 kernels (placeholder until the Triton backend lands)."""

import torch


def is_available() -> bool:
    """Whether the Triton kernels can be used (triton importable)."""
    return False


def dcnv3_triton(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *args) -> torch.Tensor:
    raise RuntimeError("The Triton DCNv3 backend is not available")
