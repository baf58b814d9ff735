"""doctor against fake conda envs and a fake nvidia-smi: every gap is named with its exact fix.

Each fake env prefix has a `bin/python` that runs this interpreter without its site-packages
(`-S`) on a folder of stub modules, stub dist-info folders (what `importlib.metadata` reads) and
links to the few real packages our own probe code needs (numpy, PIL, trimesh), so the
probe doctor runs inside the env meets a good or a broken env: a missing module, a module that
raises, numpy 2 beside upstream's open3d, two cv2 distributions, a crash on import, a torch
built for a CUDA newer than the driver.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

FAKE_CONDA = ROOT / "tests" / "fixtures" / "fake_conda" / "conda"


def _doctor(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "doctor", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_doctor_without_anything_names_each_fix(tmp_path: Path):
    proc = _doctor({"CONDA_EXE": "", "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "HOME": str(tmp_path), "HF_TOKEN": "", "SAM3D_ROOT": str(tmp_path / "nope")})
    assert proc.returncode == 1
    out = proc.stdout
    assert "MISSING  conda " in out
    assert "bash envs/setup.sh sam3d" in out and "bash envs/setup.sh vllm" in out
    assert "git submodule update --init sam-3d-objects" in out
    assert "export HF_TOKEN" in out


# ---------------------------------------------------------------------------------------------
# Fake envs


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _dist(name: str, version: str) -> dict[str, str]:
    return {f"{name.replace('-', '_')}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}


def _torch(version: str, cuda: str | None) -> dict[str, str]:
    return {"torch/__init__.py": f"__version__ = {version!r}\nclass version:\n    cuda = {cuda!r}\n"}


SAM3_GOOD = {
    **_torch("2.7.1+cu126", "12.6"),
    **_dist("numpy", "1.26.0"),
    **_dist("opencv-python-headless", "4.11.0.86"),
    "einops/__init__.py": "",
    "psutil/__init__.py": "",
    "decord/__init__.py": "",
    "iopath/__init__.py": "",
    "timm/__init__.py": "",
    "open_clip/__init__.py": "",
    "pycocotools/__init__.py": "",
    "cv2/__init__.py": "",
    "openai/__init__.py": "",
    "sam3/__init__.py": "",
    # like the pinned sam3: model_builder reaches einops (sam/rope.py), decord and psutil at import
    "sam3/model_builder.py": "import einops, decord, psutil\ndef build_sam3_image_model(**kw):\n    pass\n",
    "sam3/assets/bpe_simple_vocab_16e6.txt.gz": "",
}
SAM3D_GOOD = {
    **_torch("2.5.1+cu121", "12.1"),
    **_dist("numpy", "1.26.4"),
    **_dist("opencv-python", "4.9.0.80"),
    "omegaconf/__init__.py": "",
    "hydra/__init__.py": "",
    "hydra/utils.py": "def instantiate(*a, **k):\n    pass\n",
    "utils3d/__init__.py": "",
    "open3d/__init__.py": "",
    "loguru/__init__.py": "",
    "pytorch3d/__init__.py": "",
    "pytorch3d/transforms.py": "def quaternion_multiply(a, b):\n    pass\n",
    "seaborn/__init__.py": "",
    "gradio/__init__.py": "",
    "matplotlib/__init__.py": "",
    "matplotlib/pyplot.py": "",
    "kaolin/__init__.py": "",
    "kaolin/visualize.py": "class IpyTurntableVisualizer:\n    pass\n",
    "kaolin/render/__init__.py": "",
    "kaolin/render/camera.py": "class Camera:\n    pass\n",
    # upstream's notebook/inference.py:5 needs CONDA_PREFIX; LIDRA_SKIP_INIT is set before sam3d_objects
    "sam3d_objects/__init__.py": "import os\nassert os.environ['LIDRA_SKIP_INIT'] == 'true' and os.environ['CONDA_PREFIX']\n",
    "sam3d_objects/pipeline/__init__.py": "",
    "sam3d_objects/pipeline/inference_pipeline_pointmap.py": "import open3d\nclass InferencePipelinePointMap:\n    pass\n",
}
VLLM_GOOD = {**_torch("2.14.0+cu130", "13.0"), "vllm/__init__.py": "__version__ = '0.33.0'\n"}


def make_env(root: Path, name: str, stubs: dict[str, str], *, real: tuple[str, ...] = (), vllm_exe: bool = False) -> Path:
    prefix = root / "envs" / name
    (prefix / "conda-meta").mkdir(parents=True)
    _write(prefix / "stubs", stubs)
    for package in real:  # this interpreter's own copy, linked in (and its bundled .libs)
        location = Path(importlib.util.find_spec(package).origin).parent
        for src in (location, location.with_name(location.name + ".libs"), location.with_name(package.lower() + ".libs")):
            if src.exists() and not (prefix / "stubs" / src.name).exists():
                (prefix / "stubs" / src.name).symlink_to(src)
    py = prefix / "bin" / "python"
    py.parent.mkdir()
    py.write_text(f'#!/bin/sh\nexport PYTHONPATH="{prefix / "stubs"}${{PYTHONPATH:+:$PYTHONPATH}}"\nexec {shlex.quote(sys.executable)} -S "$@"\n')
    py.chmod(0o755)
    if vllm_exe:
        (prefix / "bin" / "vllm").write_text("#!/bin/sh\n")
        (prefix / "bin" / "vllm").chmod(0o755)
    return prefix


def world(tmp_path: Path, *, sam3: dict, sam3d: dict, vllm: dict, driver: str = "580.95.05", gib: int = 80) -> dict:
    """Fake conda with the three envs, a fake nvidia-smi, a checkout with checkpoints: the env for doctor."""
    conda_root = tmp_path / "conda"
    make_env(conda_root, "sam3", sam3, real=("numpy",))
    make_env(conda_root, "sam3d-objects", sam3d, real=("numpy", "PIL", "trimesh"))
    make_env(conda_root, "vllm", vllm, vllm_exe=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\ncase \"$1\" in\n"
        f"  --query-gpu=name,memory.total) echo 'NVIDIA H100 80GB HBM3, {gib * 1024}' ;;\n"
        f"  --query-gpu=driver_version) echo '{driver}' ;;\n"
        "  *) exit 2 ;;\nesac\n"
    )
    smi.chmod(0o755)
    checkout = tmp_path / "sam-3d-objects"
    _write(checkout, {"notebook/inference.py": "", "checkpoints/hf/pipeline.yaml": ""})
    return {
        "CONDA_EXE": str(FAKE_CONDA),
        "FAKE_CONDA_ROOT": str(conda_root),
        "FAKE_CONDA_LOG": str(tmp_path / "calls.jsonl"),
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_TOKEN": "hf_test",
        "SAM3D_ROOT": str(checkout),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HOME": str(tmp_path / "hf"),
    }


def lines_of(out: str, name: str) -> list[str]:
    """The status line of check `name` and its fix line."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line[9:].startswith(name):
            return [line] + ([lines[i + 1].strip()] if i + 1 < len(lines) and lines[i + 1].strip().startswith("fix:") else [])
    raise AssertionError(f"no check {name!r} in:\n{out}")


def test_doctor_passes_good_envs(tmp_path: Path):
    proc = _doctor(world(tmp_path, sam3=SAM3_GOOD, sam3d=SAM3D_GOOD, vllm=VLLM_GOOD))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "everything the full profile needs is here." in out
    assert "build_sam3_image_model" not in out or "MISSING" not in out
    assert lines_of(out, "imports (sam3 env)")[0].startswith("ok") and "einops, psutil, decord" in out
    assert "sam3.model_builder" in lines_of(out, "imports (sam3 env)")[0]
    assert "kaolin.visualize" in lines_of(out, "imports (sam3d-objects env)")[0]
    assert "numpy 1.26.4" in lines_of(out, "numpy < 2 (sam3d-objects env)")[0]
    assert "vllm 0.33.0" in lines_of(out, "vllm release (vllm env)")[0]
    vllm_cuda = lines_of(out, "torch CUDA vs NVIDIA driver (vllm env)")[0]
    assert vllm_cuda.startswith("ok") and "CUDA 13.0 (driver >= 580)" in vllm_cuda and "580.95.05" in vllm_cuda
    # the GPU memory each stage needs with the defaults, each stated
    assert "vLLM needs about" in out and "GiB weights + " in out and "(SAM3, --sam3-phrase-batch" in out and "(SAM 3D Objects)" in out
    # offline caches: warnings with how to pre-seed them, not failures
    cache = lines_of(out, "SAM 3D first-load cache: DINOv2 weights")
    assert cache[0].startswith("warn") and str(tmp_path / "torch" / "hub" / "checkpoints") in cache[0] and "curl -L -o" in cache[1]
    moge = lines_of(out, "SAM 3D first-load cache: MoGe")
    assert moge[0].startswith("warn") and "HF_HOME" in moge[1]


def test_doctor_names_each_broken_piece_and_its_exact_fix(tmp_path: Path):
    sam3 = {k: v for k, v in SAM3_GOOD.items() if not k.startswith(("einops", "psutil", "decord"))}
    sam3d = {k: v for k, v in SAM3D_GOOD.items() if not k.startswith(("gradio", "numpy-"))}
    sam3d |= {**_dist("numpy", "2.3.5"), **_dist("opencv-python-headless", "5.0.0.93")}
    vllm = {**VLLM_GOOD, "vllm/__init__.py": "__version__ = '0.30.0'\n"}
    env = world(tmp_path, sam3=sam3, sam3d=sam3d, vllm=vllm, driver="550.54.15", gib=24)
    proc = _doctor(env)
    out = proc.stdout
    assert proc.returncode == 1
    sam3_py = tmp_path / "conda" / "envs" / "sam3" / "bin" / "python"
    pip = f"{sam3_py} -m pip install -c {ROOT / 'envs' / 'sam3-constraints.txt'}"
    for module, package in [("einops", "einops"), ("psutil", "psutil"), ("decord", "decord==0.6.0")]:
        status, fix = lines_of(out, f"import {module} (sam3 env)")
        assert status.startswith("MISSING") and f"No module named '{module}'" in status
        assert fix == f"fix: {pip} {package}"
    # sam3 itself fails on its first undeclared import, and the fix names that package
    status, fix = lines_of(out, "import sam3.model_builder (sam3 env)")
    assert "No module named 'einops'" in status and fix == f"fix: {pip} einops"

    s3d_py = tmp_path / "conda" / "envs" / "sam3d-objects" / "bin" / "python"
    status, fix = lines_of(out, "numpy < 2 (sam3d-objects env)")
    assert status.startswith("MISSING") and "numpy 2.3.5" in status and fix == f"fix: {s3d_py} -m pip install 'numpy<2'"
    status, fix = lines_of(out, "one cv2 distribution (sam3d-objects env)")
    assert "opencv-python-headless beside upstream's opencv-python 4.9.0.80" in status
    assert fix == f"fix: {s3d_py} -m pip uninstall -y opencv-python-headless && {s3d_py} -m pip install --force-reinstall --no-deps opencv-python==4.9.0.80"
    status, fix = lines_of(out, "import gradio (sam3d-objects env)")
    assert status.startswith("MISSING") and "bash envs/setup.sh sam3d" in fix and "'.[inference]'" in fix

    status, fix = lines_of(out, "torch CUDA vs NVIDIA driver (vllm env)")
    assert status.startswith("MISSING") and "CUDA 13.0" in status and "550.54.15" in status
    assert "conda env remove -n vllm && SAM3DGS_VLLM_CUDA=12 bash envs/setup.sh vllm" in fix and "R580" in fix
    status, fix = lines_of(out, "vllm release (vllm env)")
    assert status.startswith("warn") and "vllm 0.30.0" in status and "0.33.0" in status
    # cu126 torch on a 550 driver: runs through minor version compatibility, a warning only
    assert lines_of(out, "torch CUDA vs NVIDIA driver (sam3 env)")[0].startswith("warn")
    # a 24 GiB GPU: too small for vLLM's defaults and for SAM 3D
    assert lines_of(out, "GPU memory >= ")[0].startswith("MISSING")
    assert lines_of(out, "GPU memory >= 30 GiB (SAM 3D Objects)")[0].startswith("MISSING")
    query = next(line for line in out.splitlines() if "(query mode: vLLM and SAM3 at once)" in line)
    assert query.startswith("warn")  # scene mode, the default, does not need both at once


def test_doctor_names_the_import_a_crashing_probe_died_in(tmp_path: Path):
    sam3d = {**SAM3D_GOOD, "open3d/__init__.py": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"}
    proc = _doctor(world(tmp_path, sam3=SAM3_GOOD, sam3d=sam3d, vllm=VLLM_GOOD))
    status, fix = lines_of(proc.stdout, "sam3d-objects env imports")
    assert status.startswith("MISSING") and "killed by signal 11 while importing open3d" in status
    assert "numpy<2" in fix and "bash envs/setup.sh sam3d" in fix
    assert proc.returncode == 1


@pytest.mark.parametrize(("cuda", "ga", "floor"), [("13.0", 580, 580), ("12.8", 570, 525), ("12.6", 560, 525), ("12.4", 550, 525), ("12.1", 530, 525), ("12.7", 560, 525), ("13.2", 590, 580)])
def test_min_driver_follows_nvidias_table(cuda: str, ga: int, floor: int):
    from pipeline.doctor import min_driver

    assert min_driver(cuda) == (ga, floor)


def test_doctor_probes_upstream_sam3_for_real(tmp_path: Path):
    """doctor's probe against upstream's real SAM3 (PyPI 0.1.4, the test env .venv-sam3/ that
    run_tests.sh builds): `sam3.model_builder` really imports, its lazy decord is not demanded,
    and a module our own code needs (openai, absent there) gets its pip command."""
    from pipeline.core.config import SegmenterConfig
    from pipeline.doctor import SAM3_CONSTRAINTS, sam3_checks

    py = Path(os.environ.get("SAM3DGS_SAM3_TEST_VENV", ROOT / ".venv-sam3")) / "bin" / "python"
    if not py.exists():
        pytest.skip(f"no SAM3 test env at {py.parent.parent} (bash envs/sam3-test-env.sh creates it)")
    checks = {c.name: c for c in sam3_checks(py, SegmenterConfig(), None)}
    assert checks["imports (sam3 env)"].ok and "sam3.model_builder" in checks["imports (sam3 env)"].detail
    assert "einops" in checks["imports (sam3 env)"].detail and "psutil" in checks["imports (sam3 env)"].detail
    assert "import decord (sam3 env)" not in checks  # 0.1.4 imports it lazily
    if "import openai (sam3 env)" in checks:
        assert checks["import openai (sam3 env)"].fix == f"{py} -m pip install -c {SAM3_CONSTRAINTS} openai"
