"""ruff (configured in pyproject.toml) over the package, tests and benchmarks."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import ROOT


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with envs/requirements-test.txt)")
    proc = subprocess.run([ruff, "check", "--output-format", "concise", "pipeline", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_scripts_parse():
    for script in ["run_pipeline.sh", "run_agent_with_vllm.sh", "run_sam3d_from_masks.sh", "run_tests.sh", "envs/setup.sh", "envs/common.sh", ".ci/run"]:
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
