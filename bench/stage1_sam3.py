"""Stage 1 speed: SAM3 the reference system's way against ours, in one run on one GPU.

- reference: for every phrase `Sam3Processor.set_image(photo)` + `set_text_prompt(phrase)` (the
  image is preprocessed and encoded again per phrase), masks copied to the CPU as it does;
- image once: `set_image` once, then `set_text_prompt` per phrase (the processor's own reuse);
- ours: `Sam3Segmenter.segment` (image once, all phrases through the text encoder in one call,
  batched grounding, selection, IoU dedup, masks upsampled to the photo and on the CPU);
- ours, masks kept: the same with every query passing (confidence 0, one mask per phrase, duplicate
  removal off), so each phrase keeps a full-size mask: random weights keep none at the real 0.5
  threshold, and this is the path that upsamples, packs and copies masks (`--no-forced` skips it).

For 1, 4, 12 and 32 phrases, fp32 and bf16 autocast, on 1024x768 and 4000x3000 photos. Each
number is the median of several timed runs after a warm-up, with torch.cuda.synchronize around
each; peak GPU memory is max_memory_allocated over the timed runs. Random weights unless
--checkpoint is given (speed does not depend on the weights, mask counts do).

Run (sam3 env, CUDA GPU): python bench/stage1_sam3.py [--out DIR]
Prints a markdown table for docs/PERFORMANCE.md and writes DIR/stage1_sam3.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import SegmenterConfig  # noqa: E402
from pipeline.core.device import autocast_context  # noqa: E402
from pipeline.core.types import Plan, PlanItem  # noqa: E402
from pipeline.masks.sam3 import Sam3Segmenter  # noqa: E402

PHRASES = [
    "red mug", "wooden table", "laptop", "potted plant", "blue book", "glass bottle", "desk lamp", "office chair",
    "computer mouse", "keyboard", "coffee cup", "smartphone", "pair of glasses", "notebook", "pen", "headphones",
    "water bottle", "picture frame", "vase of flowers", "cushion", "backpack", "wall clock", "tennis ball", "banana",
    "apple", "ceramic bowl", "teapot", "remote control", "candle", "sneaker", "toy car", "stack of papers",
]  # fmt: skip


# 'Masks kept': every query passes, one mask per phrase, duplicate removal off, so each phrase keeps a
# full-size mask (random weights keep none at the real threshold). Also bench/sam3_masks_profile.py.
KEPT = {"confidence": 0.0, "max_masks_per_phrase": 1, "dedup_iou": 1.01, "dedup_iom": 1.01}


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Deterministic photo-like RGB image: smooth background, a few filled discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([120 + 60 * xx / w, 110 + 50 * yy / h, 140 - 40 * xx / w], -1)
    for _ in range(8):
        cx, cy, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, rng.uniform(0.04, 0.14) * min(h, w)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def timed(fn, reps: int, warmup: int = 2) -> tuple[float, float, object]:
    """(median ms, peak GiB above the start, last result) of fn() on the GPU."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times, result = [], None
    for _ in range(reps):
        result = None  # the previous run's masks are freed outside the timed window (the caller's cost)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    timed.last = [round(t, 1) for t in times]  # every run, for the spread
    return statistics.median(times), peak, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phrases", default="1,4,12,32", help="phrase counts, comma-separated")
    ap.add_argument("--sizes", default="1024x768,4000x3000", help="photo sizes WxH, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of ours per cell")
    ap.add_argument("--ref-reps", type=int, default=3, help="timed runs of the reference ways per cell")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the slow reference ways once this much time has passed")
    ap.add_argument("--checkpoint", type=Path, default=None, help="real SAM3 weights (default: random weights)")
    ap.add_argument("--out", type=Path, default=None, help="folder for stage1_sam3.md and .json")
    ap.add_argument("--no-forced", action="store_true", help="skip the forced 'masks kept' timing")
    args = ap.parse_args(argv)

    import torch
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    counts = [int(c) for c in args.phrases.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    t_start = time.perf_counter()

    torch.manual_seed(0)
    cfg = SegmenterConfig(confidence=0.5, sam3_checkpoint=args.checkpoint)
    seg = Sam3Segmenter(cfg, device="cuda", load_from_hf=False)
    t0 = time.perf_counter()
    seg.load()
    build_s = time.perf_counter() - t0
    proc = Sam3Processor(seg.model, device=seg.device, confidence_threshold=cfg.confidence)

    def reference(pil, phrases, dtype):
        kept = 0
        with autocast_context(seg.device, dtype):
            for p in phrases:
                st = proc.set_image(pil)
                st = proc.set_text_prompt(p, st)
                masks = st["masks"].cpu().numpy()
                kept += len(masks)
        return kept

    def image_once(pil, phrases, dtype):
        kept = 0
        with autocast_context(seg.device, dtype):
            st = proc.set_image(pil)
            for p in phrases:
                st = proc.set_text_prompt(p, st)
                kept += len(st["masks"].cpu().numpy())
        return kept

    rows = []
    for w, h in sizes:
        img = photo(h, w)
        pil = Image.fromarray(img)
        for dtype in dtypes:
            seg.cfg.dtype = dtype
            # Backbone alone (preprocessing + image encoder), for the breakdown.
            enc_ms, _, _ = timed(lambda img=img: seg.encode_image(img), args.reps)
            for n in counts:
                phrases = PHRASES[:n]
                plan = Plan(items=[PlanItem(p) for p in phrases])
                ours_ms, ours_gib, masks = timed(lambda img=img, plan=plan: seg.segment(img, plan), args.reps)
                report = seg.last_report
                row = {
                    "size": f"{w}x{h}", "dtype": dtype, "phrases": n, "ours_ms": ours_ms, "ours_peak_gib": ours_gib,
                    "ours_masks": len(masks), "encode_ms": enc_ms, "ours_breakdown_s": report["timings_s"], "ours_runs_ms": timed.last,
                }  # fmt: skip
                row.update(kept_ms=None, kept_masks=None, kept_peak_gib=None, kept_breakdown_s=None)
                if not args.no_forced:
                    saved = {k: getattr(cfg, k) for k in KEPT}
                    for k, v in KEPT.items():
                        setattr(cfg, k, v)
                    try:
                        kept_ms, kept_gib, kept = timed(lambda img=img, plan=plan: seg.segment(img, plan), args.reps)
                    finally:
                        for k, v in saved.items():
                            setattr(cfg, k, v)
                    row.update(kept_ms=kept_ms, kept_masks=len(kept), kept_peak_gib=kept_gib, kept_breakdown_s=seg.last_report["timings_s"], kept_runs_ms=timed.last)
                    del kept
                row.update(ref_ms=None, ref_peak_gib=None, ref_masks=None, once_ms=None, speedup=None)
                if time.perf_counter() - t_start < args.budget_s:
                    try:
                        ref_ms, ref_gib, ref_kept = timed(lambda a=(pil, phrases, dtype): reference(*a), args.ref_reps)
                        row.update(ref_ms=ref_ms, ref_peak_gib=ref_gib, ref_masks=ref_kept, speedup=ref_ms / ours_ms)
                        once_ms, _, _ = timed(lambda a=(pil, phrases, dtype): image_once(*a), args.ref_reps)
                        row.update(once_ms=once_ms)
                    except RuntimeError as exc:  # e.g. out of memory: record it, keep the other cells
                        row["ref_error"] = str(exc).splitlines()[0][:200]
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name(0)
    import importlib.metadata as md

    try:
        sam3_version = md.version("sam3")
    except md.PackageNotFoundError:
        sam3_version = "?"
    head = (
        f"Machine: {gpu}, torch {torch.__version__}, sam3 {sam3_version}, {dt.date.today().isoformat()}; "
        f"weights: {seg.weights}; model build {build_s:.1f} s; confidence {cfg.confidence}; "
        f"ours keeps every passing query per phrase (max_masks_per_phrase {cfg.max_masks_per_phrase}), phrase batch {cfg.sam3_phrase_batch}; "
        "'masks kept': confidence 0, one mask per phrase, dedup off. "
        f"Median of {args.reps} (ours) / {args.ref_reps} (reference) runs after two warm-ups. "
        "fp32 means upstream's default (sam3 turns TF32 matmuls on); bf16 is torch.autocast."
    )

    def f(v, fmt="{:.0f}"):
        return "skipped" if v is None else fmt.format(v)

    def kept_cell(r):
        if r["kept_ms"] is None:
            return "skipped"
        up = (r["kept_breakdown_s"] or {}).get("upsample_copy")
        return f"{r['kept_ms']:.0f} ({r['kept_masks']}; {'-' if up is None else f'{up * 1000:.0f}'})"

    lines = [
        head,
        "",
        "| photo | dtype | phrases | reference (image per phrase) ms | image once + per-phrase prompts ms | ours ms | speed-up vs reference | backbone alone ms | peak GiB ref / ours | masks ref / ours | ours, masks kept ms (masks; upsample+copy ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['phrases']} | {f(r['ref_ms'])} | {f(r['once_ms'])} | {r['ours_ms']:.0f} | "
            f"{f(r['speedup'], '{:.1f}x')} | {r['encode_ms']:.0f} | {f(r['ref_peak_gib'], '{:.1f}')} / {r['ours_peak_gib']:.1f} | "
            f"{f(r['ref_masks'])} / {r['ours_masks']} | {kept_cell(r)} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stage1_sam3.md").write_text(table + "\n")
        (args.out / "stage1_sam3.json").write_text(
            json.dumps({"machine": gpu, "torch": torch.__version__, "sam3": sam3_version, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
