"""`python -m pipeline doctor`: everything the full profile needs, what is missing, and the fix.

Each check runs in the env that will use it (conda envs are probed with their own python), so
the answer is true for the scripts, not just for the interpreter running doctor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import LifterConfig, SegmenterConfig, VLMServerConfig
from pipeline.core.hub import hf_token
from pipeline.selection import sam3d_root

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = {
    "vllm": os.environ.get("SAM3DGS_ENV_VLLM", "vllm"),
    "sam3": os.environ.get("SAM3DGS_ENV_SAM3", "sam3"),
    "sam3d": os.environ.get("SAM3DGS_ENV_SAM3D", "sam3d-objects"),
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # False: a warning that does not block the full profile


def find_conda() -> str | None:
    candidates = [os.environ.get("CONDA_EXE"), shutil.which("conda"), shutil.which("mamba")]
    home = Path.home()
    candidates += [str(home / d / "bin" / "conda") for d in ("miniconda3", "miniforge3", "anaconda3", "mambaforge")]
    candidates += ["/opt/conda/bin/conda"]
    for c in candidates:
        if c and os.access(c, os.X_OK) and Path(c).is_file():
            return c
    return None


def conda_envs(conda: str) -> dict[str, Path]:
    try:
        out = subprocess.run([conda, "env", "list"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    envs = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and not line.startswith("#"):
            envs[parts[0]] = Path(parts[-1])
    return envs


def probe(python: Path, code: str, timeout: float = 120) -> tuple[bool, str]:
    """Run `code` in another env's python; (ok, last line of output)."""
    try:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return proc.returncode == 0, text[-1] if text else ""


def gpus() -> list[tuple[str, float]]:
    """(name, GiB) per GPU, from nvidia-smi (no torch needed)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    result = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            result.append((name.strip(), float(mib) / 1024))
        except ValueError:
            continue
    return result


def collect(seg: SegmenterConfig, lifter: LifterConfig, server: VLMServerConfig) -> list[Check]:
    checks: list[Check] = []
    conda = find_conda()
    checks.append(Check("conda", conda is not None, conda or "not found", "install Miniforge (https://conda-forge.org/download) or set CONDA_EXE"))
    envs = conda_envs(conda) if conda else {}
    pythons: dict[str, Path | None] = {}
    for key, name in ENV_NAMES.items():
        prefix = envs.get(name)
        pythons[key] = prefix / "bin" / "python" if prefix else None
        checks.append(Check(f"conda env '{name}'", prefix is not None, str(prefix) if prefix else "missing", f"bash envs/setup.sh {key}"))

    found = gpus()
    checks.append(Check("CUDA GPU", bool(found), ", ".join(f"{n} ({g:.0f} GiB)" for n, g in found) or "nvidia-smi found no GPU", "run on a machine with an NVIDIA GPU and driver"))
    if found:
        best = max(g for _, g in found)
        need = float(lifter.sam3d_min_gpu_gib)  # the same bound the SAM 3D lifter enforces
        checks.append(Check(f"GPU memory >= {need:g} GiB (SAM 3D Objects)", best >= need, f"largest GPU has {best:.0f} GiB", "use a GPU with about 32 GB for stage 2 (or lower --sam3d-min-gpu-gib at your own risk)"))

    vllm_py = pythons["vllm"]
    vllm_exe = vllm_py.parent / "vllm" if vllm_py else (Path(shutil.which(server.vllm_command)) if shutil.which(server.vllm_command) else None)
    checks.append(Check("vllm executable", bool(vllm_exe and vllm_exe.exists()), str(vllm_exe) if vllm_exe else f"'{server.vllm_command}' not found", "bash envs/setup.sh vllm"))

    sam3_py = pythons["sam3"]
    if sam3_py:
        ok, msg = probe(sam3_py, "import torch; from sam3.model_builder import build_sam3_image_model; print('sam3 ok, torch', torch.__version__)")
        checks.append(Check("import sam3 (sam3 env)", ok, msg, "bash envs/setup.sh sam3"))
        bpe_arg = repr(str(seg.sam3_bpe)) if seg.sam3_bpe else "None"
        ok, msg = probe(sam3_py, f"from pipeline.masks.sam3 import resolve_bpe_path; print(resolve_bpe_path({bpe_arg}))")
        checks.append(Check("SAM3 BPE vocab (bpe_simple_vocab_16e6.txt.gz)", ok, msg, f"{sam3_py} -m pip install open_clip_torch   (or pass --sam3-bpe FILE)"))
        ok, msg = probe(sam3_py, "import openai; print('openai', openai.__version__)")
        checks.append(Check("import openai (sam3 env)", ok, msg, f"{sam3_py} -m pip install openai"))

    root = sam3d_root(lifter)
    has_checkout = (root / "notebook" / "inference.py").is_file()
    checks.append(Check("sam-3d-objects checkout", has_checkout, str(root), "git submodule update --init sam-3d-objects   (or --sam3d-root DIR)"))
    ckpt = root / "checkpoints" / lifter.checkpoint_tag / "pipeline.yaml"
    checks.append(Check(f"SAM 3D checkpoints ({lifter.checkpoint_tag})", ckpt.is_file(), str(ckpt), "export HF_TOKEN=... (after accepting the licence at huggingface.co/facebook/sam-3d-objects); they download on first use"))
    sam3d_py = pythons["sam3d"]
    if sam3d_py:
        ok, msg = probe(sam3d_py, "import torch, sam3d_objects; assert sam3d_objects.__file__, 'namespace only'; print('sam3d_objects ok, torch', torch.__version__)")
        checks.append(Check("import sam3d_objects (sam3d-objects env)", ok, msg, "bash envs/setup.sh sam3d"))

    token = hf_token() is not None
    # Needed while any gated weights still have to be downloaded: SAM3's (unless --sam3-checkpoint) or SAM 3D's.
    downloads_left = not ckpt.is_file() or not (seg.sam3_checkpoint and Path(seg.sam3_checkpoint).is_file())
    checks.append(Check("HF token (gated weights: facebook/sam3, facebook/sam-3d-objects)", token, "HF_TOKEN set or token file present" if token else "no HF_TOKEN", "export HF_TOKEN=hf_...  (create one at huggingface.co/settings/tokens; accept the model licences first)", required=downloads_left))

    venv_py = ROOT / ".venv" / "bin" / "python"
    checks.append(Check("light env .venv (lite profile, export, report)", venv_py.exists(), str(venv_py), "./run_pipeline.sh --demo   (creates it)", required=False))
    return checks


def run_doctor(seg: SegmenterConfig, lifter: LifterConfig, server: VLMServerConfig) -> int:
    checks = collect(seg, lifter, server)
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok     " if c.ok else ("MISSING" if c.required else "warn   ")
        print(f"{mark}  {c.name.ljust(width)}  {c.detail}")
        if not c.ok:
            print(f"{'':9s}{'':{width}s}  fix: {c.fix}")
    missing = [c for c in checks if not c.ok and c.required]
    if missing:
        print(f"\n{len(missing)} thing(s) missing for --profile full. The lite profile still works: ./run_pipeline.sh --demo", file=sys.stderr)
        return 1
    print("\neverything the full profile needs is here.")
    return 0
