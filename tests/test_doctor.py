"""doctor against a fake conda on PATH whose envs exist: every gap is named with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _doctor(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "doctor"], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_doctor_without_anything_names_each_fix(tmp_path: Path):
    proc = _doctor({"CONDA_EXE": "", "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "HOME": str(tmp_path), "HF_TOKEN": "", "SAM3D_ROOT": str(tmp_path / "nope")})
    assert proc.returncode == 1
    out = proc.stdout
    assert "MISSING  conda " in out
    assert "bash envs/setup.sh sam3d" in out and "bash envs/setup.sh vllm" in out
    assert "git submodule update --init sam-3d-objects" in out
    assert "export HF_TOKEN" in out


def test_doctor_probes_inside_each_conda_env(tmp_path: Path):
    """Envs whose python is this interpreter: sam3 is not importable there, and doctor says so per env."""
    lines = ["# conda environments:"]
    for name in ("vllm", "sam3", "sam3d-objects"):
        prefix = tmp_path / "envs" / name
        (prefix / "bin").mkdir(parents=True)
        wrapper = prefix / "bin" / "python"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
        lines.append(f"{name}  {prefix}")
    fake = tmp_path / "conda"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    fake.chmod(0o755)
    proc = _doctor({"CONDA_EXE": str(fake), "HF_TOKEN": "hf_test", "HOME": str(tmp_path)})
    out = proc.stdout
    assert "ok       conda env 'sam3'" in out
    assert "MISSING  import sam3 (sam3 env)" in out
    assert "ok       HF token" in out
    assert proc.returncode == 1
