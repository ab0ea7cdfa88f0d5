"""DCNv3 core operator: its semantics, and the dispatch to a backend (`dcnv3_pytorch.py`, `dcnv3_triton.py`, the
optional `dcnv3_cuda` extension). The public way to import the op is `from modeling_internimage import dcnv3_core`.

Layouts follow the official op: `input` is (N, H, W, G*Cg) channels-last, `offset` is (N, H_out, W_out, G*P*2)
with (dx, dy) pairs in pixels, `mask` is (N, H_out, W_out, G*P) already normalised over the P points of each
group, and the output is (N, H_out, W_out, G*Cg). P = kernel_h * kernel_w - remove_center, with the sampling
points ordered x-outer, y-inner. The sampling position of point p for output pixel (i, j) is
`(c - pad + i * stride + offset_scale * (tap_p * dilation + offset_p))` per axis, `c = dilation * (k - 1) // 2`,
and values outside the image are zero (bilinear interpolation).

Non-finite values never raise, on every backend, and make the same outputs non-finite as the official grid_sample
formulation: a sampling point whose position is NaN or ±inf (from a non-finite offset) makes its outputs NaN (the
official CUDA kernel, `ops_dcnv3/src/cuda/dcnv3_im2col_cuda.cuh` L217-282, skips such a point instead), and a
non-finite mask or pixel value makes the outputs whose sums it takes part in non-finite: NaN for NaN; ±inf or NaN
for ±inf, which of the two is left unspecified. A pixel takes part in the bilinear sum of every point whose four
corners include it, also with weight zero, and of no other point. Gradients are non-finite where they depend on
such values, as in the official formulation.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import torch
from transformers.utils import logging

try:
    from .configuration_internimage import DCN_BACKENDS as BACKENDS
    from .dcnv3_custom_ops import checked_spec, dcnv3_output_size
    from .dcnv3_pytorch import dcnv3_core_pytorch, run_dcnv3_pytorch
    from .dcnv3_triton import is_available as triton_is_available
    from .dcnv3_triton import run_dcnv3_triton
except ImportError:
    from configuration_internimage import DCN_BACKENDS as BACKENDS
    from dcnv3_custom_ops import checked_spec, dcnv3_output_size
    from dcnv3_pytorch import dcnv3_core_pytorch, run_dcnv3_pytorch
    from dcnv3_triton import is_available as triton_is_available
    from dcnv3_triton import run_dcnv3_triton

logger = logging.get_logger(__name__)

BACKEND_ENV_VAR = "INTERNIMAGE_DCN_BACKEND"


def _cuda_extension_module():
    """The optional compiled extension (`pip install ./dcnv3_cuda`), or `None` if it is not installed.

    Once imported it is read from `sys.modules`, which `torch.compile` traces (it cannot trace `importlib`).
    """
    module = sys.modules.get("dcnv3_cuda")
    if module is None:
        try:
            module = importlib.import_module("dcnv3_cuda")
        except ImportError:
            return None
    # The repository's source folder `dcnv3_cuda/` imports as an empty namespace package when it is on sys.path.
    return module if hasattr(module, "dcnv3_cuda") else None


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _log_choice(backend: str, device_type: str) -> None:
    logger.info("InternImage DCNv3 backend: %s on %s", backend, device_type)


def resolve_dcn_backend(requested: str | None, device: torch.device) -> str:
    """The one place that decides which DCNv3 implementation runs.

    `INTERNIMAGE_DCN_BACKEND` wins over `requested` (the config's `dcn_backend` or the call's `backend`).
    `"auto"` picks Triton for CUDA tensors when triton is installed, else the CUDA extension when installed,
    else PyTorch. An explicitly requested backend that cannot run raises a `RuntimeError` saying how to get it.
    """
    backend = os.environ.get(BACKEND_ENV_VAR) or requested or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown DCNv3 backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and triton_is_available():
            backend = "triton"
        elif device.type == "cuda" and _cuda_extension_module() is not None:
            backend = "cuda"
        else:
            backend = "pytorch"
    elif backend == "triton":
        if not triton_is_available():
            raise RuntimeError("DCNv3 backend 'triton' needs the `triton` package: `pip install triton`")
        if not _triton_runs_on(device):
            raise RuntimeError(
                f"DCNv3 backend 'triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {device.type}"
                " tensors; use backend='pytorch' or 'auto'"
            )
    elif backend == "cuda":
        if _cuda_extension_module() is None:
            raise RuntimeError(
                "DCNv3 backend 'cuda' needs the optional extension: `pip install ./dcnv3_cuda --no-build-isolation`"
            )
        if device.type != "cuda":
            raise RuntimeError(f"DCNv3 backend 'cuda' runs on CUDA tensors, got {device.type} tensors")
    if not torch.compiler.is_compiling():  # logging inside a traced graph would break it
        _log_choice(backend, device.type)
    return backend


def dcnv3_core(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: int | bool,
    backend: str | None = "auto",
) -> torch.Tensor:
    """DCNv3 core with the official argument order and layouts, on the chosen backend; NaN and ±inf as the module
    docstring says, the same on every backend. The call is checked once (`checked_spec`) whatever the backend."""
    spec = checked_spec(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
        group_channels, offset_scale, remove_center,
    )
    chosen = resolve_dcn_backend(backend, input.device)
    if chosen == "triton":
        return run_dcnv3_triton(input, offset, mask, spec)
    if chosen == "cuda":
        return _cuda_extension_module().dcnv3_cuda(input, offset, mask, *spec)
    return run_dcnv3_pytorch(input, offset, mask, spec)


__all__ = ["dcnv3_core", "dcnv3_core_pytorch", "resolve_dcn_backend", "dcnv3_output_size"]
