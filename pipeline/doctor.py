"""`python -m pipeline doctor`: everything the full profile needs, what is missing, and the fix.

Each env is probed with its own python (one subprocess per env that imports what its stage
imports and reports JSON), so the answer is true for the scripts, not just for the interpreter
running doctor. A probe that dies (a broken binary can segfault on import) names the import it
was in. Every problem comes with the exact command that fixes it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import LifterConfig, SegmenterConfig, VLMServerConfig
from pipeline.core.device import nvidia_smi
from pipeline.core.hub import hf_token
from pipeline.masks.sam3 import SAM3_PIP_NAMES
from pipeline.plan.server import RUNTIME_OVERHEAD_GIB as VLLM_OVERHEAD_GIB
from pipeline.plan.server import SCENE_SHARE
from pipeline.selection import sam3d_root

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = {
    "vllm": os.environ.get("SAM3DGS_ENV_VLLM", "vllm"),
    "sam3": os.environ.get("SAM3DGS_ENV_SAM3", "sam3"),
    "sam3d": os.environ.get("SAM3DGS_ENV_SAM3D", "sam3d-objects"),
}
SAM3_CONSTRAINTS = ROOT / "envs" / "sam3-constraints.txt"
VLLM_REQUIREMENTS = {"13": ROOT / "envs" / "vllm-requirements.txt", "12": ROOT / "envs" / "vllm-cu12-requirements.txt"}

# CUDA toolkit (major, minor) -> the Linux driver branch of its GA release, from NVIDIA's CUDA
# Toolkit release notes ("CUDA Toolkit and Corresponding Driver Versions": 13.0 GA >= 580.65.06,
# 12.9 >= 575.51.03, 12.8 >= 570.26, 12.6 >= 560.28.03, 12.4 >= 550.54.14, 12.1 >= 530.30.02, ...).
TOOLKIT_DRIVER = {
    (13, 1): 590, (13, 0): 580,
    (12, 9): 575, (12, 8): 570, (12, 6): 560, (12, 5): 555, (12, 4): 550, (12, 3): 545, (12, 2): 535, (12, 1): 530, (12, 0): 525,
    (11, 8): 520,
}  # fmt: skip
# The oldest driver that runs a CUDA major at all, through CUDA minor version compatibility
# (no PTX JIT below the GA driver): 12.x >= 525.60.13, 13.x >= 580 (NVIDIA's data-center driver
# support matrix: R535/R570 run CUDA 12.x, R580 is the first to run 13.x).
MINOR_COMPAT_FLOOR = {13: 580, 12: 525, 11: 450}

# GPU memory per stage with our defaults (GiB). Qwen3-VL-8B: 8.77 B parameters in bf16 = 16.3 GiB;
# its KV cache is 36 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 144 KiB per token of
# --max-model-len; plus VLLM_OVERHEAD_GIB (pipeline.plan.server.RUNTIME_OVERHEAD_GIB, the launcher's
# own figure). vLLM takes --gpu-memory-utilization of the WHOLE GPU, so the GPU needs need / share.
QWEN3_VL_8B_WEIGHTS_GIB = 16.3
QWEN3_VL_8B_KV_KIB_PER_TOKEN = 144
# SAM3 image model: 840.5 M parameters kept in fp32 (3.1 GiB), plus about 0.3 GiB per phrase
# grounded in one batch (9.5 GiB measured for 32 phrases in bf16, docs/PERFORMANCE.md), plus the
# CUDA context and cuDNN workspace (about 1 GiB).
SAM3_WEIGHTS_GIB = 3.2
SAM3_GIB_PER_PHRASE = 0.3
SAM3_OVERHEAD_GIB = 1.0

# What each stage imports, as (module[:attribute], pip package or install step).
SAM3_IMPORTS = [
    (module, SAM3_PIP_NAMES.get(module, module))
    for module in (
        "torch",
        "numpy",
        "einops",  # up: sam3/sam/rope.py:13 (not declared by sam3)
        "psutil",  # up: sam3/model/sam3_video_predictor.py:15 (not declared by sam3)
        "decord",  # up: sam3/train/data/sam3_image_dataset.py:18 (x86-64 wheels only)
        "iopath",
        "timm",
        "pycocotools",
        "cv2",
        "open_clip",
        "openai",
    )
] + [("sam3.model_builder:build_sam3_image_model", "-e ./sam3")]
# up: sam-3d-objects notebook/inference.py:11-34 (cf06676) and what it pulls in
# (sam3d_objects/pipeline/inference_utils.py:4 imports open3d). The value is upstream's pip step
# (doc/setup.md) that installs the module.
SAM3D_IMPORTS = [
    ("numpy", "'.[dev]'"),
    ("PIL", "'.[dev]'"),
    ("omegaconf", "'.[dev]'"),
    ("hydra.utils:instantiate", "'.[dev]'"),
    ("torch", "'.[dev]'"),
    ("utils3d", "'.[dev]'"),
    ("open3d", "'.[dev]'"),
    ("trimesh", "'.[dev]'"),
    ("loguru", "'.[dev]'"),
    ("pytorch3d.transforms:quaternion_multiply", "'.[p3d]'"),
    ("seaborn", "'.[inference]'"),
    ("gradio", "'.[inference]'"),
    ("matplotlib.pyplot", "'.[dev]'"),
    ("kaolin.visualize:IpyTurntableVisualizer", "'.[inference]'"),
    ("kaolin.render.camera:Camera", "'.[inference]'"),
    ("sam3d_objects", "'.[dev]'"),
    ("sam3d_objects.pipeline.inference_pipeline_pointmap:InferencePipelinePointMap", "'.[dev]'"),
]
VLLM_IMPORTS = [("torch", ""), ("vllm", "")]  # what `vllm serve` needs first
SAM3_ONLY = {"einops", "psutil", "decord", "iopath", "timm"}  # imported by sam3 alone, not by our code
CV2_DISTS = ["opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"]

# Runs inside an env's python: argv[1] = JSON list of imports, argv[2] = JSON list of distributions.
# Prints "probe: <import>" to stderr before each import, so a crash names it; JSON on stdout.
PROBE = r"""
import importlib, json, platform, sys
from importlib import metadata
out = {"python": sys.version.split()[0], "machine": platform.machine(), "prefix": sys.prefix, "imports": {}, "dists": {}}
for spec in json.loads(sys.argv[1]):
    mod, _, attr = spec.partition(":")
    print("probe:", spec, file=sys.stderr, flush=True)
    try:
        m = importlib.import_module(mod)
        if attr:
            getattr(m, attr)
        out["imports"][spec] = None
    except BaseException as exc:
        text = str(exc).strip().splitlines()
        out["imports"][spec] = {"type": type(exc).__name__, "msg": text[0][:300] if text else "", "name": getattr(exc, "name", None)}
for dist in json.loads(sys.argv[2]):
    try:
        out["dists"][dist] = metadata.version(dist)
    except Exception:
        out["dists"][dist] = None
torch = sys.modules.get("torch")
if torch is not None:
    out["torch"] = [torch.__version__, getattr(torch.version, "cuda", None)]
vllm = sys.modules.get("vllm")
if vllm is not None:
    out["vllm"] = getattr(vllm, "__version__", None)
print(json.dumps(out))
"""


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


@dataclass
class EnvReport:
    """What PROBE found in one env; `crash` is set when the probe itself died."""

    imports: dict[str, dict | None]
    dists: dict[str, str | None]
    machine: str = ""
    torch: tuple[str, str | None] | None = None
    vllm: str | None = None
    crash: str = ""


def probe_env(python: Path, imports: list[str], dists: list[str], *, extra_env: dict | None = None, timeout: float = 300) -> EnvReport:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", **(extra_env or {})}
    try:
        proc = subprocess.run([str(python), "-c", PROBE, json.dumps(imports), json.dumps(dists)], capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return EnvReport({}, {}, crash=f"{type(exc).__name__}: {exc}")
    lines = proc.stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        data = None
    if proc.returncode != 0 or not isinstance(data, dict):
        at = [ln[len("probe: ") :] for ln in proc.stderr.splitlines() if ln.startswith("probe: ")]
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return EnvReport({}, {}, crash=f"{how} while importing {at[-1] if at else '(before any import)'} {tail[0][:200]}".strip())
    return EnvReport(data["imports"], data["dists"], data.get("machine", ""), tuple(data["torch"]) if data.get("torch") else None, data.get("vllm"))


def gpus() -> list[tuple[str, float]]:
    """(name, GiB) per GPU, from nvidia-smi."""
    result = []
    for row in nvidia_smi("name", "memory.total"):
        try:
            result.append((",".join(row[:-1]), float(row[-1]) / 1024))
        except (ValueError, IndexError):
            continue
    return result


def driver_version() -> str | None:
    rows = nvidia_smi("driver_version")
    return rows[0][0] if rows and rows[0] and rows[0][0] else None


def min_driver(cuda: str) -> tuple[int, int]:
    """(driver branch of CUDA `cuda`'s GA release, the oldest branch that runs it at all through
    minor version compatibility). A minor release newer than the table takes its major's newest entry."""
    m = re.match(r"(\d+)\.(\d+)", cuda)
    if not m:
        raise ValueError(f"not a CUDA version: {cuda!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    known = [(k, v) for k, v in TOOLKIT_DRIVER.items() if k[0] == major]
    if not known:
        raise ValueError(f"CUDA {cuda} is not in doctor's driver table")
    at_or_below = [v for k, v in known if k[1] <= minor]
    ga = max(at_or_below) if at_or_below else min(v for _, v in known)
    return ga, MINOR_COMPAT_FLOOR.get(major, ga)


def cuda_driver_check(env_label: str, torch_info: tuple[str, str | None] | None, driver: str | None, fix_old_driver: str) -> Check | None:
    """torch's CUDA build in an env against the installed NVIDIA driver."""
    if torch_info is None or driver is None:
        return None
    version, cuda = torch_info
    name = f"torch CUDA vs NVIDIA driver ({env_label} env)"
    if not cuda:
        return Check(name, False, f"torch {version} is a CPU-only build", fix_old_driver)
    ga, floor = min_driver(cuda)
    have = int(driver.split(".")[0])
    detail = f"torch {version} is built for CUDA {cuda} (driver >= {ga}); the driver is {driver}"
    if have >= ga:
        return Check(name, True, detail)
    if have >= floor:
        return Check(name, False, detail + f": runs through CUDA minor version compatibility (>= {floor}), without PTX JIT", f"upgrade the NVIDIA driver to R{ga} or newer", required=False)
    return Check(name, False, detail + f": CUDA {cuda} cannot start", fix_old_driver)


def _pinned_vllm() -> dict[str, str]:
    """{cuda flavour: the vllm release pinned in its requirements file}."""
    pins = {}
    for flavour, path in VLLM_REQUIREMENTS.items():
        if path.is_file():
            m = re.search(r"^vllm==(\S+)", path.read_text(), re.M)
            if m:
                pins[flavour] = m.group(1)
    return pins


def vllm_gpu_need(server: VLMServerConfig) -> tuple[float, float, str] | None:
    """(GiB vLLM needs, its share of the GPU, how) for the served model with these settings, or
    None for a model whose size doctor does not know."""
    if "qwen3-vl-8b" not in str(server.vlm_model_id).lower():
        return None
    given = getattr(server, "gpu_memory_utilization", None)
    share = float(given) if isinstance(given, int | float) and given > 0 else SCENE_SHARE  # scene mode's default: vLLM stops before SAM3
    tp = max(1, int(getattr(server, "tensor_parallel_size", 1) or 1))
    kv = server.max_model_len * QWEN3_VL_8B_KV_KIB_PER_TOKEN / 2**20
    need = (QWEN3_VL_8B_WEIGHTS_GIB + kv) / tp + VLLM_OVERHEAD_GIB
    how = f"{QWEN3_VL_8B_WEIGHTS_GIB:g} GiB weights + {kv:.1f} GiB KV for --max-model-len {server.max_model_len}" + (f", split over {tp} GPUs" if tp > 1 else "") + f" + {VLLM_OVERHEAD_GIB:g} GiB, at --gpu-memory-utilization {share:g}" + ("" if given else " (scene mode's default)")
    return need, share, how


def sam3_gpu_need(seg: SegmenterConfig) -> float:
    return SAM3_WEIGHTS_GIB + SAM3_GIB_PER_PHRASE * seg.sam3_phrase_batch + SAM3_OVERHEAD_GIB


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _import_problem(result: dict) -> str:
    return f"{result['type']}: {result['msg']}" if result.get("msg") else result["type"]


def import_checks(env_label: str, rep: EnvReport, specs: list[str], fix_for) -> list[Check]:
    """One check listing the imports that work, then one per import that fails, with its fix."""
    good = [s.split(":")[0] for s in specs if s in rep.imports and rep.imports[s] is None]
    checks = [Check(f"imports ({env_label} env)", True, ", ".join(good))] if good else []
    for spec in specs:
        result = rep.imports.get(spec)
        if result is not None:
            checks.append(Check(f"import {spec.split(':')[0]} ({env_label} env)", False, _import_problem(result), fix_for(spec, result)))
    return checks


def sam3_checks(py: Path, seg: SegmenterConfig, driver: str | None) -> list[Check]:
    rep = probe_env(py, [spec for spec, _ in SAM3_IMPORTS], ["numpy"] + CV2_DISTS)
    if rep.crash:
        return [Check("sam3 env imports", False, f"the probe died: {rep.crash}", f"bash envs/setup.sh sam3   (then: {_q(py)} -c 'import sam3.model_builder')")]
    pip = f"{_q(py)} -m pip install -c {_q(SAM3_CONSTRAINTS)}"
    packages = {spec.split(":")[0].split(".")[0]: package for spec, package in SAM3_IMPORTS}
    x86 = rep.machine == "x86_64"

    def fix_for(spec: str, result: dict) -> str:
        top = spec.split(".")[0]
        missing = (result.get("name") or "").split(".")[0]
        if top == "sam3" and missing and missing != "sam3":  # one of sam3's own imports
            top = missing
        if top == "sam3":
            if not x86:
                return f"{pip} sam3==0.1.4   (decord, which the pinned sam3 imports at load, has no {rep.machine} wheel; 0.1.4 imports it lazily)"
            return f"cd {_q(ROOT)} && {pip} -e ./sam3   (the pinned submodule; `git submodule update --init sam3` first)"
        return f"{pip} {packages.get(top, top)}"

    specs = [spec for spec, _ in SAM3_IMPORTS if x86 or not spec.startswith("decord")]
    if rep.imports.get(SAM3_IMPORTS[-1][0], "missing") is None:
        # sam3 imports: what only sam3 needs is there or not needed by this sam3 (0.1.4 imports decord lazily)
        specs = [spec for spec in specs if spec not in SAM3_ONLY or rep.imports.get(spec) is None]
    checks = import_checks("sam3", rep, specs, fix_for)
    numpy = rep.dists.get("numpy")
    if numpy and numpy != "1.26.0":
        checks.append(Check("numpy (sam3 env)", False, f"numpy {numpy}; the pinned sam3 declares numpy==1.26", f"{pip} numpy==1.26.0", required=False))
    cv2 = [d for d in CV2_DISTS if rep.dists.get(d)]
    if len(cv2) > 1:
        checks.append(Check("one cv2 distribution (sam3 env)", False, f"{', '.join(cv2)} all write cv2/", f"{_q(py)} -m pip uninstall -y {' '.join(cv2)} && {pip} opencv-python-headless"))
    bpe_arg = repr(str(seg.sam3_bpe)) if seg.sam3_bpe else "None"
    ok, msg = probe(py, f"from pipeline.masks.sam3 import resolve_bpe_path; print(resolve_bpe_path({bpe_arg}))")
    checks.append(Check("SAM3 BPE vocab (bpe_simple_vocab_16e6.txt.gz)", ok, msg, f"{pip} open_clip_torch   (or pass --sam3-bpe FILE)"))
    c = cuda_driver_check("sam3", rep.torch, driver, f"upgrade the NVIDIA driver to R{min_driver(rep.torch[1])[0]}+" if rep.torch and rep.torch[1] else f"{pip} torch==2.7.1   (PyPI's CUDA 12.6 build)")
    if c:
        checks.append(c)
    return checks


def sam3d_checks(py: Path, prefix: Path, root: Path, driver: str | None) -> list[Check]:
    # up: notebook/inference.py:5-6 sets CUDA_HOME from CONDA_PREFIX and LIDRA_SKIP_INIT before importing sam3d_objects
    rep = probe_env(py, [spec for spec, _ in SAM3D_IMPORTS], ["numpy"] + CV2_DISTS, extra_env={"CONDA_PREFIX": str(prefix), "LIDRA_SKIP_INIT": "true"})
    rerun = "bash envs/setup.sh sam3d"
    if rep.crash:
        return [Check("sam3d-objects env imports (upstream's notebook/inference.py)", False, f"the probe died: {rep.crash}", f"{rerun}   (a crash in open3d usually means numpy >= 2: {_q(py)} -m pip install 'numpy<2')")]
    steps = dict(SAM3D_IMPORTS)
    checks = import_checks("sam3d-objects", rep, list(steps), lambda spec, _: f"{rerun}   (re-runs upstream's `pip install -e {steps[spec]}` in {root}, inside the activated env)")
    numpy = rep.dists.get("numpy")
    if numpy and int(numpy.split(".")[0]) >= 2:
        checks.append(Check("numpy < 2 (sam3d-objects env)", False, f"numpy {numpy}: upstream's open3d 0.18.0 crashes with numpy 2", f"{_q(py)} -m pip install 'numpy<2'"))
    elif numpy:
        checks.append(Check("numpy < 2 (sam3d-objects env)", True, f"numpy {numpy}"))
    others = [d for d in CV2_DISTS if d != "opencv-python" and rep.dists.get(d)]
    if others:
        checks.append(
            Check(
                "one cv2 distribution (sam3d-objects env)",
                False,
                f"{', '.join(others)} beside upstream's opencv-python {rep.dists.get('opencv-python')}: both write cv2/",
                f"{_q(py)} -m pip uninstall -y {' '.join(others)} && {_q(py)} -m pip install --force-reinstall --no-deps opencv-python==4.9.0.80",
            )
        )
    c = cuda_driver_check("sam3d-objects", rep.torch, driver, "upgrade the NVIDIA driver: upstream's env is CUDA 12.1 (driver >= 530)")
    if c:
        checks.append(c)
    return checks


def vllm_checks(py: Path, driver: str | None) -> list[Check]:
    rep = probe_env(py, [spec for spec, _ in VLLM_IMPORTS], [])
    env = ENV_NAMES["vllm"]
    if rep.crash:
        return [Check("import vllm, torch (vllm env)", False, f"the probe died: {rep.crash}", "bash envs/setup.sh vllm")]
    checks = import_checks("vllm", rep, [spec for spec, _ in VLLM_IMPORTS], lambda spec, _: "bash envs/setup.sh vllm")
    pins = _pinned_vllm()
    if rep.vllm and pins and rep.vllm not in pins.values():
        want = " or ".join(f"{v} (CUDA {k})" for k, v in pins.items())
        checks.append(Check("vllm release (vllm env)", False, f"vllm {rep.vllm}; the project is tested with {want}", "bash envs/setup.sh vllm   (installs the pinned release)", required=False))
    elif rep.vllm:
        checks.append(Check("vllm release (vllm env)", True, f"vllm {rep.vllm}"))
    recreate = f"conda env remove -n {env} && SAM3DGS_VLLM_CUDA=12 bash envs/setup.sh vllm"
    c = cuda_driver_check("vllm", rep.torch, driver, f"upgrade the NVIDIA driver to R580+ (vLLM {pins.get('13', '')} is a CUDA 13 build), or use the CUDA 12.8 flavour: {recreate}")
    if c:
        checks.append(c)
    return checks


def gpu_memory_checks(found: list[tuple[str, float]], seg: SegmenterConfig, lifter: LifterConfig, server: VLMServerConfig) -> list[Check]:
    best = max(g for _, g in found)
    checks = []
    v = vllm_gpu_need(server)
    if v is not None:
        need, share, how = v
        total = need / share
        checks.append(
            Check(
                f"GPU memory >= {total:.0f} GiB (vLLM, {server.vlm_model_id})",
                best >= total,
                f"largest GPU has {best:.0f} GiB; vLLM needs about {need:.0f} GiB ({how})",
                "use a GPU of about 40 GB, or lower --max-model-len, or point --vlm-url at a VLM served elsewhere",
            )
        )
    s3 = sam3_gpu_need(seg)
    checks.append(Check(f"GPU memory >= {s3:.0f} GiB (SAM3, --sam3-phrase-batch {seg.sam3_phrase_batch})", best >= s3, f"largest GPU has {best:.0f} GiB", "lower --sam3-phrase-batch (about 0.3 GiB per phrase)"))
    if v is not None:
        both = v[0] + s3
        checks.append(
            Check(
                f"GPU memory >= {both:.0f} GiB (query mode: vLLM and SAM3 at once)",
                best >= both,
                f"largest GPU has {best:.0f} GiB",
                "use scene mode (the default: vLLM stops before SAM3), or --vlm-url with a VLM served on another GPU",
                required=False,
            )
        )
    need = float(lifter.sam3d_min_gpu_gib)  # the same bound the SAM 3D lifter enforces
    checks.append(Check(f"GPU memory >= {need:g} GiB (SAM 3D Objects)", best >= need, f"largest GPU has {best:.0f} GiB", "use a GPU with about 32 GB for stage 2 (or lower --sam3d-min-gpu-gib at your own risk)"))
    return checks


def offline_cache_checks() -> list[Check]:
    """What upstream SAM 3D downloads by itself on its first load (DINOv2 through torch.hub, MoGe
    through the Hugging Face cache): warnings, since a machine with internet fetches them."""
    from pipeline.objects.sam3d import DINOV2_WEIGHTS_URL, MOGE_REPO_ID, first_load_downloads, torch_hub_dir

    fixes = {
        "DINOv2 code": f"TORCH_HOME={_q(torch_hub_dir().parent)} python -c \"import torch; torch.hub.list('facebookresearch/dinov2', trust_repo=True)\"   (on a machine with internet; then export TORCH_HOME on the GPU node)",
        "DINOv2 weights": f"mkdir -p {_q(torch_hub_dir() / 'checkpoints')} && curl -L -o {_q(torch_hub_dir() / 'checkpoints' / Path(DINOV2_WEIGHTS_URL).name)} {DINOV2_WEIGHTS_URL}",
        "MoGe weights": f"HF_HOME=<a shared folder> hf download {MOGE_REPO_ID}   (then export HF_HOME on the GPU node)",
    }
    checks = []
    for what, path, present in first_load_downloads():
        fix = next((f for k, f in fixes.items() if what.startswith(k)), "see docs/SAM3D.md")
        checks.append(Check(f"SAM 3D first-load cache: {what}", present, str(path), fix + "; without it the first SAM 3D load downloads it", required=False))
    return checks


def collect(seg: SegmenterConfig, lifter: LifterConfig, server: VLMServerConfig) -> list[Check]:
    checks: list[Check] = []
    conda = find_conda()
    checks.append(Check("conda", conda is not None, conda or "not found", "install Miniforge (https://conda-forge.org/download) or set CONDA_EXE"))
    envs = conda_envs(conda) if conda else {}
    prefixes: dict[str, Path | None] = {}
    for key, name in ENV_NAMES.items():
        prefix = envs.get(name)
        prefixes[key] = prefix
        checks.append(Check(f"conda env '{name}'", prefix is not None, str(prefix) if prefix else "missing", f"bash envs/setup.sh {key}"))
    pythons = {k: (p / "bin" / "python" if p else None) for k, p in prefixes.items()}

    found = gpus()
    driver = driver_version() if found else None
    checks.append(Check("CUDA GPU", bool(found), ", ".join(f"{n} ({g:.0f} GiB)" for n, g in found) + (f", driver {driver}" if driver else "") or "nvidia-smi found no GPU", "run on a machine with an NVIDIA GPU and driver"))
    if found:
        checks += gpu_memory_checks(found, seg, lifter, server)

    vllm_py = pythons["vllm"]
    vllm_exe = vllm_py.parent / "vllm" if vllm_py else (Path(shutil.which(server.vllm_command)) if shutil.which(server.vllm_command) else None)
    checks.append(Check("vllm executable", bool(vllm_exe and vllm_exe.exists()), str(vllm_exe) if vllm_exe else f"'{server.vllm_command}' not found", "bash envs/setup.sh vllm"))
    if vllm_py:
        checks += vllm_checks(vllm_py, driver)

    if pythons["sam3"]:
        checks += sam3_checks(pythons["sam3"], seg, driver)

    root = sam3d_root(lifter)
    has_checkout = (root / "notebook" / "inference.py").is_file()
    checks.append(Check("sam-3d-objects checkout", has_checkout, str(root), "git submodule update --init sam-3d-objects   (or --sam3d-root DIR)"))
    ckpt = root / "checkpoints" / lifter.checkpoint_tag / "pipeline.yaml"
    checks.append(Check(f"SAM 3D checkpoints ({lifter.checkpoint_tag})", ckpt.is_file(), str(ckpt), "export HF_TOKEN=... (after accepting the licence at huggingface.co/facebook/sam-3d-objects); they download on first use"))
    if pythons["sam3d"] and prefixes["sam3d"]:
        checks += sam3d_checks(pythons["sam3d"], prefixes["sam3d"], root, driver)
    checks += offline_cache_checks()

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
