"""envs/setup.sh against a fake conda (tests/fixtures/fake_conda) that records every call.

conda cannot run here, so the fake records what setup.sh asks of conda and of each env's python
(argv, cwd, CONDA_PREFIX, PATH, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, CC, CXX), and the tests assert
the order of the steps and that every pip step ran inside the activated env: upstream SAM 3D's
doc/setup.md steps with its variables (audits/sam3d-objects.md F3), nothing `-U`'d or
`conda env update`'d into upstream's env and no second cv2 distribution (F1), and the sam3 env
gets what the pinned sam3 imports (audits/sam3.md F2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

FAKE = ROOT / "tests" / "fixtures" / "fake_conda"
UPSTREAM_EXTRA_INDEX = "https://pypi.ngc.nvidia.com https://download.pytorch.org/whl/cu121"  # up: sam-3d-objects doc/setup.md:19
UPSTREAM_FIND_LINKS = "https://nvidia-kaolin.s3.us-east-2.amazonaws.com/torch-2.5.1_cu121.html"  # up: doc/setup.md:26


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of envs/ beside fake sam3/ and sam-3d-objects/ checkouts (a `.git` file each, so
    setup.sh does not fetch the submodules)."""
    proj = tmp_path / "proj"
    shutil.copytree(ROOT / "envs", proj / "envs", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "pyproject.toml").write_text("[project]\nname = 'sam3d-gs'\n")
    sam3 = proj / "sam3"
    sam3.mkdir()
    (sam3 / ".git").write_text("gitdir: nowhere\n")
    (sam3 / "pyproject.toml").write_text("[project]\nname = 'sam3'\n")
    s3d = proj / "sam-3d-objects"
    (s3d / "environments").mkdir(parents=True)
    (s3d / ".git").write_text("gitdir: nowhere\n")
    # The parts of upstream's environments/default.yml the fake conda acts on: the compilers and nvcc.
    (s3d / "environments" / "default.yml").write_text("name: sam3d-objects\ndependencies:\n  - cuda-nvcc=12.1.105\n  - gxx=12.4.0\n  - python=3.11.0\n")
    (s3d / "patching").mkdir()
    hydra = s3d / "patching" / "hydra"
    hydra.write_text("#!/usr/bin/env python\n")  # up: patching/hydra is a python script run through PATH's python
    hydra.chmod(0o755)
    return proj


def run_setup(project: Path, target: str, extra_env: dict | None = None, fake_bin: Path | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    root = project.parent / "conda"
    root.mkdir(exist_ok=True)
    log = project.parent / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "CONDA", "SAM3DGS_"))}
    env.update(
        CONDA_EXE=str(FAKE / "conda"),
        FAKE_CONDA_ROOT=str(root),
        FAKE_CONDA_LOG=str(log),
        HOME=str(project.parent),
        PATH=(f"{fake_bin}:" if fake_bin else "") + f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    env.update(extra_env or {})
    proc = subprocess.run(["bash", str(project / "envs" / "setup.sh"), target], cwd=project, capture_output=True, text=True, timeout=120, env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def pip_calls(calls: list[dict]) -> list[dict]:
    return [c for c in calls if c["prog"] == "python" and c["argv"][:3] == ["-m", "pip", "install"]]


def prefix(project: Path, name: str) -> str:
    return str(project.parent / "conda" / "envs" / name)


def assert_in_env(call: dict, project: Path, name: str) -> None:
    """The call ran with env `name` activated: its python, CONDA_PREFIX, PATH first entry."""
    p = prefix(project, name)
    assert call["exe"] == f"{p}/bin/python", call
    assert call["env"]["CONDA_PREFIX"] == p, call
    assert call["env"]["CONDA_DEFAULT_ENV"] == name, call
    assert call["env"]["PATH"].split(":")[0] == f"{p}/bin", call


def requirement_lines(project: Path, argv: list[str], cwd: str) -> list[str]:
    """Every requirement named in a pip argv, including the lines of its -r / -c files."""
    out = []
    it = iter(argv)
    for a in it:
        if a in ("-r", "-c", "--requirement", "--constraint"):
            f = Path(cwd) / next(it)
            out += [line.split("#", 1)[0].strip() for line in f.read_text().splitlines() if line.split("#", 1)[0].strip()]
        elif not a.startswith("-"):
            out.append(a)
    return out


def no_upgrade(calls: list[dict]) -> None:
    for c in calls:
        assert not {"-U", "--upgrade", "--force-reinstall"} & set(c["argv"]), c
        if c["prog"] == "conda":
            assert c["argv"][:2] != ["env", "update"], c


def test_sam3d_runs_upstream_steps_inside_the_activated_env(project: Path):
    proc, calls = run_setup(project, "sam3d")
    assert proc.returncode == 0, proc.stderr
    conda = [c["argv"] for c in calls if c["prog"] == "conda"]
    assert ["env", "create", "-n", "sam3d-objects", "-f", "sam-3d-objects/environments/default.yml"] in conda
    assert ["shell.bash", "hook"] in conda and ["_activated", "sam3d-objects"] in conda
    # activation comes after the env exists and before any pip step
    order = [tuple(c["argv"][:2]) for c in calls]
    assert order.index(("env", "create")) < order.index(("shell.bash", "hook")) < order.index(("_activated", "sam3d-objects")) < order.index(("-m", "pip"))

    pips = pip_calls(calls)
    s3d = str(project / "sam-3d-objects")
    steps = [c["argv"][3:] for c in pips]
    assert steps[:3] == [["--disable-pip-version-check", "-e", ".[dev]"], ["--disable-pip-version-check", "-e", ".[p3d]"], ["--disable-pip-version-check", "-e", ".[inference]"]]
    for c in pips[:3]:
        assert_in_env(c, project, "sam3d-objects")
        assert c["cwd"] == s3d
        assert c["env"]["PIP_EXTRA_INDEX_URL"] == UPSTREAM_EXTRA_INDEX  # exported before '.[dev]' and kept
        assert c["env"]["CC"] == f"{prefix(project, 'sam3d-objects')}/bin/x86_64-conda-linux-gnu-cc"  # the env's compiler
        assert c["env"]["CXX"].startswith(prefix(project, "sam3d-objects"))
    assert pips[0]["env"]["PIP_FIND_LINKS"] is None and pips[1]["env"]["PIP_FIND_LINKS"] is None
    assert pips[2]["env"]["PIP_FIND_LINKS"] == UPSTREAM_FIND_LINKS

    # the hydra patch: upstream's script, through the activated env's python, after '.[inference]'
    hydra = [i for i, c in enumerate(calls) if c["prog"] == "python" and c["argv"][:1] == ["./patching/hydra"]]
    assert len(hydra) == 1 and calls.index(pips[2]) < hydra[0] < calls.index(pips[3])
    assert_in_env(calls[hydra[0]], project, "sam3d-objects")
    assert calls[hydra[0]]["cwd"] == s3d

    # ours, after upstream's: gaps only, under numpy<2, then this project without deps
    assert len(pips) == 5
    for c in pips[3:]:
        assert_in_env(c, project, "sam3d-objects")
    ours = pips[3]["argv"]
    assert "-c" in ours and "-r" in ours
    lines = requirement_lines(project, ours, pips[3]["cwd"])
    assert "numpy<2" in lines and "opencv-python==4.9.0.80" in lines
    assert pips[4]["argv"][3:] == ["--disable-pip-version-check", "--no-deps", "-e", str(project)]
    no_upgrade(calls)
    for c in pips:
        assert not any(line.startswith("opencv-python-headless") for line in requirement_lines(project, c["argv"], c["cwd"])), c


def test_sam3d_rerun_fills_gaps_without_recreating_or_upgrading(project: Path):
    assert run_setup(project, "sam3d")[0].returncode == 0
    (project.parent / "calls.jsonl").unlink()
    proc, calls = run_setup(project, "sam3d")
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls if c["prog"] == "conda" and c["argv"][:2] == ["env", "create"]]
    assert len(pip_calls(calls)) == 5
    no_upgrade(calls)


def test_sam3_env_gets_what_the_pinned_sam3_imports(project: Path):
    proc, calls = run_setup(project, "sam3")
    assert proc.returncode == 0, proc.stderr
    assert ["env", "create", "-n", "sam3", "-f", "envs/sam3.yml"] in [c["argv"] for c in calls if c["prog"] == "conda"]
    pips = pip_calls(calls)
    assert len(pips) == 3
    for c in pips:
        assert_in_env(c, project, "sam3")
    first = requirement_lines(project, pips[0]["argv"], pips[0]["cwd"])
    names = {line.split(";")[0].split("==")[0].split(">=")[0].split("<")[0].strip().lower() for line in first}
    assert {"einops", "psutil", "decord", "torch", "open_clip_torch"} <= names, names
    assert any(line.startswith("decord") and 'platform_machine == "x86_64"' in line for line in first)
    assert "numpy==1.26.0" in first  # the pinned sam3's numpy==1.26, for every step
    assert pips[1]["argv"][-2:] == ["-e", "./sam3"] and "-c" in pips[1]["argv"]
    assert "numpy==1.26.0" in requirement_lines(project, pips[1]["argv"], pips[1]["cwd"])
    assert pips[2]["argv"][-3:] == ["--no-deps", "-e", str(project)]
    no_upgrade(calls)


def test_sam3_env_off_x86_64_takes_the_wheel_with_the_lazy_decord_import(project: Path, tmp_path: Path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    uname = fake_bin / "uname"
    uname.write_text("#!/bin/sh\necho aarch64\n")
    uname.chmod(0o755)
    proc, calls = run_setup(project, "sam3", fake_bin=fake_bin)
    assert proc.returncode == 0, proc.stderr
    pips = pip_calls(calls)
    assert "sam3==0.1.4" in pips[1]["argv"] and "./sam3" not in pips[1]["argv"]
    assert "no decord wheel for aarch64" in proc.stderr


def test_vllm_env_installs_the_pinned_release_inside_the_env(project: Path):
    proc, calls = run_setup(project, "vllm")
    assert proc.returncode == 0, proc.stderr
    pips = pip_calls(calls)
    assert len(pips) == 1
    assert_in_env(pips[0], project, "vllm")
    lines = requirement_lines(project, pips[0]["argv"], pips[0]["cwd"])
    assert "vllm==0.33.0" in lines

    proc, calls = run_setup(project, "vllm", {"SAM3DGS_VLLM_CUDA": "12"})
    assert proc.returncode == 0, proc.stderr
    lines = requirement_lines(project, pip_calls(calls)[-1]["argv"], pip_calls(calls)[-1]["cwd"])
    assert [line for line in lines if line.startswith("vllm==")] == ["vllm==0.19.1"]

    proc, _ = run_setup(project, "vllm", {"SAM3DGS_VLLM_CUDA": "11"})
    assert proc.returncode == 2 and "use 13 (NVIDIA driver >= 580) or 12" in proc.stderr


def test_a_failed_upstream_step_stops_setup_with_its_name(project: Path):
    (project / "sam-3d-objects" / "patching" / "hydra").write_text("#!/bin/sh\nexit 1\n")
    proc, calls = run_setup(project, "sam3d")
    assert proc.returncode == 3
    assert "installing sam-3d-objects failed" in proc.stderr
    assert len(pip_calls(calls)) == 3  # ours never ran after the failed hydra patch


def test_with_mamba_the_hook_comes_from_the_conda_beside_it(project: Path, tmp_path: Path):
    """Miniforge's `mamba` has no `shell.bash hook`; setup.sh asks the conda next to it."""
    bin_dir = tmp_path / "forge" / "bin"
    bin_dir.mkdir(parents=True)
    for name, src in (("mamba", "conda"), ("conda", "conda"), ("record.py", "record.py")):
        shutil.copy2(FAKE / src, bin_dir / name)
    proc, calls = run_setup(project, "vllm", {"CONDA_EXE": str(bin_dir / "mamba")})
    assert proc.returncode == 0, proc.stderr
    hooks = [c for c in calls if c["prog"] == "conda" and c["argv"][:2] == ["shell.bash", "hook"]]
    assert [Path(c["exe"]).name for c in hooks] == ["conda"]
    creates = [c for c in calls if c["prog"] == "conda" and c["argv"][:2] == ["env", "create"]]
    assert [Path(c["exe"]).name for c in creates] == ["mamba"]
    assert_in_env(pip_calls(calls)[0], project, "vllm")
