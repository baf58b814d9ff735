"""Shared test setup: GPU tests skip where there is no CUDA GPU."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import pytest

# A suite started in the background (`./run_tests.sh &` from a script) inherits SIGINT ignored, and so
# would every process the tests start: an ignored signal stays ignored across exec, and Python then
# installs no KeyboardInterrupt handler, so the Ctrl-C tests would see SIGINT do nothing. A caught
# signal is reset to its default on exec: catch it here, and the children get Python's usual handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def set_proxy(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Every HTTP(S) proxy variable set to `url`, and no no_proxy exception: as on a network where
    all traffic must go through a proxy (HPC, corporate)."""
    for name in PROXY_VARS:
        monkeypatch.setenv(name, url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Marks the processes this test session starts (children inherit the environment), so that the
# leftover check below never counts, or kills, another session's servers on a shared machine.
SESSION_MARK = f"SAM3DGS_TEST_SESSION={os.getpid()}-{time.time_ns()}"
os.environ["SAM3DGS_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def _stand_in_servers() -> set[int]:
    """PIDs of tests/fake_vllm.py processes (the stand-in vLLM the launcher tests start) of this session."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"fake_vllm.py" in (proc / "cmdline").read_bytes() and SESSION_MARK.encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def pytest_sessionstart(session):
    session.config._stand_ins_before = _stand_in_servers()


def pytest_sessionfinish(session, exitstatus):
    """No test may leave a server behind: leftovers are killed and fail the run."""
    import os
    import signal
    import time

    time.sleep(0.5)
    left = _stand_in_servers() - getattr(session.config, "_stand_ins_before", set())
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        print(f"\nERROR: {len(left)} stand-in vLLM server(s) outlived the tests (pids {sorted(left)}); killed them.")
        session.exitstatus = 1
