"""How the launcher starts `vllm serve` (issue 8, stage 1a): the GPU share by mode from nvidia-smi,
the multimodal profiling cap, the --vllm-arg guard, the readiness probe behind a dead proxy, and
a started vLLM without a reasoning parser. Real subprocesses: tests/fake_vllm.py as `vllm`, and a
stand-in `nvidia-smi` script on PATH that prints what the real one prints for its query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import set_proxy
from fake_vllm import BEHAVIOUR_ENV, make_launchable, server_config

from pipeline.core.config import PlannerConfig, VLMServerConfig
from pipeline.core.errors import BackendError, InputError
from pipeline.plan import server as launcher
from pipeline.plan.server import VLLMServer
from pipeline.plan.vlm import VLMPlanner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, /bin/sh stand-ins")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    exe, model = make_launchable(tmp_path)
    for name in (*BEHAVIOUR_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")  # no real nvidia-smi either
    return {"exe": exe, "model": model, "bin": bin_dir, "log": tmp_path / "logs" / "vllm.log", "smi_log": tmp_path / "smi.log"}


def fake_smi(fake: dict, rows: list[tuple[int, int]]) -> None:
    """`nvidia-smi --query-gpu=memory.total,memory.free --format=csv,noheader,nounits [-i IDS]`: MiB per GPU."""
    lines = "\\n".join(f"{total}, {free}" for total, free in rows)
    script = fake["bin"] / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{fake["smi_log"]}"\nprintf "{lines}\\n"\n')
    script.chmod(0o755)


def server(fake: dict, mode: str = "scene", max_image_side: int | None = 1280, **fields: object) -> VLLMServer:
    cfg = server_config(fake["exe"], fake["model"], **fields)
    return VLLMServer(cfg, fake["log"], mode=mode, max_image_side=max_image_side, poll_interval=0.05, stop_grace=2.0)


def plain_server(fake: dict, **fields: object) -> VLLMServer:
    """Without the mode and image-size arguments (the defaults: query mode, 1280 pixels)."""
    return VLLMServer(server_config(fake["exe"], fake["model"], **fields), fake["log"], poll_interval=0.05, stop_grace=2.0)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


H100 = (81559, 81000)  # MiB total, free (what nvidia-smi prints for an idle 80 GB card)


def test_scene_mode_takes_most_of_the_gpu(fake: dict) -> None:
    fake_smi(fake, [H100])
    argv = server(fake, "scene").argv(fake["model"])
    assert flag(argv, "--gpu-memory-utilization") == "0.88"
    assert flag(argv, "--max-model-len") == "32768"


def test_query_mode_leaves_room_for_sam3(fake: dict) -> None:
    fake_smi(fake, [H100])
    srv = server(fake, "query")
    share = float(flag(srv.argv(fake["model"]), "--gpu-memory-utilization"))
    total, free = H100[0] / 1024, H100[1] / 1024
    assert share == pytest.approx(int(((free - 10) / total - 0.02) * 100) / 100)  # 0.85 here
    assert (1 - share) * total >= 10  # SAM3's reserve stays free
    assert "10 GiB left for SAM3" in srv.memory_share_reason
    # A 48 GB card in query mode: a smaller share, still the reserve left.
    fake_smi(fake, [(49140, 48500)])
    share48 = float(flag(server(fake, "query").argv(fake["model"]), "--gpu-memory-utilization"))
    assert share48 < share and (1 - share48) * 49140 / 1024 >= 10


def test_share_is_capped_by_what_is_free_and_uses_the_chosen_gpus(fake: dict) -> None:
    fake_smi(fake, [(81559, 40000), (81559, 81000)])
    argv = server(fake, "scene", gpus="2,3", tensor_parallel_size=2).argv(fake["model"])
    assert float(flag(argv, "--gpu-memory-utilization")) <= 40000 / 81559 - 0.02  # the fuller GPU decides
    assert "-i 2,3" in fake["smi_log"].read_text()
    fake_smi(fake, [(81559, 4000)])
    with pytest.raises(BackendError, match="vLLM cannot get GPU memory: query mode; 3.9 of 79.6 GiB free"):
        server(fake, "query").argv(fake["model"])


def test_explicit_share_wins_and_fallback_without_nvidia_smi(fake: dict) -> None:
    fake_smi(fake, [H100])
    assert flag(server(fake, "query", gpu_memory_utilization=0.5).argv(fake["model"]), "--gpu-memory-utilization") == "0.5"
    assert not fake["smi_log"].exists()  # not even asked
    (fake["bin"] / "nvidia-smi").unlink()
    assert flag(server(fake, "scene").argv(fake["model"]), "--gpu-memory-utilization") == "0.88"
    assert flag(server(fake, "query").argv(fake["model"]), "--gpu-memory-utilization") == "0.6"
    with pytest.raises(InputError, match="not a fraction"):
        server(fake, gpu_memory_utilization=1.5).argv(fake["model"])


def test_memory_estimate_warns_when_the_share_is_too_small(fake: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # Qwen3-VL-8B's text config and 16.3 GiB of weights (a sparse file: no disk used).
    config = {"text_config": {"num_hidden_layers": 36, "num_key_value_heads": 8, "head_dim": 128, "num_attention_heads": 32}}
    (fake["model"] / "config.json").write_text(json.dumps(config))
    with open(fake["model"] / "model.safetensors", "wb") as fh:
        fh.truncate(int(16.3 * 2**30))
    need = launcher.estimate_vllm_gib(fake["model"], 32768)
    assert need == pytest.approx(16.3 + 4.5 + 4.0, abs=0.01)  # 144 KiB/token x 32768 = 4.5 GiB KV
    assert launcher.estimate_vllm_gib(fake["model"], 32768, tensor_parallel_size=2) == pytest.approx((16.3 + 4.5) / 2 + 4.0, abs=0.01)
    fake_smi(fake, [(32607, 32000)])  # a 32 GB card in query mode
    server(fake, "query").argv(fake["model"])
    err = capsys.readouterr().err
    assert "warning: vLLM gets" in err and "needs about 24.8 GiB" in err and "--max-model-len" in err
    fake_smi(fake, [H100])
    server(fake, "query").argv(fake["model"])
    assert "warning" not in capsys.readouterr().err


def test_choose_memory_share_without_gpus() -> None:
    assert launcher.choose_memory_share(VLMServerConfig(), "scene", None)[0] == 0.88
    assert launcher.choose_memory_share(VLMServerConfig(), "query", None)[0] == 0.6
    assert launcher.choose_memory_share(VLMServerConfig(gpu_memory_utilization=0.7), "scene", [(80.0, 80.0)]) == (0.7, "given")


def test_profiling_capped_to_the_images_we_send(fake: dict) -> None:
    fake_smi(fake, [H100])
    argv = server(fake, max_image_side=1280).argv(fake["model"])
    assert json.loads(flag(argv, "--mm-processor-kwargs")) == {"max_pixels": 1280 * 1280}
    assert json.loads(flag(server(fake, max_image_side=1000).argv(fake["model"]), "--mm-processor-kwargs")) == {"max_pixels": 1024 * 1024}
    assert launcher.max_pixels_for(1279) == 1280 * 1280 and launcher.max_pixels_for(10) == 32 * 32
    # The user's own value wins (one flag, not two).
    own = server(fake, vllm_arg=['--mm_processor_kwargs={"max_pixels": 200704}']).argv(fake["model"])
    assert "--mm-processor-kwargs" not in own and own[-1] == '--mm_processor_kwargs={"max_pixels": 200704}'
    assert "--mm-processor-kwargs" not in server(fake, max_image_side=None).argv(fake["model"])


@pytest.mark.parametrize(
    "extra, what",
    [
        (["--allowed_local_media_path=/"], "read access to files"),
        (["--allowed-local-media-path", "/"], "read access to files"),
        (["--api-key=abc"], "--api-key in --vllm-arg"),
        (["--api_key", "abc"], "--api-key in --vllm-arg"),
    ],
)
def test_guard_refuses_file_access_and_a_second_key(fake: dict, extra: list[str], what: str) -> None:
    with pytest.raises(InputError, match=what):
        plain_server(fake, gpu_memory_utilization=0.5, vllm_arg=extra).argv("m")


def test_stand_in_vllm_parses_like_the_real_one(fake: dict) -> None:
    """tests/fake_vllm.py: unknown flags and non-JSON dict values are errors; `_` reads as `-`."""
    script = TESTS / "fake_vllm.py"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import fake_vllm; print(vars(fake_vllm.parse_serve_args(sys.argv[1:])))"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)

    assert script.exists()
    bad = run("serve", "m", "--no-such-flag", "1")
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr
    legacy = run("serve", "m", "--limit-mm-per-prompt", "image=1,video=0")
    assert legacy.returncode == 2 and "--limit-mm-per-prompt" in legacy.stderr
    good = run("serve", "m", "--allowed_local_media_path=/", "--mm-processor-kwargs", '{"max_pixels": 1024}', "--max_num_seqs", "2")
    assert good.returncode == 0, good.stderr
    assert "'allowed_local_media_path': '/'" in good.stdout and "'mm_processor_kwargs': {'max_pixels': 1024}" in good.stdout


def test_probe_and_planner_ignore_a_dead_proxy(fake: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind http_proxy (HPC and corporate networks set it for the weight download), 127.0.0.1 is still reached directly."""
    set_proxy(monkeypatch, f"http://127.0.0.1:{launcher.pick_free_port()}")  # nobody listens: a dead proxy
    fake_smi(fake, [H100])
    with plain_server(fake, ready_timeout=8.0) as srv:
        assert srv.ready_seconds is not None and srv.ready_seconds < 8.0
        planner = VLMPlanner(PlannerConfig(), url=srv.url, api_key=srv.api_key, model=srv.model_name, vllm_server=True)
        plan = planner.plan(np.zeros((64, 64, 3), np.uint8))
    assert [i.phrase for i in plan.items] == ["mug"]


def test_stage1_with_no_reasoning_parser_asks_for_plain_text(tmp_path: Path, fake: dict) -> None:
    """--reasoning-parser '': the started vLLM would constrain JSON from the first token, so the
    Thinking model would never think (vLLM 0.33 v1/structured_output/__init__.py:300-310)."""
    from PIL import Image

    image = tmp_path / "photo.png"
    rgb = np.full((120, 160, 3), 200, np.uint8)
    rgb[30:90, 40:100] = (200, 30, 30)
    Image.fromarray(rgb).save(image)
    reply = "<think>One red square.</think>" + json.dumps({"objects": [{"bbox_2d": [240, 240, 630, 760], "label": "red square"}]})
    (tmp_path / "replies.json").write_text(json.dumps([reply]))
    run = tmp_path / "run"
    env = {**os.environ, "FAKE_VLLM_REPLY_FILE": str(tmp_path / "replies.json"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "stage1", "--image", str(image), "--out", str(run), "--planner", "vlm", "--segmenter", "classical",
         "--vllm-command", str(fake["exe"]), "--vlm-model-id", str(fake["model"]), "--ready-timeout", "60", "--no-progress", "--reasoning-parser", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((run / "stage1/plan.json").read_text())
    assert plan["request"]["structured_output"] is False
    assert "thinking_token_budget" not in plan["request"]["vllm_fields"] and plan["request"]["vllm_fields"]["top_k"] == 20
    assert any("structured output is off" in w for w in plan["warnings"])
    assert not any("thinking_token_budget" in w for w in plan["warnings"])  # never sent, so never refused
    log = (run / "logs/vllm.log").read_text()
    assert "--reasoning-parser" not in log and "--gpu-memory-utilization 0.88" in log  # scene mode, no nvidia-smi
