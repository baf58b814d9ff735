"""`import pipeline` (and the CLI's --help) must not pull in torch or any model package."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

HEAVY = ["torch", "vllm", "sam3", "sam3d_objects", "openai", "viser", "gsplat", "cv2", "scipy", "huggingface_hub"]


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_pipeline_is_light():
    loaded = _loaded_after("import pipeline, pipeline.core.types, pipeline.core.config, pipeline.cli, pipeline.stages, pipeline.selection")
    assert not loaded & set(HEAVY), f"heavy modules imported: {sorted(loaded & set(HEAVY))}"


def test_backend_interfaces_are_light():
    loaded = _loaded_after("import pipeline.plan.base, pipeline.masks.base, pipeline.objects.base, pipeline.scene.camera")
    assert not loaded & set(HEAVY)


def test_cli_help_runs_without_heavy_imports():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--image", "--out", "--profile", "--vlm-url", "--segmenter", "--lifter", "--masks", "--force"):
        assert flag in proc.stdout
