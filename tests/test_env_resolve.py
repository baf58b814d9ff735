"""Each conda env's pip requirement set, resolved against the real registry (PyPI), checked for the
outcomes that broke real setups (audits/sam3.md F2, audits/sam3d-objects.md F1, audits/vllm-qwen3vl.md #1).

`pip install --dry-run --report --ignore-installed` with the env's Python version and a linux
x86-64 platform (`--only-binary=:all:`, as pip requires for a foreign target), with this
machine's pip configuration switched off. Each set is resolved exactly as envs/setup.sh installs
it: the same -r / -c files, one pip step at a time, because pip only sees the requirements of
one command (packages already in the env are not re-checked; `-U` re-resolves what is listed).
Skipped only when the registry cannot be reached, and never in CI (CI=true: it fails instead).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.slow

ENVS = ROOT / "envs"
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(17, 36)] + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
CV2_DISTS = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}

# What the pinned sam3 (2d1cbae) declares, up: sam3/pyproject.toml:27-36. Checked against the
# submodule when it is checked out (test_sam3_pins_match_the_submodule).
SAM3_DECLARED = ["timm>=1.0.17", "numpy==1.26", "tqdm", "ftfy==6.1.1", "regex", "iopath>=0.1.10", "typing_extensions", "huggingface_hub"]
# What upstream's sam3d-objects env holds that our pip step must not move (cf06676):
SAM3D_UPSTREAM = [
    "numpy<2",  # up: requirements.txt:70 sagemaker==2.242.0 declares numpy<2.0
    "open3d==0.18.0",  # up: requirements.txt:46 (crashes with numpy 2)
    "opencv-python==4.9.0.80",  # up: requirements.txt:47
    "pillow<12",  # up: requirements.inference.txt:4 gradio==5.49.0 declares pillow<12.0
    "huggingface-hub<2",  # the same gradio declares huggingface-hub<2.0
]


def _registry() -> None:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=15).close()
    except OSError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PyPI is unreachable in CI, where it must be reachable: {exc}")
        pytest.skip(f"PyPI (https://pypi.org) is unreachable from here: {exc}")


def _pip(tmp_path: Path, args: list[str], python: str, *, deps: bool = True) -> tuple[subprocess.Popen, Path]:
    """Start `pip install --dry-run --report` for ARGS as a linux x86-64 CPython `python` would."""
    _registry()
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "--target", str(tmp_path / "target")]
    cmd += ["--only-binary=:all:", "--implementation", "cp", "--python-version", python] + [f"--platform={p}" for p in PLATFORMS]
    cmd += [] if deps else ["--no-deps"]
    with open(report.with_suffix(".log"), "w") as log:  # a file, not a pipe: two run at once
        proc = subprocess.Popen(cmd + args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, report


def _report(job: tuple[subprocess.Popen, Path], args: list[str]) -> dict[str, dict]:
    """{canonical name: the report's metadata} of what the started pip would install."""
    proc, report = job
    proc.wait(timeout=600)
    assert proc.returncode == 0, f"pip could not resolve {args}:\n{report.with_suffix('.log').read_text()[-3000:]}"
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}


def resolve(tmp_path: Path, args: list[str], python: str, *, deps: bool = True) -> dict[str, dict]:
    return _report(_pip(tmp_path, args, python, deps=deps), args)


@pytest.fixture(scope="module")
def env_sets(tmp_path_factory) -> dict[str, tuple[list[str], tuple[subprocess.Popen, Path]]]:
    """The sam3 (Python 3.12) and sam3d-objects (3.11, upstream's) sets, resolved at the same time."""
    tmp = tmp_path_factory.mktemp("resolve")
    jobs = {env: (pip_set(env), _pip(tmp / env, pip_set(env), python)) for env, python in (("sam3", "3.12"), ("sam3d", "3.11"))}
    yield jobs
    for _, (proc, _) in jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _yml_pip(name: str) -> list[str]:
    """The pip: list of an env file (the layout before envs/*-requirements.txt), as requirements."""
    lines, inside = [], False
    for raw in (ENVS / name).read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.strip() == "- pip:":
            inside = True
        elif inside and line.strip().startswith("- ") and not line.strip()[2:].startswith("-"):
            lines.append(line.strip()[2:].strip())
    return lines


def pip_set(env: str) -> list[str]:
    """pip arguments of the step envs/setup.sh runs for `env`'s own list."""
    files = {"sam3": ("sam3-requirements.txt", "sam3-constraints.txt", "sam3.yml"), "sam3d": ("sam3d-objects-requirements.txt", "sam3d-objects-constraints.txt", "sam3d-objects.yml")}[env]
    req, con, yml = files
    if (ENVS / req).exists():
        return ["-r", f"envs/{req}"] + (["-c", f"envs/{con}"] if (ENVS / con).exists() else [])
    return _yml_pip(yml)  # older layout: conda installs the yml's pip list (with -U on `env update`)


def _check_pins(resolved: dict[str, dict], pins: list[str], what: str) -> None:
    for pin in pins:
        r = Requirement(pin)
        got = resolved.get(canonicalize_name(r.name))
        if got is not None:
            assert r.specifier.contains(got["version"], prereleases=True), f"{what} installs {r.name} {got['version']}, against {pin}"


def test_sam3_pins_match_the_submodule():
    pyproject = ROOT / "sam3" / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("the sam3 submodule is not checked out (git submodule update --init sam3)")
    import tomllib

    assert tomllib.loads(pyproject.read_text())["project"]["dependencies"] == SAM3_DECLARED


def test_sam3_env_resolves_to_what_the_pinned_sam3_needs(env_sets):
    """The first pip step of the sam3 env (torch, the imports sam3 does not declare, ours) already
    agrees with every pin the pinned sam3 declares, so `pip install -e ./sam3` moves nothing
    (before: numpy 2.x and an opencv built for it, then sam3's numpy==1.26 pulled numpy back)."""
    got = _report(env_sets["sam3"][1], env_sets["sam3"][0])
    _check_pins(got, SAM3_DECLARED, "the sam3 env's first pip step")
    assert got["numpy"]["version"] == "1.26.0"
    assert {"einops", "psutil", "decord", "torch", "open-clip-torch"} <= set(got), sorted(got)
    assert len(CV2_DISTS & set(got)) == 1, sorted(CV2_DISTS & set(got))
    cv2 = next(got[n] for n in CV2_DISTS & set(got))
    for dep in cv2.get("requires_dist", []):  # the cv2 wheel must work with that numpy
        r = Requirement(dep)
        if r.name == "numpy" and (r.marker is None or r.marker.evaluate({"python_version": "3.12", "python_full_version": "3.12.0"})):
            assert r.specifier.contains("1.26.0"), f"{cv2['name']} {cv2['version']} needs {dep}"
    assert got["torch"]["version"] == "2.7.1"
    assert any(d.startswith("nvidia-cuda-runtime-cu12==12.6") for d in got["torch"]["requires_dist"])  # the CUDA 12.6 build


def test_sam3d_objects_step_keeps_upstreams_numpy_and_cv2(env_sets):
    """Our pip step in upstream's env, resolved alone as pip resolves it: numpy stays < 2, no
    opencv-python-headless beside upstream's opencv-python, nothing moved off upstream's pins."""
    got = _report(env_sets["sam3d"][1], env_sets["sam3d"][0])
    if "numpy" in got:
        assert Version(got["numpy"]["version"]) < Version("2"), f"numpy {got['numpy']['version']} (open3d 0.18 crashes with numpy 2)"
    assert not (CV2_DISTS - {"opencv-python"}) & set(got), "a second cv2 distribution beside upstream's opencv-python"
    _check_pins(got, SAM3D_UPSTREAM, "our pip step in the sam3d-objects env")
    assert "trimesh" in got


def _pinned(file: str, name: str) -> str:
    pins = [Requirement(line.split("#", 1)[0]) for line in (ENVS / file).read_text().splitlines() if line.split("#", 1)[0].strip() and not line.startswith("-")]
    exact = [str(r.specifier)[2:] for r in pins if canonicalize_name(r.name) == name and str(r.specifier).startswith("==") and "," not in str(r.specifier)]
    assert len(exact) == 1, f"envs/{file} does not pin exactly one {name} release: {[str(r) for r in pins if r.name == name]}"
    return exact[0]


def _torch_cuda(meta: dict) -> str:
    """The CUDA major.minor a PyPI torch wheel is built for, from its nvidia/cuda-toolkit requirements."""
    for dep in meta.get("requires_dist", []):
        m = re.match(r"(?:cuda-toolkit\[[^]]*\]|nvidia-cuda-runtime-cu\d+|nvidia-cuda-runtime)==(\d+)\.(\d+)", dep.replace(" ", ""))
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    raise AssertionError(f"torch {meta['version']} names no CUDA runtime: {meta.get('requires_dist')}")


@pytest.mark.parametrize(("file", "cuda", "driver"), [("vllm-requirements.txt", "13.0", 580), ("vllm-cu12-requirements.txt", "12.8", 570)])
def test_vllm_pin_and_its_cuda_flavour(tmp_path: Path, file: str, cuda: str, driver: int):
    """One exact vLLM release per flavour; its torch's CUDA build is the one the file states, and
    the driver it names is what doctor requires for that CUDA."""
    from pipeline.doctor import min_driver

    if not (ENVS / file).exists():
        pytest.fail(f"envs/{file} is missing: the vllm env has no pinned release")
    version = _pinned(file, "vllm")
    vllm = resolve(tmp_path, [f"vllm=={version}"], "3.12", deps=False)["vllm"]
    torch_pin = [d for d in vllm["requires_dist"] if re.match(r"torch\s*==", d)]
    assert len(torch_pin) == 1, vllm["requires_dist"]
    torch = resolve(tmp_path, [torch_pin[0]], "3.12", deps=False)["torch"]
    assert _torch_cuda(torch) == cuda
    assert min_driver(cuda)[0] == driver
    assert f"driver >= {driver}" in (ENVS / file).read_text()
