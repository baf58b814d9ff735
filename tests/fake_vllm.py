"""A stand-in for `vllm serve` (the real one needs a GPU and the weights).

Accepts the flags VLLMServer passes, reads the API key from --api-key or VLLM_API_KEY as vLLM does,
refuses a taken port, and serves tests/fake_openai_server.py on --host/--port once "loaded".
Behaviour switches (environment):
  FAKE_VLLM_START_DELAY   seconds of pretend model loading before the port opens
  FAKE_VLLM_CRASH_AFTER   exit 1 with a CUDA out-of-memory traceback after this many seconds of loading
  FAKE_VLLM_IGNORE_TERM   1: ignore SIGTERM (forces the launcher's SIGKILL)
  FAKE_VLLM_WORKER        1: start a worker process in the same group, like vLLM's engine core
  FAKE_VLLM_PIDFILE       write "<server pid> <worker pid>" here
  FAKE_VLLM_REPLY_FILE    a JSON list of chat answers (strings) to replay, in order (the last one repeats)
  FAKE_VLLM_DIE_ON_CHAT   1: exit (code 3, a CUDA error in the log) on the first chat request, mid-run
  FAKE_VLLM_STATS         append JSON lines here: {"event": "start", "pid": N, "port": P} per server start and
                          {"event": "chat", "in_flight": k, "max_in_flight": m} per chat request (test counting only)
  FAKE_VLLM_CHAT_DELAY    seconds each chat request takes (while counted in flight), so concurrency is observable
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai_server import FakeOpenAIServer, Reply  # noqa: E402


def make_launchable(folder: Path) -> tuple[Path, Path]:
    """An executable named `vllm` that runs this stand-in, and a model folder it accepts."""
    exe = folder / "vllm"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    exe.chmod(0o755)
    model = folder / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return exe, model


def log(message: str) -> None:
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [fake_vllm] {message}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--gpu-memory-utilization", type=float)
    serve.add_argument("--tensor-parallel-size", type=int, default=1)
    serve.add_argument("--limit-mm-per-prompt", default=None)
    serve.add_argument("--reasoning-parser", default=None)
    serve.add_argument("--allowed-local-media-path", default=None)
    serve.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)

    log(f"argv: {' '.join(argv)}")
    log(f"api key from: {'argv' if args.api_key else ('env' if os.environ.get('VLLM_API_KEY') else 'none')}")
    log(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    stats = Path(os.environ["FAKE_VLLM_STATS"]) if os.environ.get("FAKE_VLLM_STATS") else None
    if stats is not None:
        with open(stats, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "start", "pid": os.getpid(), "port": args.port, "time": time.time()}) + "\n")
    if os.environ.get("FAKE_VLLM_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = None
    if os.environ.get("FAKE_VLLM_WORKER") == "1":
        worker = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        log(f"EngineCore worker pid {worker.pid}")
    if os.environ.get("FAKE_VLLM_PIDFILE"):
        Path(os.environ["FAKE_VLLM_PIDFILE"]).write_text(f"{os.getpid()} {worker.pid if worker else 0}")

    host = args.host or "0.0.0.0"
    delay = float(os.environ.get("FAKE_VLLM_START_DELAY", "0"))
    crash_after = os.environ.get("FAKE_VLLM_CRASH_AFTER")
    log(f"Loading model weights from {args.model}")
    start = time.monotonic()
    while time.monotonic() - start < delay:
        if crash_after is not None and time.monotonic() - start >= float(crash_after):
            break
        time.sleep(0.05)
    if crash_after is not None:
        time.sleep(max(0.0, float(crash_after) - (time.monotonic() - start)))
        print("Traceback (most recent call last):", flush=True)
        print('  File "vllm/worker/gpu_worker.py", line 201, in determine_available_memory', flush=True)
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB", flush=True)
        return 1

    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((host, args.port))
    except OSError as exc:
        print(
            f"ERROR [fake_vllm] [Errno {exc.errno}] error while attempting to bind on address ({host!r}, {args.port}): address already in use",
            flush=True,
        )
        return 1
    finally:
        probe.close()
    replies = []
    if os.environ.get("FAKE_VLLM_REPLY_FILE"):
        replies = [Reply(content=text) for text in json.loads(Path(os.environ["FAKE_VLLM_REPLY_FILE"]).read_text())]
    server = FakeOpenAIServer(
        replies=replies,
        api_key=args.api_key or os.environ.get("VLLM_API_KEY"),
        model=args.served_model_name or args.model,
        host=host,
        port=args.port,
        chat_delay=float(os.environ.get("FAKE_VLLM_CHAT_DELAY", "0")),
        stats_path=stats,
    )
    if os.environ.get("FAKE_VLLM_DIE_ON_CHAT") == "1":

        def die(body: dict) -> Reply:
            print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
            os._exit(3)

        server.next_reply = die  # type: ignore[method-assign]
    log(f"Uvicorn running on http://{host}:{args.port} (Press CTRL+C to quit)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
