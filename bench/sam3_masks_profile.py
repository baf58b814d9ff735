"""Where the time of one SAM3 call goes, masks kept or not, and an A/B against an earlier sam3.py.

In one process on one GPU, with one random-weight model (speed does not depend on the weights):
- interleaved runs: for each repetition, each variant (this checkout's `Sam3Segmenter`, and with
  --old FILE the class of an earlier pipeline/masks/sam3.py sharing the same model) once without
  masks (confidence 0.5: random weights keep none) and once with masks kept (confidence 0, one
  mask per phrase, duplicate removal off), so a drifting machine moves all columns alike;
- a serialised breakdown of this checkout's steps, `torch.cuda.synchronize()` after each: text
  encoder, photo upload + backbone, grounding, dedup, upsample/pack/copy/unpack;
- the torch profiler over one masks-kept call of each variant: the ops that take the most host
  time, the kernels that take the most GPU time, the GPU's busy share of the call, and a chrome
  trace (gzipped).

Run (sam3 env, CUDA GPU): python bench/sam3_masks_profile.py --old OLD_SAM3_PY --out DIR
Writes DIR/ab.json, DIR/profile_<variant>.txt and DIR/trace_<variant>.json.gz.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stage1_sam3 import KEPT, PHRASES, photo  # noqa: E402
from pipeline.core.config import SegmenterConfig  # noqa: E402
from pipeline.core.types import Plan, PlanItem  # noqa: E402
from pipeline.masks.sam3 import Sam3Segmenter  # noqa: E402


def set_mode(cfg: SegmenterConfig, kept: bool, saved: dict) -> None:
    for k, v in (KEPT if kept else saved).items():
        setattr(cfg, k, v)


def load_old_class(path: Path):
    spec = importlib.util.spec_from_file_location("sam3_old_variant", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.Sam3Segmenter


def gpu_busy_share(trace: dict) -> dict:
    """From a chrome trace: wall span of the profiled call and the union of GPU kernel/memcpy time."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    if not gpu or not cpu:
        return {}
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(gpu):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    start = min(s for s, _ in cpu)
    end = max(max(e for _, e in cpu), max(e for _, e in gpu))
    return {"span_ms": round((end - start) / 1000, 2), "gpu_busy_ms": round(busy / 1000, 2), "kernels": len(gpu)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--phrases", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--old", type=Path, default=None, help="an earlier pipeline/masks/sam3.py to compare against")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--graph-backbone", action="store_true", help="also try the backbone as a CUDA graph (an experiment, run last)")
    args = ap.parse_args(argv)

    import torch

    w, h = (int(v) for v in args.size.split("x"))
    img = photo(h, w)
    plan = Plan(items=[PlanItem(p) for p in PHRASES[: args.phrases]])
    torch.manual_seed(0)
    cfg = SegmenterConfig(confidence=0.5, dtype=args.dtype)
    saved = {k: getattr(cfg, k) for k in KEPT}
    seg = Sam3Segmenter(cfg, device="cuda", load_from_hf=False)
    seg.load()
    variants = {"new": seg}
    if args.old:
        old = load_old_class(args.old)(cfg, device="cuda", load_from_hf=False)
        old.model, old.processor, old.device, old.weights = seg.model, seg.processor, seg.device, seg.weights
        variants = {"old": old, "new": seg}
    out: dict = {
        "size": args.size,
        "phrases": args.phrases,
        "dtype": args.dtype,
        "machine": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }

    def one(s, kept: bool) -> tuple[float, int, dict]:
        set_mode(cfg, kept, saved)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        masks = s.segment(img, plan)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000
        n = len(masks)
        del masks  # freed outside the next timed window
        return ms, n, dict(s.last_report["timings_s"])

    for _ in range(3):  # warm-up (cuDNN autotuning, allocator, pinned-memory cache)
        for s in variants.values():
            one(s, False), one(s, True)
    # Both variants give the same masks.
    if len(variants) == 2:
        set_mode(cfg, True, saved)
        a, b = variants["old"].segment(img, plan), variants["new"].segment(img, plan)
        out["same_masks"] = len(a) == len(b) and all(np.array_equal(x.mask, y.mask) and x.box_xyxy == y.box_xyxy for x, y in zip(a, b))
        del a, b
    runs: dict = {f"{v}_{m}": [] for v in variants for m in ("nomask", "kept")}
    steps: dict = {f"{v}_{m}": [] for v in variants for m in ("nomask", "kept")}
    counts: dict = {}
    for _ in range(args.reps):
        for v, s in variants.items():
            for m in ("nomask", "kept"):
                ms, n, t = one(s, m == "kept")
                runs[f"{v}_{m}"].append(round(ms, 1))
                steps[f"{v}_{m}"].append(t)
                counts[f"{v}_{m}"] = n
    out["runs_ms"] = runs
    out["median_ms"] = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    out["masks"] = counts
    out["median_steps_ms"] = {
        k: {name: round(1000 * statistics.median(t.get(name, 0.0) for t in v), 1) for name in v[-1]} for k, v in steps.items()
    }
    print(json.dumps({k: out[k] for k in ("median_ms", "masks", "median_steps_ms", "same_masks") if k in out}, indent=1), flush=True)

    # Serialised breakdown of this checkout's steps (a sync after each: GPU time included, no overlap).
    set_mode(cfg, True, saved)
    phrases = PHRASES[: args.phrases]
    boxes = [None] * len(phrases)
    ser: dict = {k: [] for k in ("text", "upload_backbone", "ground", "upsample_pack_copy_unpack", "unpack_only")}
    for _ in range(max(5, args.reps // 2)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        text = seg.encode_text(phrases, boxes)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        state = seg.encode_image(img)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        g = seg.ground_phrases(state, phrases, boxes, lambda i, sc, bx: [int(np.argmax(sc))], text=text)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        with torch.inference_mode():
            logits = torch.stack([r["mask_logits"][0] for r in g])
            torch.cuda.synchronize()
            t4 = time.perf_counter()
            full, _ = seg.upsample_masks_and_boxes(logits, h, w)
            t5 = time.perf_counter()
        packed = [np.packbits(m) for m in full]
        del full, state, text, g
        t6 = time.perf_counter()
        unpacked = [np.unpackbits(p, count=h * w).view(bool) for p in packed]  # one thread, fresh memory
        t7 = time.perf_counter()
        del unpacked
        for k, v in zip(ser, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t7 - t6)):
            ser[k].append(v * 1000)
    out["serialised_ms"] = {k: round(statistics.median(v), 1) for k, v in ser.items()}
    print("serialised:", json.dumps(out["serialised_ms"]), flush=True)

    # One profiled masks-kept call per variant.
    from torch.profiler import ProfilerActivity, profile

    out["profile"] = {}
    for v, s in variants.items():
        set_mode(cfg, True, saved)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            masks = s.segment(img, plan)
            torch.cuda.synchronize()
        del masks
        ka = prof.key_averages()
        parts = [f"variant {v}, masks kept, {args.size} {args.dtype} {args.phrases} phrases; timings_s {s.last_report['timings_s']}"]
        for key in ("self_cpu_time_total", "cpu_time_total", "self_cuda_time_total", "self_device_time_total"):
            try:
                parts.append(f"\n=== sorted by {key} ===\n" + ka.table(sort_by=key, row_limit=35, max_name_column_width=70))
            except Exception as exc:  # noqa: BLE001 - column names differ between torch versions
                parts.append(f"\n=== {key}: {exc}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"profile_{v}.txt").write_text("\n".join(parts))
            tmp = args.out / f"trace_{v}.json"
            prof.export_chrome_trace(str(tmp))
            trace = json.loads(tmp.read_text())
            out["profile"][v] = gpu_busy_share(trace)
            with gzip.open(args.out / f"trace_{v}.json.gz", "wt") as fh:
                json.dump(trace, fh)
            tmp.unlink()
        print(v, "profiled:", out["profile"].get(v), flush=True)
    if args.out:
        (args.out / "ab.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("median_ms", "serialised_ms", "profile") if k in out}, indent=1), flush=True)
    if args.graph_backbone:  # last: a failed capture may leave the CUDA context unusable
        try:
            out["graph_backbone"] = try_graph_backbone(seg, cfg, saved, img, plan, one, args.reps)
        except Exception as exc:  # noqa: BLE001 - an experiment; record why it failed
            out["graph_backbone"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print("graph_backbone:", json.dumps(out["graph_backbone"]), flush=True)
        if args.out:
            (args.out / "ab.json").write_text(json.dumps(out, indent=1))
    return 0


def _clone_tree(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tree(v) for v in x)
    return x


def try_graph_backbone(seg, cfg, saved, img, plan, one, reps: int) -> dict:
    """Experiment (nothing in the pipeline does this yet): the image backbone's input is always
    (1, 3, 1008, 1008), so it can be captured once as a CUDA graph and replayed per photo, which
    takes its kernel launches off the host. Times masks-kept calls eager vs graphed, interleaved,
    and checks the masks are the same."""
    import torch

    bb = seg.model.backbone
    eager = bb.forward_image
    set_mode(cfg, True, saved)
    ref = seg.segment(img, plan)
    static_in = torch.zeros(1, 3, 1008, 1008, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    lowp = (
        torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        if cfg.dtype == "bfloat16"
        else torch.autocast("cuda", enabled=False)
    )
    t0 = time.perf_counter()
    with torch.inference_mode(), lowp:
        with torch.cuda.stream(side):
            for _ in range(3):
                eager(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = eager(static_in)
    capture_s = time.perf_counter() - t0

    def graphed(x):
        static_in.copy_(x)
        graph.replay()
        return _clone_tree(static_out)

    res: dict = {"capture_s": round(capture_s, 2)}
    try:
        bb.forward_image = graphed
        got = seg.segment(img, plan)
        res["same_masks"] = len(got) == len(ref) and all(np.array_equal(a.mask, b.mask) for a, b in zip(got, ref))
        del got
        eager_ms, graph_ms = [], []
        for _ in range(reps):
            bb.forward_image = eager
            eager_ms.append(round(one(seg, True)[0], 1))
            bb.forward_image = graphed
            graph_ms.append(round(one(seg, True)[0], 1))
        bb.forward_image = graphed
        nomask_graph = [round(one(seg, False)[0], 1) for _ in range(reps)]
    finally:
        bb.forward_image = eager
    res.update(
        kept_eager_ms=statistics.median(eager_ms), kept_graph_ms=statistics.median(graph_ms),
        nomask_graph_ms=statistics.median(nomask_graph), kept_eager_runs=eager_ms, kept_graph_runs=graph_ms,
    )  # fmt: skip
    return res


if __name__ == "__main__":
    sys.exit(main())
