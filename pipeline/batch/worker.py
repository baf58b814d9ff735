"""`python -m pipeline worker --stage stage1|stage2 [flags]`: the child side of the batch protocol.

Builds Stage1 or Stage2 once and loads its models eagerly (the segmenter, or the lifter) before it
says "ready", so a missing model or dependency shows at start, not on the first photo. Then answers
photo requests from stdin, `concurrency` at a time, in completion order. A photo's failure is an
answer, never a crash. Stdout carries only protocol lines: fd 1 is pointed at stderr so nothing a
library prints can corrupt them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.batch import manifest as M
from pipeline.batch.protocol import PROTOCOL_VERSION, answer, decode, encode
from pipeline.core.errors import InputError, PipelineError, describe
from pipeline.core.runfolder import RunPaths, foreign_entries

_OWN_ENTRIES = frozenset({"run.json", "report.html", "input", "logs", "stage1", "masks", "objects", "scene"})


class _PhotoLog:
    """`log=` for the stages: each line to stderr (the worker's log) and to the photo's
    <run>/logs/pipeline.log, chosen per thread since photos run concurrently."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.logger = logging.getLogger("pipeline")

    def __call__(self, msg: str) -> None:
        run = getattr(self.local, "run", None)
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(f"[{run.name if run else '-'}] {line}", file=sys.stderr, flush=True)
        if run is not None:
            try:
                with open(RunPaths(run).logs_dir / "pipeline.log", "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
            except OSError:
                pass


class StageWorker:
    """One stage, built once; `handle(request)` processes one photo and returns the answer."""

    def __init__(self, stage: str, cfgs: Any, *, log: _PhotoLog):
        from pipeline.selection import choose_backends
        from pipeline.stages import Stage1, Stage2

        self.stage = stage
        self.cfgs = cfgs
        self.log = log
        self.choice = choose_backends(cfgs.run, cfgs.planner, cfgs.server, cfgs.segmenter, cfgs.lifter)
        if stage == "stage1":
            kept_only = os.environ.get("SAM3DGS_PLANS_KEPT") == "1"  # the driver started no server: every plan is kept
            if self.choice.planner == "vlm" and self.choice.start_vlm_server and not kept_only:
                raise InputError(
                    "a stage 1 batch worker needs a running VLM server (SAM3DGS_VLM_URL); it does not start vLLM itself.",
                    "run it through `python -m pipeline batch` (which starts one server), or set SAM3DGS_VLM_URL.",
                )
            # SAM3DGS_VLM_STARTED: the driver started this vLLM with our flags (protocol environment).
            self.runner = Stage1(cfgs, self.choice, log=log, started_vllm=os.environ.get("SAM3DGS_VLM_STARTED") == "1", kept_plans_only=kept_only)
            segmenter = self.runner.segmenter()
            if hasattr(segmenter, "load"):
                segmenter.load()  # SAM3 now: a missing package or checkpoint fails the start, not every photo
        else:
            self.runner = Stage2(cfgs, self.choice, log=log)
            self.runner.lifter()
            try:
                log(f"warmed up for the first photo: {self.runner.warm_up()}")
            except Exception as exc:  # noqa: BLE001 - the photo itself then fails with the reason, in its own record
                log(f"warm-up skipped: {describe(exc, with_type=True)}")
        self.key = M.stage_key(stage, cfgs)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        rid = str(request.get("id", ""))
        t0 = time.perf_counter()
        image = str(request.get("image") or "")
        run_dir = Path(str(request.get("run_dir") or ""))
        key = str(request.get("key") or self.key)
        self.log.local.run = run_dir
        stamp = M.file_stamp(Path(image)) if image else None
        masks_stamp = None
        status, error, objects, final = "failed", None, 0, True
        ours = False  # only a run folder of ours gets the record
        try:
            _check_run_dir(run_dir)
            ours = True
            run_dir.mkdir(parents=True, exist_ok=True)
            RunPaths(run_dir).logs_dir.mkdir(parents=True, exist_ok=True)
            if self.stage == "stage1":
                if not image:
                    raise InputError("the request names no image.", "send {'id', 'image', 'run_dir'}.")
                ahead = request.get("plan")  # planned by the driver while this worker started
                result = self.runner.process(Path(image), run_dir, ahead=ahead if isinstance(ahead, dict) else None)
                status, objects = "done", int(result.get("objects", 0))
            else:
                masks_stamp = M.file_stamp(RunPaths(run_dir).masks_json)
                # The run's own input/image.png: same pixels as the photo, and present even if the photo moved.
                result = self.runner.process(run_dir, None)
                states = [o.get("status") for o in result["objects"].values()]
                objects = states.count("done")
                failed = len(states) - objects
                status = "done" if failed == 0 else "partial" if objects else "failed"
                if failed:
                    errors = [o.get("error") for o in result["objects"].values() if o.get("status") != "done"]
                    error = f"{failed} of {len(states)} objects failed: {next((e for e in errors if e), 'see run.json')}"
        except PipelineError as exc:
            error = describe(exc)
            # Bad input (a corrupt photo, no objects found) stays bad: a rerun need not retry it.
            final = isinstance(exc, InputError)
            self.log(f"{self.stage} failed: {error}")
        except Exception as exc:  # noqa: BLE001 - one photo's bug is its answer, the worker goes on
            error = describe(exc, with_type=True)
            final = False
            self.log(f"{self.stage} failed: {error}\n{traceback.format_exc()}")
        seconds = time.perf_counter() - t0
        try:
            if ours:
                M.record_stage(run_dir, self.stage, image=image, image_stamp=stamp, key=key, status=status, error=error,
                               objects=objects, seconds=seconds, final=final, masks_stamp=masks_stamp)
        except Exception as exc:  # noqa: BLE001 - the answer still goes back
            self.log(f"could not record the result in run.json: {describe(exc, with_type=True)}")
        finally:
            self.log.local.run = None
        return answer(rid, status, error=error, objects=objects, seconds=seconds, final=final)


def _check_run_dir(run_dir: Path) -> None:
    """A run folder is new, empty, or ours: never write into someone else's folder."""
    if not run_dir.is_absolute():
        raise InputError(f"run_dir {run_dir} is not absolute.", "the driver sends absolute paths.")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir} is a file, not a run folder.", "move it away; the batch puts this photo's run folder there.")
    foreign = foreign_entries(run_dir, _OWN_ENTRIES)
    if foreign:
        raise InputError(
            f"{run_dir} holds other files ({', '.join(foreign[:3])}) and no run.json.",
            "move them away; the batch puts this photo's run folder there.",
        )


def _protocol_out() -> BinaryIO:
    """A private copy of stdout for protocol lines; fd 1 then points at stderr."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


PARENT_ENV = "SAM3DGS_WORKER_PARENT"  # the pid of the process that started this worker (protocol.WorkerProcess sets it)


def _exit_with_parent(interval: float = 0.5) -> None:
    """Exit at once when the process that started this worker dies (the driver, or the Ray actor
    owning it, killed with -9): a watchdog thread, running from before the models load, so a worker
    still loading cannot outlive it. (The end of stdin says the same, but only once the loop reads it.)

    Two signs, either one enough: this process's parent changes (it was handed to init or a
    subreaper), or the starter named in the environment is gone. The second catches a starter
    killed while this interpreter was still starting (the parent had already changed when it was
    first read) and works through a wrapper script that runs the interpreter as its child."""
    first_parent = os.getppid()
    try:
        starter: int | None = int(os.environ.pop(PARENT_ENV, ""))  # popped: not for this worker's own children
    except ValueError:
        starter = None

    def gone() -> bool:
        return os.getppid() != first_parent or (starter is not None and not _running(starter))

    def watch() -> None:
        while not gone():
            time.sleep(interval)
        print("the process that started this worker is gone; exiting now", file=sys.stderr, flush=True)
        os._exit(0)

    if gone():
        watch()
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a killed starter its own parent has not reaped yet)."""
    if not os.path.exists("/proc/self/stat"):  # no /proc: ask the kernel (a zombie then counts as running)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def worker_main(stage: str, concurrency: int, cfgs: Any) -> int:
    """Run the worker loop until {"op": "exit"} or end of stdin, then end the process (exit code 0,
    without the interpreter's teardown). Returns only when the worker could not start: its exit code."""
    _exit_with_parent()
    out = _protocol_out()
    write_lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        with write_lock:
            out.write(encode(message))

    log = _PhotoLog()
    for old in list(logging.getLogger("pipeline").handlers):  # the CLI's temporary log file: stderr is this worker's log
        logging.getLogger("pipeline").removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    cfgs.run.progress = False  # no bars inside workers: the driver shows one over photos
    try:
        from pipeline.core.device import pin_cuda_device

        # Before anything imports torch. A batch's workers get their GPU as CUDA_VISIBLE_DEVICES from
        # the driver or Ray (the driver refuses --device cuda:N), so this only acts on a worker
        # started by hand with --device cuda:N.
        cfgs.run.device = pin_cuda_device(cfgs.run.device)
        worker = StageWorker(stage, cfgs, log=log)
    except PipelineError as exc:
        send({"event": "fatal", "error": str(exc), "exit_code": exc.exit_code})
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - reported to the driver, then exit
        send({"event": "fatal", "error": describe(exc, with_type=True), "exit_code": 5})
        traceback.print_exc()
        return 5
    from pipeline.stages import versions

    send({"event": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "stage": stage, "concurrency": concurrency,
          "backends": worker.choice.record(), "versions": versions()})

    in_flight = 0
    lock = threading.Lock()

    def run(request: dict[str, Any]) -> None:
        nonlocal in_flight
        try:
            send(worker.handle(request))
        finally:
            with lock:
                in_flight -= 1

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix=f"{stage}-photo") as pool:
        for raw in sys.stdin.buffer:
            try:
                message = decode(raw)
            except ValueError:
                print(f"ignored a line that is not a JSON object: {raw[:80]!r}", file=sys.stderr)
                continue
            if message.get("op") == "exit":
                break
            with lock:
                in_flight += 1
            pool.submit(run, message)
        else:
            with lock:
                busy = in_flight
            if busy:
                # stdin closed with photos in flight: the driver is gone (killed) or stopping now.
                # Stop at once; atomic writes leave every file whole, the next run cleans temporaries.
                print(f"stdin closed with {busy} photo(s) in flight: the driver is gone; exiting now", file=sys.stderr, flush=True)
                os._exit(0)
    # Every photo is answered and its files written (atomically). The interpreter's teardown (torch's,
    # CUDA's) took 0.7-1.0 s that the driver waited for at the end of each stage: skip it.
    logging.shutdown()
    sys.stderr.flush()
    out.close()
    os._exit(0)
