"""Device choice in one place: cuda, then mps, then cpu; SAM3DGS_DEVICE overrides."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import MutableMapping

# Set by pin_cuda_device to the --device it pinned, so a second call (and a child process, which
# inherits the narrowed CUDA_VISIBLE_DEVICES) answers cuda:0 for it again.
PINNED_DEVICE_ENV = "SAM3DGS_PINNED_DEVICE"


def nvidia_smi(*fields: str, ids: str | None = None, timeout: float = 30) -> list[list[str]]:
    """One row of cells per GPU of `nvidia-smi --query-gpu=FIELDS [-i IDS]`, no torch needed (the
    light env, the doctor, a batch driver); [] without a driver or when nvidia-smi fails."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    argv = [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    if ids:
        argv += ["-i", ids]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def requested_device(device: str | None, environ: MutableMapping[str, str] | None = None) -> str:
    """The device asked for: an explicit --device wins, then SAM3DGS_DEVICE, else 'auto'."""
    if device not in (None, "", "auto"):
        return device  # type: ignore[return-value]
    return (os.environ if environ is None else environ).get("SAM3DGS_DEVICE") or "auto"


def pick_device(requested: str = "auto") -> str:
    """Return 'cuda', 'cuda:N', 'mps' or 'cpu'. An explicit --device wins, then SAM3DGS_DEVICE, then
    detection. Imports torch lazily; without torch it is 'cpu'."""
    requested = requested_device(requested)
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


def pin_cuda_device(device: str | None, environ: MutableMapping[str, str] | None = None) -> str:
    """`cuda:N` -> narrow CUDA_VISIBLE_DEVICES to that GPU and return 'cuda:0', the name torch then
    gives it; anything else is returned as is (`auto` is resolved through SAM3DGS_DEVICE first).

    Code that assumes GPU 0 (SAM 3D Objects picks its attention backend from GPU 0's name and its
    layout optimizer defaults to cuda:0) then runs on the chosen GPU. CUDA reads the variable when
    it initialises, so this only pins while torch is not imported in this process; otherwise the
    device comes back unchanged and torch.cuda.set_device is the fallback. An existing
    CUDA_VISIBLE_DEVICES list is indexed (N-th entry), as torch would.
    """
    env = os.environ if environ is None else environ
    requested = requested_device(device, env)
    match = re.fullmatch(r"cuda:(\d+)", requested)
    if match is None:
        return device or "auto"
    if env.get(PINNED_DEVICE_ENV) == requested:
        return "cuda:0"
    index = int(match.group(1))
    visible = [e.strip() for e in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    if "CUDA_VISIBLE_DEVICES" in env and index >= len(visible):
        from pipeline.core.errors import InputError

        raise InputError(
            f"--device {requested} but CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} makes {len(visible)} GPU(s) visible.",
            "pick an index below that count, or unset CUDA_VISIBLE_DEVICES.",
        )
    if "torch" in sys.modules:
        return requested
    env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    env[PINNED_DEVICE_ENV] = requested
    return "cuda:0"
