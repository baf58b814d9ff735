"""The vLLM launcher against tests/fake_vllm.py, a stand-in executable that behaves like `vllm serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fake_vllm import BEHAVIOUR_ENV, make_launchable, server_config

from pipeline.core.config import PlannerConfig, VLMServerConfig
from pipeline.core.errors import BackendError, InputError
from pipeline.plan.server import ServerStartError, VLLMServer, pick_free_port, resolve_model
from pipeline.plan.vlm import VLMPlanner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc checks")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A `vllm` executable and a model folder; returns paths plus a pid file the fake writes."""
    exe, model = make_launchable(tmp_path)
    pidfile = tmp_path / "pids"
    monkeypatch.setenv("FAKE_VLLM_PIDFILE", str(pidfile))
    for name in BEHAVIOUR_ENV:
        monkeypatch.delenv(name, raising=False)
    return {"exe": exe, "model": model, "pidfile": pidfile, "log": tmp_path / "logs" / "vllm.log"}


def config(fake: dict, **fields: object) -> VLMServerConfig:
    return server_config(fake["exe"], fake["model"], **fields)


def server(fake: dict, **fields: object) -> VLLMServer:
    return VLLMServer(config(fake, **fields), fake["log"], poll_interval=0.05, progress_every=0.3, stop_grace=2.0)


def alive(pid: int) -> bool:
    """True for a running process; zombies (not reaped in a container without init) count as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def gone_soon(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def pids(fake: dict) -> list[int]:
    return [int(p) for p in fake["pidfile"].read_text().split() if int(p)]


def get(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state for `port`, from /proc/net/tcp (hex, little-endian IPv4)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if int(port_hex, 16) == port and state == "0A":
                found.add(address)
    return found


def test_ready_after_slow_start_then_stopped(fake: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FAKE_VLLM_START_DELAY", "1.0")
    monkeypatch.setenv("FAKE_VLLM_WORKER", "1")
    with server(fake, gpus="2,3") as srv:
        assert srv.url == f"http://127.0.0.1:{srv.port}/v1" and srv.model_name == "qwen3-vl-8b-thinking"
        assert get(f"{srv.url}/models", srv.api_key) == 200
        assert get(f"{srv.url}/models", "wrong") == 401
        assert listening_addresses(srv.port) == {"0100007F"}  # 127.0.0.1 only
        planner = VLMPlanner(PlannerConfig(), url=srv.url, api_key=srv.api_key, model=srv.model_name)
        plan = planner.plan(np.zeros((64, 64, 3), np.uint8))
        assert [i.phrase for i in plan.items] == ["mug"]
        leader, worker = pids(fake)
        port = srv.port
    assert gone_soon(leader) and gone_soon(worker)  # the whole group, workers included
    assert listening_addresses(port) == set()
    assert "waiting for vLLM" in capsys.readouterr().err
    log = fake["log"].read_text()
    assert "--host 127.0.0.1" in log and "--reasoning-parser qwen3" in log
    assert '--limit-mm-per-prompt {"image": 1, "video": 0}' in log and "--served-model-name qwen3-vl-8b-thinking" in log
    assert "api key from: env" in log and srv.api_key not in log  # the key never appears in argv or logs
    assert "allowed-local-media-path" not in log and "CUDA_VISIBLE_DEVICES=2,3" in log


def test_dies_during_start_shows_log_tail(fake: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_CRASH_AFTER", "0.2")
    with pytest.raises(ServerStartError) as info:
        server(fake).start()
    message = str(info.value)
    assert message.startswith("vLLM exited with code 1 while starting")
    assert str(fake["log"]) in message and "--gpu-memory-utilization" in message
    assert "CUDA out of memory" in message and isinstance(info.value, BackendError)
    assert 0 < len(info.value.log_tail) <= 20


def test_deadline_passes(fake: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_START_DELAY", "60")
    started = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        server(fake, ready_timeout=0.8).start()
    assert time.monotonic() - started < 5
    assert "not ready after 0.8 s" in str(info.value) and "--ready-timeout" in str(info.value)
    assert "Loading model weights" in str(info.value)  # the log tail
    assert gone_soon(pids(fake)[0])


def test_explicit_port_taken(fake: dict) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(BackendError) as info:
            server(fake, vlm_port=port).start()
    assert f"Port {port} on 127.0.0.1 is already in use" in str(info.value)
    assert f"--vlm-url http://127.0.0.1:{port}/v1" in str(info.value)
    assert not fake["log"].exists()  # refused before starting anything


def test_explicit_free_port_used(fake: dict) -> None:
    port = pick_free_port()
    with server(fake, vlm_port=port) as srv:
        assert srv.url == f"http://127.0.0.1:{port}/v1" and get(f"{srv.url}/models", srv.api_key) == 200


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_or_ctrl_c_stops_the_group(fake: dict, monkeypatch: pytest.MonkeyPatch, error: type) -> None:
    monkeypatch.setenv("FAKE_VLLM_WORKER", "1")
    with pytest.raises(error):
        with server(fake):
            leader, worker = pids(fake)
            assert alive(leader) and alive(worker)
            raise error()
    assert gone_soon(leader) and gone_soon(worker)


def test_sigterm_ignored_escalates_to_sigkill(fake: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_IGNORE_TERM", "1")
    srv = VLLMServer(config(fake), fake["log"], poll_interval=0.05, stop_grace=0.5)
    with srv:
        leader = pids(fake)[0]
    assert gone_soon(leader, 2.0) and srv.process is not None and srv.process.returncode == -signal.SIGKILL


def test_keep_server_leaves_it_running(fake: dict, capsys: pytest.CaptureFixture[str]) -> None:
    srv = server(fake, keep_server=True)
    with srv:
        pass
    leader = pids(fake)[0]
    try:
        # The printed line is all a later run needs to reuse the server (the key is generated).
        line = next(x for x in capsys.readouterr().err.splitlines() if "export SAM3DGS_VLM_URL=" in x)
        printed = dict(kv.split("=", 1) for kv in line.split("export ", 1)[1].split())
        assert alive(leader) and get(f"{printed['SAM3DGS_VLM_URL']}/models", printed["SAM3DGS_VLM_API_KEY"]) == 200
    finally:
        os.killpg(leader, signal.SIGKILL)
        srv.process.wait(timeout=5)  # type: ignore[union-attr]


def test_missing_executable_and_bad_model(fake: dict, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="Cannot run '/nonexistent/vllm': no such executable"):
        server(fake, vllm_command="/nonexistent/vllm").start()
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model(str(empty))
    with pytest.raises(InputError, match="neither an existing folder nor a Hugging Face id"):
        resolve_model("./no/such/folder")
    with pytest.raises(InputError, match="allowed-local-media-path"):
        server(fake, vllm_arg=["--allowed-local-media-path=/"]).argv("m")


class _GatedHub(BaseHTTPRequestHandler):
    """Answers like the Hub does for a gated repo the token has no access to."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model Qwen/Qwen3-VL-8B-Thinking is restricted.")
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": "Access to model is restricted."}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET


def test_gated_model_explains_licence_and_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(BackendError) as info:
            resolve_model("Qwen/Qwen3-VL-8B-Thinking", tmp_path / "models", endpoint=f"http://127.0.0.1:{hub.server_address[1]}")
    finally:
        hub.shutdown()
        hub.server_close()
    message = str(info.value)
    assert "Qwen/Qwen3-VL-8B-Thinking is gated" in message and "export HF_TOKEN" in message and "licence" in message


def _serve_vlm_subprocess(fake: dict, tmp_path: Path, keep: bool = False) -> subprocess.Popen[str]:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from pipeline.core.config import VLMServerConfig
        from pipeline.plan.server import serve_vlm_main
        cfg = VLMServerConfig(vlm_model_id={str(fake["model"])!r}, vllm_command={str(fake["exe"])!r},
                              ready_timeout=10.0, keep_server={keep})
        sys.exit(serve_vlm_main(cfg, Path({str(tmp_path / "run_logs")!r})))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_line(stream, needle: str, seconds: float = 15.0) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen in: {lines}")


@pytest.mark.parametrize("sig, expected_rc", [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)])
def test_serve_vlm_stops_server_when_interrupted_or_killed(fake: dict, tmp_path: Path, sig: int, expected_rc: int) -> None:
    proc = _serve_vlm_subprocess(fake, tmp_path)
    try:
        out = _wait_for_line(proc.stdout, "export SAM3DGS_VLM_URL=")
        _wait_for_line(proc.stderr, "Press Ctrl-C")
        leader = pids(fake)[0]
        assert alive(leader)
        assert "SAM3DGS_VLM_API_KEY=" in out[-1] and "SAM3DGS_VLM_MODEL=qwen3-vl-8b-thinking" in out[-1]
        proc.send_signal(sig)  # SIGKILL: PR_SET_PDEATHSIG still takes the server down
        assert proc.wait(timeout=15) == expected_rc
        assert gone_soon(leader, 5.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def test_serve_vlm_keep_server_returns_and_leaves_it(fake: dict, tmp_path: Path) -> None:
    proc = _serve_vlm_subprocess(fake, tmp_path, keep=True)
    out, _err = proc.communicate(timeout=20)
    leader = pids(fake)[0]
    try:
        assert proc.returncode == 0 and alive(leader)
        assert f"kill -TERM -- -{leader}" in out
        url = next(line for line in out.splitlines() if line.startswith("export")).split()[1].split("=", 1)[1]
        key = next(line for line in out.splitlines() if line.startswith("export")).split()[2].split("=", 1)[1]
        assert get(f"{url}/models", key) == 200
    finally:
        os.killpg(leader, signal.SIGKILL)
        gone_soon(leader)
