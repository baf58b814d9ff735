"""`python -m pipeline <command>`: the only place that prints errors and chooses exit codes.

Exit codes: 0 done; 1 finished but some objects failed; 2 bad input; 3 missing dependency;
4 a model backend or server failed; 5 internal error; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pipeline.core import config as C
from pipeline.core.cli_args import add_config_arguments, config_from_args
from pipeline.core.errors import PipelineError, describe
from pipeline.core.runfolder import RunPaths, default_run_dir

EXIT_OK, EXIT_PARTIAL, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 5, 130

COMMANDS = {
    "run": "Both stages in one process: photo -> masks -> 3D objects -> scene -> report.",
    "stage1": "Stage 1: photo -> plan (VLM) -> masks/ (SAM3 or classical).",
    "stage2": "Stage 2: photo + masks (ours or another tool's) -> objects/ -> scene/ -> report.",
    "demo": "Make the bundled demo scene and run the whole pipeline on it with the built-in backends.",
    "export": "Write .ply/.splat/GIFs and the composed scene from objects/*/gaussians.pt (CPU, no SAM 3D needed).",
    "report": "Write report.html for a run folder (or index.html for a folder of runs with --index).",
    "view": "Interactive 3D viewer of a run's scene in the browser (viser, on 127.0.0.1).",
    "serve-vlm": "Start vLLM for the planner and keep it running until Ctrl-C; prints its URL.",
    "doctor": "Check everything the full profile needs and print the command that fixes each gap.",
    "batch": "Many photos (a folder or a list file) through the stages, models loaded once per worker; --out is the batch root.",
    "worker": "A batch stage worker speaking the line protocol on stdin/stdout (started by `batch`; see docs/BATCH.md).",
}
STAGE_COMMANDS = ("run", "stage1", "stage2", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="sam3d-gs: a photo into posed 3D Gaussian objects.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in STAGE_COMMANDS:
            seen: set[str] = set()
            for cls in C.STAGE_CONFIGS:
                add_config_arguments(p, cls, seen)
        elif name in ("export", "view", "report"):
            p.add_argument("run_dir", type=Path, help="A run folder (for report --index: a folder of run folders).")
            if name == "export":
                add_config_arguments(p, C.ExportConfig)
            if name == "report":
                p.add_argument("--index", action="store_true", help="Write index.html linking every run under RUN_DIR.")
            if name == "view":
                p.add_argument("--host", default="127.0.0.1", help="Interface to serve on [default: 127.0.0.1].")
                p.add_argument("--port", type=int, default=8080, help="Port [default: 8080].")
        elif name == "serve-vlm":
            add_config_arguments(p, C.VLMServerConfig)
            add_config_arguments(p, C.PlannerConfig)
            p.add_argument("--log-dir", type=Path, default=Path("outputs/vlm-server"), help="Where vllm.log goes.")
        elif name in ("batch", "worker"):
            if name == "batch":
                add_config_arguments(p, C.BatchConfig)
            else:
                p.add_argument("--stage", required=True, choices=["stage1", "stage2"], help="Which stage this worker runs.")
                p.add_argument("--concurrency", type=int, default=1, help="Photos in flight at once (stage 1 with a VLM: its requests overlap).")
            seen = set()
            for cls in C.STAGE_CONFIGS:
                add_config_arguments(p, cls, seen)
        elif name == "doctor":
            add_config_arguments(p, C.SegmenterConfig)
            add_config_arguments(p, C.LifterConfig)
            add_config_arguments(p, C.VLMServerConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_path = _start_log(None)
    try:
        return COMMAND_FUNCS[args.command](args, log_path)
    except KeyboardInterrupt:
        print("interrupted; finished objects are kept, a re-run continues where this one stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PipelineError as exc:
        logging.getLogger("pipeline").error("%s\n%s", exc, traceback.format_exc())
        print(f"error: {exc}", file=sys.stderr)
        print(f"(full log: {_current_log()})", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, the log has the rest
        logging.getLogger("pipeline").error("internal error\n%s", traceback.format_exc())
        print(f"error: internal error: {describe(exc, with_type=True)}", file=sys.stderr)
        print(f"(full log with traceback: {_current_log()})", file=sys.stderr)
        return EXIT_INTERNAL


# ---------------------------------------------------------------- logging

_LOG_STATE: dict[str, Path] = {}


def _start_log(run_dir: Path | None) -> Path:
    """Log to <run>/logs/pipeline.log once the run folder exists; before that, to a temp file."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if run_dir is None:
        path = Path(tempfile.gettempdir()) / f"sam3d-gs-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.log"
    else:
        path = RunPaths(run_dir).logs_dir / "pipeline.log"
        path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    _LOG_STATE["path"] = path
    return path


def _current_log() -> Path:
    return _LOG_STATE["path"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    logging.getLogger("pipeline").info(msg)


# ---------------------------------------------------------------- commands


def _configs(args: argparse.Namespace):
    from pipeline.stages import Configs

    return Configs(*(config_from_args(cls, args) for cls in C.STAGE_CONFIGS))


def _resolve_run_dir(cfgs, command: str, *, allow: frozenset[str] = frozenset()) -> Path:
    """The run folder, checked before anything is written: not a file, creatable, and either new,
    empty, or a run folder of ours (run.json). `allow` names entries a caller put there itself."""
    import os

    from pipeline.core.errors import InputError
    from pipeline.core.runfolder import foreign_entries

    if cfgs.run.out is not None:
        run_dir = Path(cfgs.run.out)
    elif command == "stage2":
        raise InputError("stage 2 needs the run folder.", "pass --out RUN_DIR (a stage 1 run, or a new folder with --image and --masks).")
    elif cfgs.run.image is None:
        raise InputError("no --image given.", "pass --image PHOTO (and optionally --out RUN_DIR).")
    else:
        run_dir = default_run_dir(Path(cfgs.run.image))
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file, not a folder.", "pass a new folder or an existing run folder.")
    if foreign_entries(run_dir, allow):
        raise InputError(
            f"--out {run_dir} is a folder with other files in it and no run.json.",
            "pass a new folder (it is created) or a run folder made by this pipeline; nothing was written.",
        )
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot create --out {run_dir}: {existing} is not a writable folder.", "pass --out somewhere you can write.")
    return run_dir


def _pin_gpu(device: str) -> None:
    """Stage 2 runs in its own process: `--device cuda:N` becomes that process's only GPU, because
    upstream SAM 3D Objects assumes GPU 0 in places (pipeline.core.device.pin_cuda_device)."""
    import os

    from pipeline.core.device import PINNED_DEVICE_ENV, pin_cuda_device

    if pin_cuda_device(device) == "cuda:0" and os.environ.get(PINNED_DEVICE_ENV):
        say(f"device: {os.environ[PINNED_DEVICE_ENV]} is CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} in this process (torch: cuda:0)")


def _announce(choice, command: str) -> None:
    stages = ("lifter",) if command == "stage2" else ("planner", "segmenter") if command == "stage1" else ("planner", "segmenter", "lifter")
    for stage in stages:
        say(f"{stage:9s}: {getattr(choice, stage):9s} ({choice.reasons.get(stage, '')})")


def _validate_inputs(cfgs, command: str, run_dir: Path):
    """Everything that can be checked before the run folder exists, so bad input leaves nothing
    behind: the photo, --box prompts, --masks. Returns the MaskSet found for --masks (or None)."""
    from pipeline.core.errors import InputError
    from pipeline.stages import load_input_photo, parse_box_flags

    if command != "stage2" and cfgs.run.image is None:
        raise InputError("no --image given.", "pass --image PHOTO.")
    if command == "stage2" and cfgs.run.image is None and not RunPaths(run_dir).input_image.exists():
        raise InputError("stage 2 needs the photo.", "pass --image PHOTO, or --out a run folder that has input/image.png.")
    image_path = Path(cfgs.run.image) if cfgs.run.image is not None else RunPaths(run_dir).input_image
    rgb, _ = load_input_photo(image_path)  # decoded once: the stages reuse it
    h, w = rgb.shape[:2]
    parse_box_flags(cfgs.segmenter.box, w, h)
    if command == "stage2" and cfgs.lifter.masks is not None:
        if not Path(cfgs.lifter.masks).exists():
            raise InputError(f"--masks {cfgs.lifter.masks} does not exist.", "pass a run folder, a masks/ folder or a folder of mask PNGs.")
        from pipeline.masks.layouts import find_masks

        return find_masks(Path(cfgs.lifter.masks), (w, h), exclude=[image_path])
    return None


def cmd_stage(args: argparse.Namespace, log_path: Path, *, allow: frozenset[str] = frozenset()) -> int:
    from pipeline.selection import choose_backends
    from pipeline.stages import Stage1, Stage2

    cfgs = _configs(args)
    command = args.command
    if command == "stage2":
        _pin_gpu(cfgs.run.device)  # before anything in this process starts CUDA
    run_dir = _resolve_run_dir(cfgs, command, allow=allow)
    mask_set = _validate_inputs(cfgs, command, run_dir)
    choice = choose_backends(cfgs.run, cfgs.planner, cfgs.server, cfgs.segmenter, cfgs.lifter)
    _start_log(run_dir)
    _announce(choice, command)
    say(f"run folder: {run_dir}")
    t0 = time.perf_counter()
    if command in ("run", "stage1"):
        Stage1(cfgs, choice, log=say).process(Path(cfgs.run.image), run_dir)
    if command in ("run", "stage2"):
        image = Path(cfgs.run.image) if cfgs.run.image else None
        Stage2(cfgs, choice, log=say).process(run_dir, image, cfgs.lifter.masks, mask_set=mask_set)
    return _summary(run_dir, time.perf_counter() - t0, stage1_only=command == "stage1")


def cmd_demo(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.core.errors import InputError
    from pipeline.demo.scene import make_demo_scene

    if getattr(args, "image", None) is not None or getattr(args, "masks", None) is not None:
        raise InputError("demo makes its own photo and masks.", "drop --image/--masks, or use `run` / `stage2` for your own photo.")
    out = Path(getattr(args, "out", None) or default_run_dir(Path("demo")))
    args.out = out
    args.image = out / "demo_scene" / "image.png"
    if not hasattr(args, "profile"):
        args.profile = "lite"
    args.command = "run"
    cfgs = _configs(args)
    _resolve_run_dir(cfgs, "run", allow=frozenset({"demo_scene"}))  # before writing the scene
    say(f"demo: generating the demo scene in {out / 'demo_scene'}")
    scene = make_demo_scene(out / "demo_scene")
    code = cmd_stage(args, log_path, allow=frozenset({"demo_scene"}))
    _demo_accuracy(out, scene)
    return code


def _demo_accuracy(run_dir: Path, scene) -> None:
    """Compare the demo's masks with its ground truth, so a newcomer sees the pipeline is right."""
    import numpy as np
    from PIL import Image

    from pipeline.masks.store import read_masks

    try:
        masks = read_masks(RunPaths(run_dir).masks_dir)
    except PipelineError:
        return
    gt_dir = run_dir / "demo_scene" / "gt"
    lines = []
    for gt_path in sorted(gt_dir.glob("*.png")):
        gt = np.asarray(Image.open(gt_path)) > 127
        best = max((float((m.mask & gt).sum()) / max(1.0, float((m.mask | gt).sum())) for m in masks), default=0.0)
        lines.append(f"{gt_path.stem}: IoU {best:.3f}")
    if lines:
        say("demo ground truth, best mask IoU per object: " + ", ".join(lines))


def _summary(run_dir: Path, seconds: float, *, stage1_only: bool = False) -> int:
    import json

    paths = RunPaths(run_dir)
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.exists() else {}
    objects = manifest.get("objects", {})
    rows = [("id", "label", "status", "gaussians", "seconds", "error")]
    for oid, o in sorted(objects.items()):
        rows.append((oid, str(o.get("label", ""))[:28], str(o.get("status", "")), str(o.get("n_gaussians") or ""), f"{o['seconds']:.2f}" if o.get("seconds") is not None else "", (o.get("error") or "")[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
    failed = [oid for oid, o in objects.items() if o.get("status") == "failed"]
    print(f"\nrun folder: {paths.root}  ({seconds:.1f} s)")
    if stage1_only:
        print(f"  masks:   {paths.masks_dir} (masks.json, <id>.png, overlay.png)")
        print(f"  next:    ./run_sam3d_from_masks.sh --out {paths.root}")
    else:
        for label, p in (("scene", paths.scene_dir / "scene.ply"), ("scene gif", paths.scene_dir / "scene.gif"), ("report", paths.report)):
            if p.exists():
                print(f"  {label + ':':10s} {p}")
        print(f"  objects:  {paths.objects_dir}/<id>/ (gaussians.pt, object.ply, object.splat, turntable.gif)")
        print(f"  view:     python -m pipeline view {paths.root}")
    if failed:
        print(f"{len(failed)} of {len(objects)} objects failed: {', '.join(sorted(failed))} (errors in {paths.manifest})", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_export(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.core.errors import InputError
    from pipeline.core.runfolder import Manifest
    from pipeline.stages import Configs, Stage2

    paths = RunPaths(args.run_dir)
    if not paths.objects_dir.is_dir():
        raise InputError(f"{args.run_dir} has no objects/ folder.", "run stage 2 first, or pass a run folder made by it.")
    _start_log(args.run_dir)
    cfgs = Configs(export=config_from_args(C.ExportConfig, args))
    t0 = time.perf_counter()
    Stage2(cfgs, choice=_no_choice(), log=say).export(paths, Manifest(paths))
    return _summary(paths.root, time.perf_counter() - t0)


def _no_choice():
    from pipeline.selection import BackendChoice

    return BackendChoice("none", "none", "none")


def cmd_report(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.core.errors import InputError

    if not Path(args.run_dir).is_dir():
        raise InputError(f"{args.run_dir} is not a folder.", "pass a run folder (or a folder of runs with --index).")
    if args.index:
        from pipeline.report.html import write_index

        print(write_index(Path(args.run_dir)))
    else:
        if not (Path(args.run_dir) / "run.json").is_file():
            raise InputError(f"{args.run_dir} is not a run folder (no run.json).", "pass a run folder, or a folder of runs with --index.")
        from pipeline.report.html import write_report

        print(write_report(Path(args.run_dir)))
    return EXIT_OK


def cmd_view(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.report.viewer import view_run

    view_run(Path(args.run_dir), host=args.host, port=args.port)
    return EXIT_OK


def cmd_serve_vlm(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.plan.server import serve_vlm_main

    planner = config_from_args(C.PlannerConfig, args)
    return serve_vlm_main(
        config_from_args(C.VLMServerConfig, args), args.log_dir, served_model_name=planner.vlm_model, max_image_side=planner.vlm_max_image_side
    )


def cmd_doctor(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.doctor import run_doctor

    return run_doctor(
        config_from_args(C.SegmenterConfig, args), config_from_args(C.LifterConfig, args), config_from_args(C.VLMServerConfig, args)
    )


def cmd_batch(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.batch.driver import run_batch

    # The driver's log goes to ROOT/logs/pipeline.log once ROOT is known good.
    return run_batch(config_from_args(C.BatchConfig, args), _configs(args), log=say, on_root=_start_log)


def cmd_worker(args: argparse.Namespace, log_path: Path) -> int:
    from pipeline.batch.worker import worker_main

    return worker_main(args.stage, args.concurrency, _configs(args))


COMMAND_FUNCS = {
    "run": cmd_stage,
    "stage1": cmd_stage,
    "stage2": cmd_stage,
    "demo": cmd_demo,
    "export": cmd_export,
    "report": cmd_report,
    "view": cmd_view,
    "serve-vlm": cmd_serve_vlm,
    "doctor": cmd_doctor,
    "batch": cmd_batch,
    "worker": cmd_worker,
}
