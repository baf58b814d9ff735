"""Device choice in one place: cuda, then mps, then cpu; SAM3DGS_DEVICE overrides."""

from __future__ import annotations

import os


def pick_device(requested: str = "auto") -> str:
    """Return 'cuda', 'cuda:N', 'mps' or 'cpu'. An explicit --device wins, then SAM3DGS_DEVICE, then
    detection. Imports torch lazily; without torch it is 'cpu'."""
    if requested in (None, "", "auto"):
        requested = os.environ.get("SAM3DGS_DEVICE") or "auto"
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_context(device: str, dtype: str = "bfloat16"):
    """bf16 autocast on CUDA only; a no-op context elsewhere."""
    import contextlib

    if not device.startswith("cuda") or dtype in ("float32", "fp32"):
        return contextlib.nullcontext()
    import torch

    return torch.autocast("cuda", dtype=getattr(torch, dtype))
