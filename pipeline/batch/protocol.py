"""The batch worker protocol (docs/BATCH.md) and `WorkerProcess`, its driver side.

A stage worker is a child process, `python -m pipeline worker --stage stage1|stage2 [flags]`, run
with that stage's interpreter (its conda env or the light venv). It speaks JSON lines: its stdout
carries only protocol messages, its logs go to stderr (a log file chosen by the driver) and to each
photo's <run>/logs/.

    child  -> {"event": "ready", "pid": N, "stage": "stage1", "concurrency": C, "versions": {...}}
    driver -> {"id": "7", "image": "/abs/photo.jpg", "run_dir": "/abs/ROOT/run_rel", "key": "..."}
    child  -> {"id": "7", "status": "done"|"partial"|"failed", "error": null|"one line", "objects": N,
               "seconds": S, "final": true|false}
    driver -> {"op": "exit"}   (or closes stdin)  -> the child finishes what is in flight and exits 0

A child that cannot build its stage says {"event": "fatal", "error": "...", "exit_code": N} and exits.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import BackendError

PROTOCOL_VERSION = 1
STAGES = ("stage1", "stage2")
STATUSES = ("done", "partial", "failed")


# ---------------------------------------------------------------- messages


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line (UTF-8 JSON, no embedded newlines)."""
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse one protocol line; anything but a JSON object is a ValueError."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"protocol line is not a JSON object: {str(line)[:80]!r}")
    return message


def answer(request_id: str, status: str, *, error: str | None = None, objects: int = 0, seconds: float = 0.0, final: bool = True) -> dict[str, Any]:
    """A child's answer to one request. `final`: the result holds for these inputs (a rerun need not
    redo it); false for failures that may pass on a retry (a server down, a crash)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    return {"id": request_id, "status": status, "error": error, "objects": int(objects), "seconds": round(float(seconds), 3), "final": bool(final)}


# ---------------------------------------------------------------- flags for the child


def config_argv(cfgs: Any) -> list[str]:
    """The flags that rebuild `cfgs` (a pipeline.stages.Configs) in a child: every field that differs
    from its default, except the photo and run folder (per request) and secrets and URLs, which
    travel in the environment (`config_env`), never in argv where `ps` shows them."""
    argv: list[str] = []
    for section in dataclasses.fields(cfgs):
        cfg = getattr(cfgs, section.name)
        for f in dataclasses.fields(cfg):
            if f.name in ("image", "out") or f.metadata.get("secret") or f.metadata.get("url"):
                continue
            value = getattr(cfg, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if value == default:
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                argv += [f"{flag}={v}" for v in value]
            elif value is None:
                continue  # a None that is not the default cannot be spelled as a flag; the default applies
            else:
                argv.append(f"{flag}={value}")
    return argv


def config_env(cfgs: Any) -> dict[str, str]:
    """Secret and URL fields as the environment variables their config fields read (SAM3DGS_VLM_URL ...)."""
    env: dict[str, str] = {}
    for section in dataclasses.fields(cfgs):
        cfg = getattr(cfgs, section.name)
        for f in dataclasses.fields(cfg):
            name = f.metadata.get("env")
            value = getattr(cfg, f.name)
            if name and value is not None and (f.metadata.get("secret") or f.metadata.get("url")):
                env[name] = str(value)
    return env


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def project_pythonpath(current: str | None) -> str:
    """PYTHONPATH for a process that runs `python -m pipeline`: the project first, then `current`."""
    return str(project_root()) + (os.pathsep + current if current else "")


# ---------------------------------------------------------------- driver side


class WorkerStartError(BackendError):
    """A stage worker did not become ready. `exit_code` is the child's own (3: a missing dependency)."""

    def __init__(self, problem: str, fix: str = "", exit_code: int = 4):
        super().__init__(problem, fix or None)
        self.exit_code = exit_code

    def __reduce__(self):  # crosses process boundaries (Ray sends it from the actor to the driver)
        return (type(self), (self.problem, self.fix or "", self.exit_code))


@dataclasses.dataclass
class _Slot:
    request_id: str
    generation: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None
    crash: str | None = None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "worker stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"worker exited with signal {-code} ({name})"
    return f"worker exited with code {code}"


class WorkerProcess:
    """One persistent stage worker child, restarted when it dies.

    `process(image, run_dir)` is thread-safe: up to `concurrency` callers have a photo in flight at
    once. When the child dies, every photo in flight gets one attempt charged and is retried alone
    (so the next crash names the photo that causes it), up to `max_attempts`; then it is answered
    as failed with the crash ("worker exited with signal 9 (SIGKILL) while processing ...").
    """

    def __init__(
        self,
        stage: str,
        flags: list[str],
        *,
        python: str | None = None,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        max_attempts: int = 3,
        ready_timeout: float = 3600.0,
        name: str | None = None,
    ):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        self.stage = stage
        self.flags = list(flags)
        self.python = python or sys.executable
        self.concurrency = max(1, int(concurrency))
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.max_attempts = max(1, int(max_attempts))
        self.ready_timeout = ready_timeout
        self.name = name or stage
        self.process_: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] | None = None
        self.starts = 0
        self._generation = 0
        self._exited_generation = 0  # the newest child whose reader saw it end
        self._ids = itertools.count(1)
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()  # slots, generation, process_
        self._start_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._gate = threading.Condition()
        self._in_flight = 0
        self._solo = False
        self._broken: WorkerStartError | None = None
        self._closed = False
        self._fatal: dict[str, Any] | None = None

    # ---- lifecycle

    def argv(self) -> list[str]:
        return [self.python, "-m", "pipeline", "worker", "--stage", self.stage, "--concurrency", str(self.concurrency), *self.flags]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONPATH"] = project_pythonpath(env.get("PYTHONPATH"))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["SAM3DGS_WORKER_PARENT"] = str(os.getpid())  # worker._exit_with_parent: exit when this process dies
        return env

    @property
    def pid(self) -> int | None:
        return self.process_.pid if self.process_ is not None else None

    def start(self) -> dict[str, Any]:
        """Start the child and wait for its ready line. Raises WorkerStartError."""
        with self._start_lock:
            return self._start_locked()

    def _start_locked(self) -> dict[str, Any]:
        if self._broken is not None:
            raise self._broken
        if self.alive():
            assert self.ready is not None
            return self.ready
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to Popen
        try:
            if hasattr(log, "write"):
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}: {' '.join(self.argv())}\n".encode())
                log.flush()
            try:
                proc = subprocess.Popen(
                    self.argv(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=self._env(),
                    cwd=str(project_root()),
                    start_new_session=True,  # Ctrl-C reaches the driver only; it stops the children itself
                )
            except OSError as exc:
                raise WorkerStartError(
                    f"cannot start the {self.stage} worker with {self.python}: {exc}.",
                    f"pass --{self.stage}-python with an interpreter of that stage's env.",
                ) from exc
        finally:
            if hasattr(log, "close"):
                log.close()
        with self._lock:
            self._generation += 1
            generation = self._generation
            self.process_ = proc
            self.ready = None
            self._fatal = None
        ready_event = threading.Event()  # this child's own: a dead child's reader must not wake a new start
        self.starts += 1
        threading.Thread(target=self._read, args=(proc, generation, ready_event), name=f"{self.name}-reader", daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while not ready_event.wait(0.05):
            if proc.poll() is not None:
                ready_event.wait(2.0)  # the reader may still be parsing a last 'fatal' line
                break
            if time.monotonic() > deadline:
                self._kill(proc)
                raise WorkerStartError(
                    f"the {self.stage} worker was not ready after {self.ready_timeout:g} s (log: {self.log_path}).",
                    "read its log; model loading may need a longer --worker-ready-timeout.",
                )
        if self.ready is None:
            code = proc.wait()
            fatal = self._fatal or {}
            if fatal.get("error"):
                raise WorkerStartError(fatal["error"], "", exit_code=int(fatal.get("exit_code", 4)))
            tail = _log_tail(self.log_path)
            raise WorkerStartError(
                f"the {self.stage} worker did not start: {describe_exit(code)}" + (f"; its last log line: {tail}" if tail else "") + ".",
                f"read {self.log_path}" if self.log_path else "run `python -m pipeline worker --stage ...` by hand to see why.",
            )
        return self.ready

    def alive(self) -> bool:
        return self.process_ is not None and self.process_.poll() is None and self.ready is not None

    def _read(self, proc: subprocess.Popen[bytes], generation: int, ready_event: threading.Event) -> None:
        """Reader thread: answers to their slots; at EOF, every slot of this child learns of the crash."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                message = decode(raw)
            except ValueError:
                continue  # stray output that is not ours
            if message.get("event") == "ready":
                self.ready = message
                ready_event.set()
            elif message.get("event") == "fatal":
                self._fatal = message
            elif "id" in message:
                with self._lock:
                    slot = self._slots.pop(str(message["id"]), None)
                if slot is not None:
                    slot.answer = message
                    slot.done.set()
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stdout closed but still running: not usable any more
            self._kill(proc)
            code = proc.wait()
        ready_event.set()
        with self._lock:
            self._exited_generation = max(self._exited_generation, generation)
            orphans = [s for s in self._slots.values() if s.generation == generation]
            for s in orphans:
                del self._slots[s.request_id]
        for s in orphans:
            s.crash = describe_exit(code)
            s.done.set()

    # ---- requests

    def _acquire(self, solo: bool) -> None:
        with self._gate:
            while self._solo or (self._in_flight > 0 if solo else self._in_flight >= self.concurrency):
                self._gate.wait()
            self._in_flight += 1
            self._solo = solo

    def _release(self) -> None:
        with self._gate:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._solo = False
            self._gate.notify_all()

    def _send(self, message: dict[str, Any]) -> _Slot:
        while True:
            with self._start_lock:
                if not self.alive():
                    self._start_locked()
                with self._lock:
                    # A child whose reader already swept its slots would never answer this one.
                    if self._exited_generation != self._generation:
                        slot = _Slot(str(message["id"]), self._generation)
                        self._slots[slot.request_id] = slot
                        proc = self.process_
                        break
        assert proc is not None and proc.stdin is not None
        try:
            with self._write_lock:
                proc.stdin.write(encode(message))
                proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: its reader thread fails the slot
        return slot

    def process(self, image: str, run_dir: str, *, key: str | None = None, plan: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one photo and wait for its answer (retrying after crashes). Raises WorkerStartError
        when the child cannot be (re)started. `plan`: stage 1's plan made ahead (Stage1.plan_ahead)."""
        if self._closed:
            raise BackendError(
                f"the {self.stage} worker {self.name} was stopped before it got {image}.", "run the same batch command again: it finishes the rest."
            )
        solo = False
        for attempt in range(1, self.max_attempts + 1):
            self._acquire(solo)
            try:
                message = {"id": str(next(self._ids)), "image": str(image), "run_dir": str(run_dir)}
                if key is not None:
                    message["key"] = key
                if plan is not None:
                    message["plan"] = plan
                try:
                    slot = self._send(message)
                except WorkerStartError as exc:
                    self._broken = exc
                    raise
                slot.done.wait()
            finally:
                self._release()
            if slot.answer is not None:
                return {**slot.answer, "attempts": attempt}
            solo = True  # a retry runs alone: a second crash is this photo's doing
            crash = slot.crash
        return answer(
            "",
            "failed",
            error=f"{crash} while processing {image} ({self.max_attempts} attempts)",
            final=False,
        ) | {"attempts": self.max_attempts}

    def close(self, timeout: float = 30.0) -> None:
        """Ask the child to exit after what is in flight; kill it after `timeout` s. Idempotent."""
        self._closed = True
        proc = self.process_
        if proc is None or proc.poll() is not None:
            return
        try:
            with self._write_lock:
                assert proc.stdin is not None
                proc.stdin.write(encode({"op": "exit"}))
                proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)

    def kill(self) -> None:
        """Stop the child now (Ctrl-C): closing stdin with photos in flight makes it exit at once."""
        self._closed = True
        proc = self.process_
        if proc is None or proc.poll() is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill(proc)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # its own session: the group holds whatever it started
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue


def _log_tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


@dataclasses.dataclass
class WorkerSpec:
    """Everything an engine needs to start one stage's workers (the same for every engine)."""

    stage: str
    flags: list[str]
    python: str
    concurrency: int = 1
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    max_attempts: int = 3
    ready_timeout: float = 3600.0
    log_dir: Path | None = None

    def make(self, name: str, extra_env: dict[str, str] | None = None) -> WorkerProcess:
        return WorkerProcess(
            self.stage,
            self.flags,
            python=self.python,
            concurrency=self.concurrency,
            env={**self.env, **(extra_env or {})},
            log_path=(self.log_dir / f"{name}.log") if self.log_dir else None,
            max_attempts=self.max_attempts,
            ready_timeout=self.ready_timeout,
            name=name,
        )
