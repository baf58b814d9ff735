"""The bash entry scripts: flags only, clear errors, real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPTS = ["run_pipeline.sh", "run_agent_with_vllm.sh", "run_sam3d_from_masks.sh"]


def script(name: str, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SAM3DGS_PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(ROOT / name), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_the_shared_flags(name: str):
    proc = script(name, "--help", "--env-manager", "none")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--env-manager", "--image", "--out", "--profile"):
        assert flag in proc.stdout


def test_no_image_is_a_one_line_error():
    proc = script("run_pipeline.sh", "--env-manager", "none")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "--image" in proc.stderr


def test_bad_env_manager_is_rejected():
    proc = script("run_sam3d_from_masks.sh", "--env-manager", "docker", "--out", "x")
    assert proc.returncode == 2 and "--env-manager" in proc.stderr


def test_conda_missing_names_the_fix(tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", "CONDA_EXE": "", "HOME": str(tmp_path)}
    proc = script("run_agent_with_vllm.sh", "--env-manager", "conda", "--image", "x.png", env=env)
    assert proc.returncode == 3
    assert "conda not found" in proc.stderr


def test_conda_env_missing_names_setup_command(tmp_path: Path):
    fake = tmp_path / "conda"
    fake.write_text("#!/bin/sh\necho '# conda environments:'\necho 'base  /opt/fake'\n")
    fake.chmod(0o755)
    proc = script("run_sam3d_from_masks.sh", "--env-manager", "conda", "--out", "x", env={"CONDA_EXE": str(fake)})
    assert proc.returncode == 3
    assert "envs/setup.sh sam3d" in proc.stderr


def test_conda_env_is_used_when_present(tmp_path: Path):
    """A conda env whose python is this interpreter: the script must run stage 2 with it."""
    prefix = tmp_path / "envs" / "sam3d-objects"
    (prefix / "bin").mkdir(parents=True)
    wrapper = prefix / "bin" / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    fake = tmp_path / "conda"
    fake.write_text(f"#!/bin/sh\necho '# conda environments:'\necho 'sam3d-objects  {prefix}'\n")
    fake.chmod(0o755)
    proc = script("run_sam3d_from_masks.sh", "--env-manager", "conda", "--out", tmp_path / "missing-run", env={"CONDA_EXE": str(fake)})
    # It reached python -m pipeline stage2 in that env, which reports the missing photo.
    assert proc.returncode == 2, proc.stderr
    assert "input/image.png" in proc.stderr or "--image" in proc.stderr
