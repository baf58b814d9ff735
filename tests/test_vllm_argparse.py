"""The argv our launcher builds, through vLLM 0.33.0's own `vllm serve` parser (tests/vllm_argparse.py):
an unknown flag or a bad value fails here, not on a user's first GPU run.

The parser's cache is built on first use (a download from PyPI); without network it skips, except
in CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import vllm_argparse
from fake_vllm import KNOWN_FLAGS

from pipeline.core.config import VLMServerConfig
from pipeline.plan.server import VLLMServer


@pytest.fixture(scope="module")
def parser_cache() -> Path:
    try:
        return vllm_argparse.ensure_parser_env()
    except (vllm_argparse.ParserUnavailable, OSError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"vLLM {vllm_argparse.VLLM_VERSION}'s parser is needed in CI: {exc}")
        pytest.skip(f"vLLM {vllm_argparse.VLLM_VERSION}'s parser could not be set up here: {exc}")


def launcher_argv(tmp: Path, mode: str, max_image_side: int | None = 1280, **fields: object) -> list[str]:
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    cfg = VLMServerConfig(vlm_model_id=str(model), **fields)  # type: ignore[arg-type]
    srv = VLLMServer(cfg, tmp / "vllm.log", mode=mode, max_image_side=max_image_side)
    srv.port = 8123
    return srv.argv(model)


# Each case: (name, mode, launcher fields, expected parsed values).
GOOD = [
    ("scene defaults", "scene", {}, {"gpu_memory_utilization": 0.88, "max_model_len": 32768, "reasoning_parser": "qwen3"}),
    ("query defaults", "query", {}, {"gpu_memory_utilization": 0.6}),
    ("explicit share, tp 2", "query", {"gpu_memory_utilization": 0.45, "tensor_parallel_size": 2, "gpus": "0,1"},
     {"gpu_memory_utilization": 0.45, "tensor_parallel_size": 2}),
    ("no reasoning parser", "scene", {"reasoning_parser": ""}, {"reasoning_parser": ""}),
    ("per-modality profiling dims", "scene",
     {"limit_mm_per_prompt": '{"image": {"count": 1, "width": 1280, "height": 1280}, "video": 0}', "max_model_len": 16384},
     {"max_model_len": 16384}),
    ("pass-through flags", "scene", {"vllm_arg": ["--enforce-eager", "--max_num_seqs=2"]}, {"enforce_eager": True}),
]


@pytest.fixture(scope="module")
def results(parser_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("argv")
    argvs: dict[str, list[str]] = {}
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = "/usr/bin:/bin"  # no nvidia-smi: the documented fallback shares, the same on every machine
    try:
        for name, mode, fields, _ in GOOD:
            argvs[name] = launcher_argv(tmp, mode, **fields)
        argvs["smaller images"] = launcher_argv(tmp, "scene", max_image_side=896)
    finally:
        os.environ["PATH"] = path
    base = argvs["scene defaults"]
    argvs["BAD unknown flag"] = base + ["--no-such-flag", "1"]
    argvs["BAD share not a number"] = [*base, "--gpu-memory-utilization", "most"]
    argvs["BAD legacy limit form"] = [*base, "--limit-mm-per-prompt", "image=1,video=0"]
    argvs["BAD reasoning parser"] = [*base, "--reasoning-parser", "no-such-parser"]
    argvs["BAD profiling option"] = [*base, "--limit-mm-per-prompt", '{"image": {"count": 1, "pixels": 5}}']
    for flag_name, kwargs in KNOWN_FLAGS.items():
        sample = {"int": "2", "float": "0.5"}.get(getattr(kwargs.get("type"), "__name__", ""), "x")
        if kwargs.get("type") is not None and kwargs["type"].__name__ == "_json":
            sample = '{"image": 1}'
        sample = {"--reasoning-parser": "qwen3"}.get(flag_name, sample)
        value = [] if kwargs.get("action") == "store_true" else [sample]
        argvs[f"fake flag {flag_name}"] = ["vllm", "serve", "m", flag_name, *value]
    names = list(argvs)
    out = vllm_argparse.check_argvs([argvs[n] for n in names], parser_cache)
    return {n: {**r, "argv": argvs[n]} for n, r in zip(names, out, strict=True)}


@pytest.mark.parametrize("name, mode, fields, expected", GOOD, ids=[g[0] for g in GOOD])
def test_launcher_argv_parses(results: dict[str, dict], name: str, mode: str, fields: dict, expected: dict) -> None:
    result = results[name]
    assert result["ok"], f"{result['error']} <- {' '.join(result['argv'])}"
    values = result["values"]
    assert values["host"] == "127.0.0.1" and values["port"] == 8123 and values["served_model_name"] == ["qwen3-vl-8b-thinking"]
    assert values["mm_processor_kwargs"] == {"max_pixels": 1638400}
    assert values["limit_mm_per_prompt"] == json.loads(fields.get("limit_mm_per_prompt", '{"image": 1, "video": 0}'))
    for key, value in expected.items():
        assert values[key] == value, (key, values[key])


def test_image_cap_follows_max_image_side(results: dict[str, dict]) -> None:
    assert results["smaller images"]["ok"] and results["smaller images"]["values"]["mm_processor_kwargs"] == {"max_pixels": 896 * 896}


@pytest.mark.parametrize("name, why", [
    ("BAD unknown flag", "unrecognized arguments: --no-such-flag"),
    ("BAD share not a number", "--gpu-memory-utilization"),
    ("BAD legacy limit form", "--limit-mm-per-prompt"),
    ("BAD reasoning parser", "no-such-parser"),
    ("BAD profiling option", "pixels"),
])
def test_real_parser_rejects(results: dict[str, dict], name: str, why: str) -> None:
    """The check itself can fail: vLLM's parser refuses what it does not know."""
    assert not results[name]["ok"] and why in results[name]["error"], results[name]["error"]


@pytest.mark.parametrize("flag_name", list(KNOWN_FLAGS))
def test_every_flag_the_stand_in_accepts_is_real(results: dict[str, dict], flag_name: str) -> None:
    result = results[f"fake flag {flag_name}"]
    assert result["ok"], f"tests/fake_vllm.py accepts {flag_name}, vLLM 0.33 does not: {result['error']}"
