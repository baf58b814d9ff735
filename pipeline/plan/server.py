"""Start and stop `vllm serve` for stage 1, safely.

Compared with the reference system: bound to 127.0.0.1 only, a generated API key (passed in the
environment as VLLM_API_KEY, so it shows up neither in `ps` nor in vLLM's logged arguments), a
free port unless one is given, a readiness deadline with progress, the log tail on failure, and
no filesystem access for the server (`--allowed-local-media-path` is never passed: images go inline).
The server runs in its own process group and is stopped on success, error, Ctrl-C, SIGTERM/SIGHUP
and interpreter exit, unless `keep_server`.

What the key does not cover: vLLM checks it only under /v1, /v2, /inference and /cohere
(vllm 0.33 serve/middleware/authenticate.py:11); /invocations (the same inference as /v1),
/tokenize, /metrics and /health stay open to anyone who can reach the port (its own warning:
entrypoints/common/cli_args.py:335-345). Bound to 127.0.0.1, that means every local user of
the machine; on a shared host, keep the server's lifetime short (the default) or put it behind
your own access control.

GPU memory: vLLM takes `--gpu-memory-utilization` x the GPU's total memory up front
(v1/worker/utils.py:716-770). Without the flag the share follows the mode: scene mode stops vLLM
before SAM3 starts, so vLLM takes up to SCENE_SHARE; in query mode (and for `serve-vlm`) both run
at once, so `--sam3-reserve-gib` is left free. Both are capped by what is free when vLLM starts
(nvidia-smi); without nvidia-smi the documented fallbacks apply. The multimodal profiling is
capped to the largest image the planner sends (`--mm-processor-kwargs {"max_pixels": ...}`).
Loopback traffic (the readiness probe) never goes through an HTTP proxy.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.core.config import VLMServerConfig
from pipeline.core.device import nvidia_smi
from pipeline.core.errors import BackendError, InputError, missing_dependency
from pipeline.core.hub import hf_token, hub_error

HOST = "127.0.0.1"
DEFAULT_SERVED_NAME = "qwen3-vl-8b-thinking"
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
"""Enough for vLLM to load a model; skips README images, .bin duplicates and the like."""
SCENE_SHARE = 0.88
"""--gpu-memory-utilization in scene mode (vLLM is stopped before SAM3 starts)."""
FALLBACK_SHARE = {"scene": SCENE_SHARE, "query": 0.6}
"""Used when nvidia-smi cannot tell the GPU's memory (0.6 leaves 40 percent of the GPU to SAM3)."""
FREE_MARGIN = 0.02
"""Fraction of the GPU kept below what is free at start: vLLM refuses to start when less than its
whole share is free (v1/worker/utils.py:760-770)."""
VISION_UNIT = 32
"""Qwen3-VL: 16-pixel patches merged 2x2, so image sides are rounded to multiples of 32."""
RUNTIME_OVERHEAD_GIB = 4.0
"""Beyond weights and KV cache: vLLM's profiling peak (one image, capped), CUDA graphs, the CUDA
context and the non-torch part (audits/vllm-qwen3vl.md #2). One figure for the launcher's warning
and the doctor's GPU check (pipeline/doctor.py)."""


class ServerStartError(BackendError):
    """vLLM did not become ready. `str()` ends with the last lines of its log."""

    def __init__(self, problem: str, fix: str, *, log_path: Path, log_tail: list[str]):
        super().__init__(problem, fix)
        self.log_path = log_path
        self.log_tail = log_tail

    def __str__(self) -> str:
        base = super().__str__()
        if not self.log_tail:
            return base
        return base + f"\nLast lines of {self.log_path}:\n" + "\n".join("  | " + line for line in self.log_tail)


def resolve_model(model_id: str, models_dir: Path | None = None, *, endpoint: str | None = None) -> Path:
    """A local model folder as is, or a Hugging Face id downloaded (resumable) with HF_TOKEN."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(
                f"The model folder {local} has no config.json.", "point --vlm-model-id at a downloaded model folder or a Hugging Face id."
            )
        return local.resolve()
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise InputError(
            f"The VLM model '{model_id}' is neither an existing folder nor a Hugging Face id (owner/name).",
            "pass --vlm-model-id Qwen/Qwen3-VL-8B-Thinking or the path of a downloaded model folder.",
        )
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:
        raise missing_dependency("huggingface_hub", "vllm", "pip install huggingface_hub") from exc
    local_dir = Path(models_dir).expanduser() / model_id.replace("/", "--") if models_dir else None
    print(f"[serve-vlm] fetching {model_id} (resumable) into {local_dir or 'the Hugging Face cache'}", file=sys.stderr)
    try:
        path = huggingface_hub.snapshot_download(
            model_id,
            local_dir=local_dir,
            token=hf_token(),
            allow_patterns=MODEL_FILE_PATTERNS,
            endpoint=endpoint,
        )
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError) as exc:
        raise hub_error(exc, model_id, alternative="pass --vlm-model-id with a downloaded model folder") or BackendError(
            f"Downloading {model_id} failed ({' '.join(str(exc).split())[:160]}).", "run again: the download resumes where it stopped."
        ) from exc
    except OSError as exc:
        raise BackendError(
            f"Downloading {model_id} failed ({exc}).", "check free disk space and --models-dir, then run again (it resumes)."
        ) from exc
    return Path(path)


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def read_log_tail(path: Path, lines: int = 20) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def max_pixels_for(max_image_side: int) -> int:
    """The `max_pixels` that keeps any image with sides <= max_image_side at full size after
    Qwen-VL's smart_resize rounds each side to a multiple of VISION_UNIT (qwen2_vl.py:1079-1128)."""
    side = -(-max(VISION_UNIT, int(max_image_side)) // VISION_UNIT) * VISION_UNIT
    return side * side


def visible_gpu_memory(cfg: VLMServerConfig) -> list[tuple[float, float]] | None:
    """(total GiB, free GiB) of each GPU vLLM will use, from nvidia-smi; None if it cannot tell.

    The GPUs are --gpus, else CUDA_VISIBLE_DEVICES, else the first --tensor-parallel-size ones.
    """
    ids = (cfg.gpus or os.environ.get("CUDA_VISIBLE_DEVICES") or "").strip()
    rows = []
    for cells in nvidia_smi("memory.total", "memory.free", ids=ids or None, timeout=20):
        try:
            total, free = (float(v) / 1024.0 for v in cells)  # MiB -> GiB
        except ValueError:
            continue
        rows.append((total, free))
    if not ids:
        rows = rows[: max(1, cfg.tensor_parallel_size)]
    return rows or None


def estimate_vllm_gib(model_path: Path | None, max_model_len: int, tensor_parallel_size: int = 1) -> float | None:
    """GiB per GPU vLLM needs for this model: weights (the safetensors files) + KV cache for one
    max_model_len sequence (layers x KV heads x head_dim x 2 x 2 bytes per token, bf16) + overhead.
    None when the model folder does not say (e.g. not downloaded yet)."""
    if model_path is None:
        return None
    try:
        weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or config
    try:
        layers = int(text["num_hidden_layers"])
        kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // int(text["num_attention_heads"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not weights:
        return None
    kv = layers * kv_heads * head_dim * 2 * 2 * max_model_len
    tp = max(1, tensor_parallel_size)
    return (weights + kv) / tp / 2**30 + RUNTIME_OVERHEAD_GIB


def choose_memory_share(
    cfg: VLMServerConfig, mode: str, gpus: list[tuple[float, float]] | None, *, need_gib: float | None = None
) -> tuple[float, str]:
    """(--gpu-memory-utilization, why). An explicit value wins; see the module docstring."""
    if cfg.gpu_memory_utilization is not None:
        if not 0.0 < cfg.gpu_memory_utilization <= 1.0:
            raise InputError(
                f"--gpu-memory-utilization {cfg.gpu_memory_utilization:g} is not a fraction of the GPU.", "give a number in (0, 1], e.g. 0.85."
            )
        return cfg.gpu_memory_utilization, "given"
    mode = "query" if mode != "scene" else "scene"
    if not gpus:
        return FALLBACK_SHARE[mode], f"{mode} mode; nvidia-smi did not report the GPU's memory, so the fallback"
    reserve = cfg.sam3_reserve_gib if mode == "query" else 0.0
    total = min(t for t, _ in gpus)
    free = min(f for _, f in gpus)
    share = min(SCENE_SHARE, (free - reserve) / total - FREE_MARGIN)
    share = int(share * 100) / 100.0  # round down
    why = f"{mode} mode; {free:.1f} of {total:.1f} GiB free" + (f", {reserve:g} GiB left for SAM3" if reserve else "")
    if share < 0.05:
        raise BackendError(
            f"vLLM cannot get GPU memory: {why}.",
            "free the GPU, put vLLM on another one with --gpus, lower --sam3-reserve-gib, or set --gpu-memory-utilization.",
        )
    if need_gib is not None and share * total < need_gib:
        print(
            f"[serve-vlm] warning: vLLM gets {share * total:.1f} GiB ({share:.2f} of the GPU; {why}) but needs about "
            f"{need_gib:.1f} GiB with --max-model-len {cfg.max_model_len}; it may fail to start. Lower --max-model-len, "
            "use a larger GPU or more --gpus with --tensor-parallel-size.",
            file=sys.stderr,
        )
    return share, why


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""urllib without proxies: the server is on 127.0.0.1, and http_proxy must not route it elsewhere."""


class VLLMServer:
    """`with VLLMServer(cfg, log_path) as server:` -> vLLM ready at `server.url` with `server.api_key`.

    `mode` ("scene" or "query") picks the GPU share when --gpu-memory-utilization is not given;
    `max_image_side` caps vLLM's image size (profiling and runtime) to what the planner sends.
    """

    _live: list[VLLMServer] = []
    _handlers_installed = False

    def __init__(
        self,
        cfg: VLMServerConfig,
        log_path: Path,
        *,
        served_model_name: str = DEFAULT_SERVED_NAME,
        mode: str = "query",
        max_image_side: int | None = 1280,
        poll_interval: float = 0.5,
        progress_every: float = 10.0,
        stop_grace: float = 20.0,
    ):
        self.cfg = cfg
        self.log_path = Path(log_path)
        self.model_name = served_model_name
        self.mode = mode
        self.max_image_side = max_image_side
        self.memory_share: float | None = None
        self.memory_share_reason = ""
        self.api_key = secrets.token_urlsafe(24)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.model_path: Path | None = None
        self.poll_interval = poll_interval
        self.progress_every = progress_every
        self.stop_grace = stop_grace
        self.ready_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def argv(self, model_path: str | Path) -> list[str]:
        """The `vllm serve` command line (the API key travels in the environment instead)."""
        cfg = self.cfg
        extra = list(cfg.vllm_arg or [])
        # vLLM reads --flag_name as --flag-name (utils/argparse_utils.py:373-392), so compare that way.
        given = {a.split("=", 1)[0].replace("_", "-") for a in extra if a.startswith("--")}
        if "--allowed-local-media-path" in given:
            raise InputError(
                "--allowed-local-media-path would give the VLM server read access to files.", "drop it: images are sent inline."
            )
        if "--api-key" in given:
            raise InputError(
                "--api-key in --vllm-arg would replace the key the pipeline generates (and show it in `ps`).",
                "drop it: the launcher passes its own key in VLLM_API_KEY; use --vlm-url with --vlm-api-key for a server of your own.",
            )
        if self.memory_share is None:
            gpus = visible_gpu_memory(cfg) if cfg.gpu_memory_utilization is None else None
            need = estimate_vllm_gib(Path(model_path), cfg.max_model_len, cfg.tensor_parallel_size)
            self.memory_share, self.memory_share_reason = choose_memory_share(cfg, self.mode, gpus, need_gib=need)
        args = [
            cfg.vllm_command,
            "serve",
            str(model_path),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--served-model-name",
            self.model_name,
            "--max-model-len",
            str(cfg.max_model_len),
            "--gpu-memory-utilization",
            f"{self.memory_share:g}",
            "--tensor-parallel-size",
            str(cfg.tensor_parallel_size),
        ]
        if cfg.limit_mm_per_prompt:
            try:
                json.loads(cfg.limit_mm_per_prompt)
            except ValueError as exc:
                raise InputError(
                    f"--limit-mm-per-prompt is not JSON: {cfg.limit_mm_per_prompt!r}.", 'write it like \'{"image": 1, "video": 0}\'.'
                ) from exc
            args += ["--limit-mm-per-prompt", cfg.limit_mm_per_prompt]
        if self.max_image_side and "--mm-processor-kwargs" not in given:
            # Profiling otherwise runs a 16384-token dummy image (qwen3_vl.py:1146-1156); this also
            # caps runtime resizing, which never touches our images (their sides are <= max_image_side).
            args += ["--mm-processor-kwargs", json.dumps({"max_pixels": max_pixels_for(self.max_image_side)})]
        if cfg.reasoning_parser:
            args += ["--reasoning-parser", cfg.reasoning_parser]
        return args + extra

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> VLLMServer:
        cfg = self.cfg
        # The model first: a download can take long enough for a port picked earlier to be taken.
        self.model_path = resolve_model(cfg.vlm_model_id, cfg.models_dir)
        if cfg.vlm_port:
            if not port_is_free(cfg.vlm_port):
                raise BackendError(
                    f"Port {cfg.vlm_port} on {HOST} is already in use.",
                    f"pick another --vlm-port (0 picks a free one), or reuse the server running there with "
                    f"--vlm-url http://{HOST}:{cfg.vlm_port}/v1.",
                )
            self.port = cfg.vlm_port
        else:
            self.port = pick_free_port()
        argv = self.argv(self.model_path)
        print(f"[serve-vlm] --gpu-memory-utilization {self.memory_share:g} ({self.memory_share_reason})", file=sys.stderr)
        env = dict(os.environ)
        env["VLLM_API_KEY"] = self.api_key
        if cfg.gpus:
            env["CUDA_VISIBLE_DEVICES"] = cfg.gpus
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                self.process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # own process group: Ctrl-C does not reach it, we stop it as a group
                    preexec_fn=None if cfg.keep_server else _parent_death_signal(),
                )
            except FileNotFoundError as exc:
                raise BackendError(
                    f"Cannot run '{cfg.vllm_command}': no such executable.",
                    "install vLLM (bash envs/setup.sh vllm) or pass --vllm-command with the vllm inside its env.",
                ) from exc
        if not cfg.keep_server:
            _register(self)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Poll GET /v1/models with the key until it answers, the process exits or the deadline passes."""
        assert self.process is not None
        started = time.monotonic()
        deadline = started + self.cfg.ready_timeout
        next_report = started + self.progress_every
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"vLLM exited with code {code} while starting (log: {self.log_path}).",
                    "read the log lines below: out of GPU memory -> lower --gpu-memory-utilization or --max-model-len; "
                    "port in use -> another --vlm-port; missing weights -> check --vlm-model-id.",
                    log_path=self.log_path,
                    log_tail=read_log_tail(self.log_path),
                )
            status = self._probe()
            if status == 200:
                self.ready_seconds = time.monotonic() - started
                print(f"[serve-vlm] vLLM ready at {self.url} after {self.ready_seconds:.0f} s", file=sys.stderr)
                return
            if status in (401, 403):
                raise ServerStartError(
                    f"Something on port {self.port} answers but refuses our API key (HTTP {status}).",
                    "another server took the port; pick another --vlm-port or 0.",
                    log_path=self.log_path,
                    log_tail=read_log_tail(self.log_path),
                )
            now = time.monotonic()
            if now >= deadline:
                raise ServerStartError(
                    f"vLLM was not ready after {self.cfg.ready_timeout:g} s (log: {self.log_path}).",
                    "raise --ready-timeout (the first load downloads and compiles), or read the log lines below.",
                    log_path=self.log_path,
                    log_tail=read_log_tail(self.log_path),
                )
            if now >= next_report:
                tail = read_log_tail(self.log_path, 1)
                last = f"; last log line: {tail[-1][:120]}" if tail else ""
                print(
                    f"[serve-vlm] waiting for vLLM: {now - started:.0f} s of {self.cfg.ready_timeout:g} s (log: {self.log_path}){last}",
                    file=sys.stderr,
                )
                next_report = now + self.progress_every
            time.sleep(self.poll_interval)

    def _probe(self) -> int | None:
        request = urllib.request.Request(f"{self.url}/models", headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with _DIRECT.open(request, timeout=2.0) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after `stop_grace` seconds. Idempotent."""
        process = self.process
        if process is None:
            return
        pgid = process.pid  # start_new_session made it the group leader
        _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_grace)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            process.wait(timeout=10)
        # Workers the leader left behind (vLLM's engine processes) share the group.
        if _group_exists(pgid):
            time.sleep(0.2)
            _signal_group(pgid, signal.SIGKILL)
        _unregister(self)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.cfg.keep_server and self.alive():
            print(
                f"[serve-vlm] leaving vLLM running (--keep-server): pid {self.pid}, {self.url}; stop it with: kill -TERM -- -{self.pid}\n"
                f"[serve-vlm] reuse it with: export SAM3DGS_VLM_URL={self.url} SAM3DGS_VLM_API_KEY={self.api_key} "
                f"SAM3DGS_VLM_MODEL={self.model_name}",
                file=sys.stderr,
            )
            return
        self.stop()


def serve_vlm_main(
    cfg: VLMServerConfig, run_log_dir: Path, *, served_model_name: str = DEFAULT_SERVED_NAME, max_image_side: int | None = 1280
) -> int:
    """`python -m pipeline serve-vlm`: start vLLM, print how to use it, wait for Ctrl-C, stop it.

    The GPU share is query mode's: runs that use this server may run SAM3 beside it.
    With keep_server it returns right after readiness and leaves the server running.
    Errors propagate as PipelineError for the CLI to print.
    """
    log_path = Path(run_log_dir) / "vllm.log"
    server = VLLMServer(cfg, log_path, served_model_name=served_model_name, mode="query", max_image_side=max_image_side)
    with server:
        print(f"vLLM is serving '{server.model_name}' at {server.url} (log: {log_path})")
        print(f"export SAM3DGS_VLM_URL={server.url} SAM3DGS_VLM_API_KEY={server.api_key} SAM3DGS_VLM_MODEL={server.model_name}")
        sys.stdout.flush()
        if cfg.keep_server:
            print(f"stop it with: kill -TERM -- -{server.pid}")
            return 0
        try:
            print("Press Ctrl-C to stop it.", file=sys.stderr)  # inside the try: a Ctrl-C right after it is caught
            while server.alive():
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("\n[serve-vlm] stopping vLLM", file=sys.stderr)
            return 0
        assert server.process is not None
        raise ServerStartError(
            f"vLLM stopped on its own with code {server.process.returncode} (log: {log_path}).",
            "read the log lines below, then start it again.",
            log_path=log_path,
            log_tail=read_log_tail(log_path),
        )


# ---- orphan protection ------------------------------------------------------------------------

_previous_handlers: dict[int, Any] = {}
_registry_lock = threading.Lock()


def _register(server: VLLMServer) -> None:
    with _registry_lock:
        VLLMServer._live.append(server)
        if not VLLMServer._handlers_installed:
            atexit.register(_stop_all)
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGHUP):
                    previous = signal.getsignal(sig)
                    if previous in (signal.SIG_DFL, None):
                        _previous_handlers[sig] = previous
                        signal.signal(sig, _on_signal)
            VLLMServer._handlers_installed = True


def _unregister(server: VLLMServer) -> None:
    with _registry_lock:
        if server in VLLMServer._live:
            VLLMServer._live.remove(server)


def _stop_all() -> None:
    for server in list(VLLMServer._live):
        try:
            server.stop()
        except Exception:  # at exit, keep stopping the others
            pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    # Then die the way the signal would have killed us, so callers see the usual exit status.
    signal.signal(signum, _previous_handlers.get(signum) or signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parent_death_signal() -> Any:
    """On Linux, ask the kernel to SIGTERM vLLM if this process dies without cleaning up (e.g. SIGKILL).

    Only from the main thread: the signal fires when the *thread* that started the child exits.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def set_pdeathsig() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: no signal will come
            os._exit(1)

    return set_pdeathsig
