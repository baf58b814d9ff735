"""Where the pipeline looks for a saved Hugging Face token and the Hub cache: the places
huggingface_hub itself uses (its constants.py, run in a subprocess so each case gets a fresh import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import hub

pytest.importorskip("huggingface_hub")

VARS = ("HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def upstream_paths(env: dict[str, str]) -> dict[str, str]:
    code = "import json; from huggingface_hub import constants as c; print(json.dumps({'token': c.HF_TOKEN_PATH, 'cache': c.HF_HUB_CACHE}))"
    clean = {k: v for k, v in os.environ.items() if k not in VARS}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("case", ["xdg", "hf_home", "token_path"])
def test_saved_token_and_cache_where_huggingface_hub_keeps_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str):
    env = {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    if case == "hf_home":
        env["HF_HOME"] = str(tmp_path / "hf")
    if case == "token_path":
        env["HF_TOKEN_PATH"] = str(tmp_path / "elsewhere" / "tok")
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = upstream_paths(env)
    token_file = Path(expected["token"])
    token_file.parent.mkdir(parents=True)
    token_file.write_text("hf_saved\n")
    assert hub.hf_token() == "hf_saved"
    assert hub.hf_hub_cache() == Path(expected["cache"])
