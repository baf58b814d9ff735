"""Segmenter `sam3`: SAM3 (facebookresearch/sam3 at the pinned commit, or PyPI `sam3==0.1.4`, which
has the same model code) in the `sam3` env, on a CUDA GPU or (slowly) on the CPU.

How it differs from the reference system, which calls `set_image` + `set_text_prompt` per phrase:
- The model is built once per process (`load()`, or lazily on the first `segment`).
- Each photo is preprocessed (resize to 1008, normalize) and run through the image backbone ONCE.
- All phrases go through the text encoder in one call, then through `forward_grounding` in
  batches: phrase i is grounding query i with `img_ids=0` and `text_ids=i` (`FindStage`), so the
  one encoded image serves every phrase. Batches hold at most `sam3_phrase_batch` phrases, which
  bounds GPU memory; a batch that runs out of memory is split in two and retried.
- Order, because grounding is CPU-launch-bound (about 60 ms fixed per batch on an H100): text
  first, then the backbone is queued and the grounding kernels are queued while the GPU still
  runs it; nothing waits for the GPU until the scores are read (docs/PERFORMANCE.md).
- A plan item's box becomes a positive box prompt for its phrase (the geometric prompt that
  `Sam3Processor.add_geometric_prompt` builds). SAM3 reads a box as an EXEMPLAR of the concept and
  returns every instance (up: sam3/model/sam3_image_processor.py:128-152, 183-222), so the object
  kept for a boxed phrase is the passing query whose predicted box overlaps the prompt box most
  (ties by score); below `box_min_iou` the phrase is a miss (`last_report['box_misses']`).
  A box without a phrase is sent with upstream's box-only text "visual" (:137-142).
- Scores as in `Sam3Processor._forward_grounding`: sigmoid(logit) x sigmoid(presence logit), and a
  query passes when its score is > `confidence` (up: sam3_image_processor.py:194-198). NaN or
  infinite scores never pass (they are counted in `last_report`).
- One object = one mask: per text-only phrase every passing query (at most
  `max_masks_per_phrase` when that is > 0), one per boxed phrase; then, best score first, a mask
  is dropped when it overlaps a kept one by mask IoU >= `dedup_iou` (any phrase), or, within one
  phrase, by intersection over the smaller mask > `dedup_iom` (upstream's agent rule,
  sam3/agent/helpers/mask_overlap_removal.py:71-116, applied per phrase in agent/client_sam3.py:85).
- The photo goes to the GPU through pinned memory without blocking (a 12 MP pageable copy blocked
  the host and drained the GPU's queue).
- Masks are upsampled from the model's 288x288 logits to the photo's size only for the objects
  that are kept, thresholded and packed to bits on the GPU, and only the bits are copied to the
  host (a 4000x3000 mask is 1.5 MB of bits instead of 12 MB of bools).
- On the CPU (`--device cpu`), upstream's three hard-coded CUDA spots are mapped to the CPU while
  it runs, without touching its files: see `upstream_on_cpu`.

The selection and duplicate-removal rules are pure numpy functions (`select_queries`,
`select_box_query`, `dedup_masks`, ...) so they are tested without a model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import SegmenterConfig
from pipeline.core.device import autocast_context, pick_device
from pipeline.core.errors import BackendError, InputError, MissingDependencyError, missing_dependency
from pipeline.core.hub import hf_token, hub_error
from pipeline.core.types import ObjectMask, Plan, PlanItem, mask_box_xyxy, require_rgb_image

log = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SAM3_HF_REPO = "facebook/sam3"
SAM3_HF_CHECKPOINT = "sam3.pt"
SAM3_HF_CONFIG = "config.json"
SAM3_RESOLUTION = 1008  # the image side the model was trained at (Sam3Processor's default)
SAM3_INSTALL = "bash envs/setup.sh sam3   (or, inside that env: pip install sam3==0.1.4 einops psutil pycocotools open_clip_torch)"
# What to pip install for a module the sam3 env needs, where that is not the module's own name or
# needs a pin (decord: x86-64 wheels only). One table for this backend's missing-import message and
# the doctor's sam3 env check (pipeline/doctor.py).
SAM3_PIP_NAMES = {
    "torch": "torch==2.7.1",
    "numpy": "numpy==1.26.0",
    "cv2": "opencv-python-headless",
    "decord": "decord==0.6.0",
    "open_clip": "open_clip_torch",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
}
BOX_ONLY_TEXT = "visual"  # the text Sam3Processor uses when a prompt has a box and no phrase
IOU_MAX_SIDE = 1024  # masks are compared at most this large: enough for IoU, cheap on 12 MP photos
UPSAMPLE_BATCH = 8  # masks upsampled to the photo's size at once (8 x 4000x3000 fp32 = 384 MB)
UNPACK_THREADS = 16  # at most this many host threads unpack mask bits (never more than the cores)
_unpack_pool: ThreadPoolExecutor | None = None  # created on first use, kept for the process (idle threads cost nothing)


def _unpack_executor() -> ThreadPoolExecutor:
    """The process's mask-unpacking threads (starting 8-16 threads per photo cost about a millisecond)."""
    global _unpack_pool
    if _unpack_pool is None:
        _unpack_pool = ThreadPoolExecutor(max_workers=max(1, min(UNPACK_THREADS, os.cpu_count() or 1)), thread_name_prefix="sam3-unpack")
    return _unpack_pool


# --------------------------------------------------------------------------------------------
# Pure functions (numpy only): tested on CPU.
# --------------------------------------------------------------------------------------------


def select_queries(scores: np.ndarray, confidence: float, max_keep: int, min_keep: int = 0) -> tuple[list[int], int]:
    """Which of one text-only phrase's query slots to keep, best first.

    scores: (Q,) float, sigmoid(logit) x presence. A slot passes when its score is finite and
    > confidence (up: sam3/model/sam3_image_processor.py:198, `out_probs > threshold`); at most
    `max_keep` pass when max_keep > 0 (0: no cap). `min_keep` (a test knob for random weights)
    then tops up with the best finite scores below the threshold. Returns (indices, non-finite count).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = np.isfinite(scores)
    nonfinite = int((~finite).sum())
    ranked = np.where(finite, scores, -np.inf)
    order = [int(i) for i in np.argsort(-ranked, kind="stable") if finite[i]]
    passing = [i for i in order if scores[i] > confidence]
    if max_keep > 0:
        passing = passing[:max_keep]
    if len(passing) < min_keep:
        extra = [i for i in order if i not in set(passing)]
        passing += extra[: min_keep - len(passing)]
    return passing, nonfinite


def box_iou_cxcywh(boxes: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """(Q, 4) boxes and one box, all (cx, cy, w, h) in the same frame -> (Q,) IoU (0 for empty ones)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy, w, h = (float(v) for v in box)
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    bx0, by0 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
    bx1, by1 = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    iw = np.clip(np.minimum(bx1, x1) - np.maximum(bx0, x0), 0, None)
    ih = np.clip(np.minimum(by1, y1) - np.maximum(by0, y0), 0, None)
    inter = iw * ih
    union = np.clip(boxes[:, 2], 0, None) * np.clip(boxes[:, 3], 0, None) + max(w, 0.0) * max(h, 0.0) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return np.where(np.isfinite(iou), iou, 0.0)


def select_box_query(
    scores: np.ndarray, pred_boxes: np.ndarray, prompt_box: Sequence[float], confidence: float, min_iou: float, min_keep: int = 0
) -> tuple[int | None, float, int]:
    """The query that is "the object in this box" for a phrase prompted with a box.

    SAM3 treats the box as an exemplar and every instance of the concept scores alike (up:
    sam3/model/sam3_image_processor.py:128-152 returns all of them), so the best-scoring query is
    often another instance. Among queries whose score is finite and > confidence, take the one whose
    predicted box (pred_boxes (Q, 4), normalized cxcywh like `prompt_box`) overlaps the prompt box
    most, ties by score. `min_keep` > 0 (test knob) lets every finite query compete when none passes.
    Returns (query or None, its box IoU, non-finite count); None when nothing passes or the best IoU
    is below `min_iou` (a miss: the concept was found, but not in the box)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = np.isfinite(scores)
    nonfinite = int((~finite).sum())
    candidates = np.flatnonzero(finite & (scores > confidence))
    if candidates.size == 0 and min_keep > 0:
        candidates = np.flatnonzero(finite)
    if candidates.size == 0:
        return None, 0.0, nonfinite
    iou = box_iou_cxcywh(np.asarray(pred_boxes)[candidates], prompt_box)
    best = int(np.lexsort((-scores[candidates], -iou))[0])  # highest IoU, then highest score
    query, best_iou = int(candidates[best]), float(iou[best])
    return (query if best_iou >= min_iou else None), best_iou, nonfinite


def mask_iou_matrix(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool -> (K, K) float64 IoU; two empty masks have IoU 0 (never duplicates)."""
    masks = np.asarray(masks, dtype=bool)
    k = masks.shape[0]
    if k == 0:
        return np.zeros((0, 0), np.float64)
    flat = masks.reshape(k, -1).astype(np.float32)  # (K, P)
    return iou_from_intersections(flat @ flat.T)


def iou_from_intersections(inter: np.ndarray) -> np.ndarray:
    """(K, K) pixel counts |a & b| (the diagonal holds the areas) -> (K, K) IoU, 0 where both are empty."""
    inter = np.asarray(inter, dtype=np.float64)
    area = np.diag(inter).copy()
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def dedup_by_iou(iou: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy duplicate removal: visit masks by score (best first; non-finite scores last) and keep
    one unless it overlaps an already kept mask by IoU >= iou_threshold. Returns kept indices,
    ascending (so callers keep their own order)."""
    inter = np.asarray(iou, dtype=np.float64)
    return dedup_masks(inter, scores, np.zeros(len(inter), int), iou_threshold, np.inf, counts_are_iou=True)[0]


def dedup_masks(
    inter: np.ndarray,
    scores: np.ndarray,
    groups: Sequence[int],
    iou_threshold: float,
    iom_threshold: float,
    *,
    counts_are_iou: bool = False,
) -> tuple[list[int], dict[int, str]]:
    """Greedy duplicate removal over K masks, best score first (non-finite scores last).

    inter: (K, K) pixel counts |a & b| (diagonal = areas). A mask is dropped when it overlaps an
    already kept mask by IoU >= iou_threshold (any group), or one of its own group (phrase) by
    intersection over the smaller area > iom_threshold: upstream's agent rule against a part kept
    beside its whole (up: sam3/agent/helpers/mask_overlap_removal.py:30-37, 71-116, `iom > 0.3`).
    Returns (kept indices ascending, {dropped index: 'iou' or 'iom'})."""
    inter = np.asarray(inter, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = len(scores)
    if counts_are_iou:
        iou, iom = inter, np.zeros_like(inter)
    else:
        iou = iou_from_intersections(inter)
        area = np.diag(inter)
        smaller = np.minimum(area[:, None], area[None, :])
        iom = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    ranked = np.where(np.isfinite(scores), scores, -np.inf)
    kept: list[int] = []
    dropped: dict[int, str] = {}
    for i in (int(v) for v in np.argsort(-ranked, kind="stable")):
        if any(iou[i, j] >= iou_threshold for j in kept):
            dropped[i] = "iou"
        elif any(groups[i] == groups[j] and iom[i, j] > iom_threshold for j in kept):
            dropped[i] = "iom"
        else:
            kept.append(i)
    assert len(kept) + len(dropped) == k
    return sorted(kept), dropped


def box_xyxy_to_cxcywh_normalized(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """A pixel box -> SAM3's box prompt (cx, cy, w, h in [0, 1]); None when it is empty after clamping."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if not (x1 > x0 and y1 > y0):
        return None
    return ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)


def iou_size(height: int, width: int, max_side: int = IOU_MAX_SIDE) -> tuple[int, int]:
    """(h, w) at which masks are compared: the photo's aspect, longest side <= max_side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


# --------------------------------------------------------------------------------------------
# Locating the BPE vocab and the checkpoint.
# --------------------------------------------------------------------------------------------


def _package_dirs(name: str) -> list[Path]:
    """Folders of an installed top-level package, found WITHOUT importing it (open_clip and sam3
    import torch and more at import time). A namespace package (e.g. an empty submodule folder)
    yields its folders too."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])]


def bpe_candidates() -> list[Path]:
    """Where the CLIP BPE vocab may be, in order: the sam3 package's assets (a git checkout keeps
    them beside the package: <repo>/assets), then the open_clip_torch wheel's copy."""
    out: list[Path] = []
    for pkg in _package_dirs("sam3"):
        out += [pkg / "assets" / BPE_FILENAME, pkg.parent / "assets" / BPE_FILENAME]
    for pkg in _package_dirs("open_clip"):
        out.append(pkg / BPE_FILENAME)
    return out


def resolve_bpe_path(explicit: Path | str | None = None) -> Path:
    """The BPE vocab file SAM3's tokenizer needs: `explicit` (--sam3-bpe), else sam3's assets,
    else open_clip's copy; a clear error when none exists (the sam3 0.1.4 wheel lacks the file)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise InputError(
                f"--sam3-bpe {path} does not exist.",
                f"give the path of {BPE_FILENAME}, or leave --sam3-bpe out to find it in sam3 or open_clip.",
            )
        return path
    for path in bpe_candidates():
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"SAM3's text tokenizer needs {BPE_FILENAME}, which the sam3 0.1.4 wheel does not ship, and it was found neither in sam3's assets nor in open_clip.",
        f"in the 'sam3' env run `pip install open_clip_torch` (its wheel carries the same file), or pass --sam3-bpe /path/to/{BPE_FILENAME}.",
    )


def download_sam3_checkpoint(repo_id: str = SAM3_HF_REPO, *, cache_dir: Path | None = None, endpoint: str | None = None) -> Path:
    """facebook/sam3's sam3.pt through huggingface_hub, authorised by HF_TOKEN (never an interactive
    login); resumable (the hub's cache). A gated, refused or unreachable repo -> BackendError with the fix."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise missing_dependency("huggingface_hub", "sam3", "pip install huggingface_hub") from None
    token = hf_token()
    try:
        hf_hub_download(repo_id=repo_id, filename=SAM3_HF_CONFIG, token=token, cache_dir=cache_dir, endpoint=endpoint)
        return Path(hf_hub_download(repo_id=repo_id, filename=SAM3_HF_CHECKPOINT, token=token, cache_dir=cache_dir, endpoint=endpoint))
    except Exception as exc:  # mapped to one clear line; anything else is re-raised
        from huggingface_hub import errors as hf_errors

        if isinstance(exc, getattr(hf_errors, "EntryNotFoundError", ())) and not isinstance(
            exc, getattr(hf_errors, "LocalEntryNotFoundError", ())
        ):
            raise BackendError(
                f"{repo_id} has no {SAM3_HF_CHECKPOINT}.", "pass --sam3-checkpoint PATH to a SAM3 image checkpoint."
            ) from None
        mapped = hub_error(exc, repo_id, alternative="download sam3.pt yourself and pass --sam3-checkpoint PATH")
        if mapped is not None:
            raise mapped from None
        raise


def load_checkpoint_into(model: Any, path: Path, *, assign: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Load a SAM3 checkpoint (`torch.load(weights_only=True)`) into the image model, strictly.

    assign: the file's tensors become the model's weights (`load_state_dict(assign=True)`) instead
    of being copied into them, where every dtype matches (else they are copied): for a model just
    built for this file, whose own weights were never filled (`skip_random_fills`). They are then on
    the CPU, and the caller moves the model. mmap: map the file instead of reading it (a zip
    checkpoint; the legacy format is read), so a model moved to the GPU next reads each byte once.

    Layouts: upstream's sam3.pt (image-model keys under `detector.`, tracker keys under `tracker.`,
    up: sam3/model_builder.py:523-545), the same inside `{"model": ...}` (upstream's training
    checkpoints), with a leading `module.` (DDP), or image-model keys without any prefix (a file
    saved from the image model itself; upstream's own loader finds nothing in the last two,
    upstream issue #606). Every image-model key must be in the file with its shape (upstream loads
    with strict=False and only prints what is missing; the official sam3.pt holds every key, its
    video builder loads it with strict=True, model_builder.py:655, 778-780). Anything else is a
    one-line BackendError. Ignored: `tracker.*` (the image model has no tracker) and
    `sam2_convs.*` (the video detector's extra neck, model_builder.py:499-510); other unexpected
    keys are logged. Returns the load stats (they go into the segmenter's report)."""
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:
        raise BackendError(
            f"could not read the SAM3 checkpoint {path}: {exc}".splitlines()[0], "pass a valid sam3.pt with --sam3-checkpoint."
        ) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt):
        raise BackendError(f"{path} is not a state dict.", "pass facebook/sam3's sam3.pt with --sam3-checkpoint.")
    ckpt = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in ckpt.items()}
    if any(k.startswith("detector.") for k in ckpt):
        layout = "detector.*"
        state = {k[len("detector.") :]: v for k, v in ckpt.items() if k.startswith("detector.")}
        other = [k for k in ckpt if not k.startswith("detector.")]
    else:
        layout = "image-model keys"
        state, other = dict(ckpt), []
    tracker = [k for k in other if k.startswith("tracker.")]
    other = [k for k in other if not k.startswith("tracker.")]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise BackendError(
            f"{path} holds {len(expected) - len(missing)} of {len(expected)} SAM3 image-model weights (missing e.g. {', '.join(missing[:3])}).",
            "pass facebook/sam3's complete sam3.pt with --sam3-checkpoint (or leave it out to download it with HF_TOKEN).",
        )
    mismatched = [k for k, v in expected.items() if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape)]
    if mismatched:
        k = mismatched[0]
        got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        raise BackendError(
            f"{path} does not fit the SAM3 image model: {len(mismatched)} weights have another shape (e.g. {k}: {got} in the file, {tuple(expected[k].shape)} in the model).",
            "pass a checkpoint of this SAM3 architecture (facebook/sam3's sam3.pt) with --sam3-checkpoint.",
        )
    unexpected = [k for k in state if k not in expected]
    sam2_convs = [k for k in unexpected if ".sam2_convs." in f".{k}"]
    unexpected = [k for k in unexpected if k not in set(sam2_convs)] + other
    if unexpected:
        log.warning("SAM3 checkpoint %s: %d keys the image model does not use (e.g. %s)", path, len(unexpected), unexpected[:3])
    # Assigning a tensor of another dtype would change the model's dtype: copy then.
    assign = assign and all(state[k].dtype == v.dtype for k, v in expected.items())
    try:
        model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=assign)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise BackendError(
            f"could not load {path} into SAM3: {exc}".splitlines()[0], "pass facebook/sam3's sam3.pt with --sam3-checkpoint."
        ) from None
    return {
        "path": str(path),
        "layout": layout,
        "loaded": len(expected),
        "missing": 0,
        "ignored_tracker": len(tracker),
        "ignored_sam2_convs": len(sam2_convs),
        "unexpected": len(unexpected),
        "unexpected_examples": unexpected[:5],
        "assigned": assign,
    }


def make_random_weights_finite(model: Any) -> list[str]:
    """Random-weight builds (load_from_HF=False) leave a few parameters uninitialised
    (`torch.empty`, e.g. the text encoder's positional embedding and projection), which can hold
    NaN or huge values. Re-draw those from N(0, 0.02) so random-weight runs give finite numbers.
    Buffers (e.g. the causal attention mask's -inf) are left alone. Returns the re-drawn names."""
    import torch

    fixed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            if name.endswith(("positional_embedding", "text_projection")) or not torch.isfinite(param).all() or param.abs().max() > 1e3:
                param.normal_(0.0, 0.02)
                fixed.append(name)
    return fixed


def upstream_on_cpu(device: str = "cpu") -> Any:
    """A context in which upstream SAM3 builds and runs on a non-CUDA device, its files untouched.

    Upstream hard-codes CUDA in three places that a CPU run reaches:
    - sam3/model/position_encoding.py:47  `torch.zeros(..., device="cuda")` (built at construction),
    - sam3/model/decoder.py:281          `self._get_coords(..., device="cuda")` -> torch.arange
                                          (coordinate cache built at construction),
    - sam3/model/geometry_encoders.py:659 `scale.pin_memory()` (every box prompt; pinning needs CUDA).
    A torch function mode catches them where they happen: a factory call asking for a CUDA device
    gets `device` instead, and pin_memory returns the tensor itself. Only factory calls that name
    a CUDA device change, so nothing else in the model sees the mode."""
    import torch
    from torch.overrides import TorchFunctionMode

    target = torch.device(device)

    class _UpstreamOnCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.pin_memory:
                return args[0]
            dev = kwargs.get("device")
            if dev is not None and not isinstance(dev, int) and torch.device(dev).type == "cuda":
                kwargs = {**kwargs, "device": target}
            return func(*args, **kwargs)

    return _UpstreamOnCpu()


def skip_random_fills() -> Any:
    """A context for building SAM3 when a checkpoint will replace every weight: no random draw is
    made, the freshly allocated tensors are left as they are. The draws are most of the build, all of
    it thrown away by the strict load that follows (cProfile of the build on one CPU thread, a Ray
    actor's default: 5.7 s of which uniform_ 4.3 s while only the Tensor methods were caught).

    Two routes lead to a draw, and both are caught:
    - torch.nn.init's uniform_, normal_ and kaiming_uniform_ dispatch to a torch function mode
      themselves (torch/nn/init.py: `handle_torch_function` at the top of each), and the mode then
      runs with itself switched off, so the Tensor method they call inside is not seen: these
      functions are left out whole (nn.Linear's weights and biases: 521 calls in sam3 0.1.4);
    - the Tensor methods `uniform_`, `normal_` and `erfinv_`, which the other initialisers call
      directly (timm's trunc_normal_, torch.nn.init's xavier_* and trunc_normal_: 384 calls).
    The in-place arithmetic that follows on a tensor left unfilled (timm's trunc_normal_ scales,
    shifts and clamps what it drew: timm/layers/weight_init.py, _trunc_normal_) is left out too; on
    the GPU machine it was 5.7 s of a worker's start under cProfile: the first touch of fresh pages.
    Any other in-place write to such a tensor (fill_, zero_, copy_) runs, and from then on it counts.
    Upstream's initialisers are torch.nn.init's and timm's (sam3/model/vitdet.py, decoder.py,
    model_misc.py). Everything else runs: its only non-persistent buffer, the text encoder's causal
    mask (sam3/model/text_encoder_ve.py:213-226), is built with fill_/triu_, and the position and
    coordinate caches are arithmetic. `.skipped` counts what was left out."""
    import torch
    from torch.overrides import TorchFunctionMode

    init = torch.nn.init
    methods = (torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.erfinv_)
    functions = tuple(
        getattr(init, name)
        for name in ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_")
        if hasattr(init, name)
    )

    arithmetic = (torch.Tensor.mul_, torch.Tensor.add_, torch.Tensor.sub_, torch.Tensor.div_, torch.Tensor.clamp_)

    class _SkipRandomFills(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.skipped = 0
            self.unfilled: dict[int, Any] = {}  # id -> tensor whose fill was left out (held until exit)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in methods or func in functions:
                self.skipped += 1
                tensor = args[0] if args else kwargs["tensor"]
                self.unfilled[id(tensor)] = tensor
                return tensor
            target = args[0] if args else None
            if target is not None and self.unfilled.get(id(target)) is target:
                if func in arithmetic:  # timm's trunc_normal_ scales, shifts and clamps what it drew
                    self.skipped += 1
                    return target
                if getattr(func, "__name__", "").endswith("_"):  # another in-place write (fill_, zero_, copy_): it counts
                    del self.unfilled[id(target)]
            return func(*args, **kwargs)

        def __exit__(self, *exc: Any) -> Any:
            self.unfilled.clear()
            return super().__exit__(*exc)

    return _SkipRandomFills()


def _start_cuda_early(requested: str) -> threading.Thread | None:
    """Create the CUDA context of the GPU SAM3 will use in a background thread, while sam3 is
    imported and the model built on the CPU (seconds of a worker's start that need no GPU); the
    move to the GPU then finds it made. Nothing is raised here: a GPU that is not there is
    reported by `load` itself."""
    import torch

    device = pick_device(requested)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None

    def create() -> None:
        with contextlib.suppress(Exception):
            torch.empty(1, device=device)

    thread = threading.Thread(target=create, name="sam3-cuda-context", daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------------
# The segmenter.
# --------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """One kept query of one phrase, before duplicate removal."""

    phrase_index: int
    query: int
    score: float
    mask_logits: Any  # torch (288, 288) float32 on the model's device


class Sam3Segmenter:
    """SAM3 text/box prompts -> one mask per object (see the module docstring)."""

    name = "sam3"

    def __init__(
        self,
        cfg: SegmenterConfig,
        *,
        device: str = "auto",
        load_from_hf: bool = True,
        min_masks_per_phrase: int = 0,
    ) -> None:
        """
        cfg: confidence, dedup_iou, dedup_iom, max_masks_per_phrase, box_min_iou, sam3_phrase_batch,
            sam3_checkpoint, sam3_bpe, dtype.
        device: torch device ('auto' picks CUDA when there is one; 'cpu' works, slowly).
        load_from_hf: False builds the real architecture with RANDOM weights (tests and benchmarks
            only) unless cfg.sam3_checkpoint is given.
        min_masks_per_phrase: test knob: keep at least this many masks per phrase even below the
            threshold (random weights rarely pass it). 0 in real use.
        """
        self.cfg = cfg
        self.requested_device = device
        self.load_from_hf = load_from_hf
        self.min_masks_per_phrase = int(min_masks_per_phrase)
        self.model: Any = None
        self.processor: Any = None
        self.device: str | None = None
        self.weights: str = ""  # 'checkpoint <path>' or 'random' once loaded
        self.load_stats: dict[str, Any] = {}  # load_checkpoint_into's stats ({} for random weights)
        self.skipped_fills = 0  # random fills left out while building for a checkpoint (skip_random_fills)
        self.last_report: dict[str, Any] = {}

    # -- loading ---------------------------------------------------------------------------

    def _upstream_context(self) -> Any:
        """Where upstream code runs: the selected CUDA device (its "cuda" caches land there), or
        the CPU mapping of its hard-coded CUDA spots (`upstream_on_cpu`)."""
        import torch

        assert self.device is not None
        if self.device.startswith("cuda"):
            return torch.cuda.device(torch.device(self.device))
        return upstream_on_cpu(self.device) if self.device == "cpu" else contextlib.nullcontext()

    def load(self) -> Any:
        """Build SAM3 once per process (later calls return the same model)."""
        if self.model is not None:
            return self.model
        try:
            import torch
        except ImportError as exc:
            raise missing_dependency("torch", "sam3", SAM3_INSTALL) from exc
        _start_cuda_early(self.requested_device)
        try:
            from sam3.model.sam3_image_processor import Sam3Processor
            from sam3.model_builder import build_sam3_image_model
        except ImportError as exc:
            # sam3 itself, or one of its own imports (einops, psutil, pycocotools, iopath, ...), is missing.
            missing = exc.name if exc.name and exc.name.split(".")[0] != "sam3" else "sam3"
            top = missing.split(".")[0]
            install = SAM3_INSTALL if top == "sam3" else f"pip install {SAM3_PIP_NAMES.get(top, top)}"
            raise missing_dependency(missing, "sam3", install) from exc
        device = pick_device(self.requested_device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(
                f"--device {device} was asked for, but torch sees no CUDA GPU here.",
                "run on a machine with an NVIDIA GPU, use --device cpu (slow), or --segmenter classical.",
            )
        if device != "cpu" and not device.startswith("cuda"):
            raise BackendError(f"SAM3 runs on CUDA or the CPU, not on '{device}'.", "use --device cpu, or a CUDA GPU.")
        bpe = resolve_bpe_path(self.cfg.sam3_bpe)
        checkpoint: Path | None = None
        if self.cfg.sam3_checkpoint:
            checkpoint = Path(self.cfg.sam3_checkpoint).expanduser()
            if not checkpoint.is_file():
                raise InputError(
                    f"--sam3-checkpoint {checkpoint} does not exist.",
                    "give the path of sam3.pt, or leave it out to download facebook/sam3 with HF_TOKEN.",
                )
        elif self.load_from_hf:
            checkpoint = download_sam3_checkpoint()
        t0 = time.perf_counter()
        self.device = device
        # A checkpoint is loaded strictly below (every weight replaced, or a one-line error): no
        # random fills before it.
        fills = skip_random_fills() if checkpoint is not None else contextlib.nullcontext()
        with self._upstream_context(), fills:
            # Built on the CPU and moved once below: upstream's device="cuda" only adds model.cuda()
            # at the end (_setup_device_and_mode, model_builder.py:548-554, called at :635), which
            # for a checkpoint would copy weights that are about to be replaced. Its hard-coded
            # "cuda" caches (position encodings, decoder coordinates) are made at construction on
            # the current device (_upstream_context).
            model = build_sam3_image_model(bpe_path=str(bpe), device="cpu", eval_mode=True, load_from_HF=False, checkpoint_path=None)
        self.skipped_fills = getattr(fills, "skipped", 0)
        if checkpoint is not None:
            # The file's tensors become the weights (never-filled ones are not copied into), mapped
            # from the file: a GPU's move below reads each byte once; on the CPU the weights are the
            # page cache's, one copy for every worker of the machine.
            self.load_stats = load_checkpoint_into(model, checkpoint, assign=True, mmap=True)
            self.weights = f"checkpoint {checkpoint}"
        else:
            fixed = make_random_weights_finite(model)
            self.weights = "random"
            log.warning(
                "SAM3 runs with RANDOM weights (load_from_hf=False, no --sam3-checkpoint): masks are meaningless; tests and benchmarks only. Re-drew %d uninitialised parameters.",
                len(fixed),
            )
        model = model.to(device).eval()
        if device.startswith("cuda"):
            # Convolution shapes are fixed here (1008 px input, 288 px masks), so cuDNN's autotuner
            # pays off after the first call (measured: 157 -> 136 ms for 12 phrases on an H100).
            torch.backends.cudnn.benchmark = True
        self.model = model
        self.processor = Sam3Processor(model, resolution=SAM3_RESOLUTION, device=device, confidence_threshold=self.cfg.confidence)
        log.info("SAM3 built on %s in %.1f s (bpe %s, weights %s)", device, time.perf_counter() - t0, bpe, self.weights)
        return model

    # -- steps ----------------------------------------------------------------------------

    def encode_image(self, image: np.ndarray) -> dict[str, Any]:
        """Preprocess the photo and run the image backbone ONCE; returns a processor state
        ({'backbone_out', 'original_height', 'original_width'}). The backbone is queued on the
        GPU and not waited for."""
        import torch

        self.load()
        image = require_rgb_image(image, "SAM3")
        # (3, H, W) uint8 view of the (H, W, 3) array: Sam3Processor.set_image reads H, W from the
        # last two axes, moves it to the device and resizes there (cheap for 12 MP).
        hwc = torch.from_numpy(image)
        if str(self.device).startswith("cuda"):
            # Through pinned memory and non-blocking: a pageable copy (36 MB for 12 MP) is staged by
            # the driver and `.to()` then waits for the GPU to drain the text encoder; this one is
            # queued behind it. The same (3, H, W) strides reach the processor as with `.to()`.
            pinned = torch.empty(hwc.shape, dtype=torch.uint8, pin_memory=True)
            pinned.copy_(hwc)
            hwc = pinned.to(self.device, non_blocking=True)
        chw = hwc.permute(2, 0, 1)
        with self._upstream_context(), torch.inference_mode(), autocast_context(self.device, self.cfg.dtype):
            return self.processor.set_image(chw)

    def encode_text(self, phrases: list[str], boxes_cxcywh: list[tuple[float, float, float, float] | None]) -> dict[str, Any]:
        """All phrases through the text encoder in ONE call, phrases without a box first, so each
        grounding batch reads a contiguous range of text features. Returns {'text_out', 'order'}
        where order[p] is the phrase index at text position p."""
        import torch

        self.load()
        order = [i for i, b in enumerate(boxes_cxcywh) if b is None] + [i for i, b in enumerate(boxes_cxcywh) if b is not None]
        with self._upstream_context(), torch.inference_mode(), autocast_context(self.device, self.cfg.dtype):
            text_out = self.model.backbone.forward_text([phrases[i] for i in order], device=self.device)
        return {"text_out": text_out, "order": order}

    def ground_phrases(
        self,
        state: dict[str, Any],
        phrases: list[str],
        boxes_cxcywh: list[tuple[float, float, float, float] | None],
        choose: Callable[[int, np.ndarray, np.ndarray], list[int]] | None = None,
        text: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Batched grounding of every phrase on the one encoded image.

        text: `encode_text(phrases, boxes_cxcywh)` when already computed (else computed here).
        choose(phrase_index, scores (Q,), pred_boxes (Q, 4) normalized cxcywh) -> query indices
        whose masks to keep (default: none).
        Returns one dict per phrase: 'scores' (Q,) float32 numpy (sigmoid x presence), 'boxes'
        (Q, 4) float32 numpy (pred_boxes), 'queries' (the chosen indices) and 'mask_logits'
        (len(queries), 288, 288) float32 on the device. Only the chosen masks outlive their batch,
        so memory stays bounded by one batch.
        """
        import torch

        text = text if text is not None else self.encode_text(phrases, boxes_cxcywh)
        order: list[int] = text["order"]
        n = len(order)
        n_plain = sum(1 for b in boxes_cxcywh if b is None)
        results: list[dict[str, Any] | None] = [None] * n
        with self._upstream_context(), torch.inference_mode(), autocast_context(self.device, self.cfg.dtype):
            backbone_out = {**state["backbone_out"], **text["text_out"]}
            batch = max(1, int(self.cfg.sam3_phrase_batch))
            for lo, hi in ((0, n_plain), (n_plain, n)):  # text positions without boxes, then with boxes
                start = lo
                while start < hi:
                    stop = min(start + batch, hi)
                    try:
                        scores, boxes, masks = self._ground_batch(backbone_out, start, stop, [boxes_cxcywh[i] for i in order[start:stop]])
                    except torch.cuda.OutOfMemoryError:
                        if batch == 1:
                            raise
                        torch.cuda.empty_cache()
                        batch = max(1, batch // 2)
                        log.warning("SAM3: out of GPU memory; grounding %d phrases at a time from now on", batch)
                        continue
                    picked: list[list[int]] = []
                    for j, i in enumerate(order[start:stop]):
                        picked.append([int(q) for q in choose(i, scores[j], boxes[j])] if choose is not None else [])
                    # Every chosen mask of the batch in one gather (a list index per phrase costs a
                    # blocking index copy and three launches each); slices of one float32 copy.
                    flat = [j * masks.shape[1] + q for j, queries in enumerate(picked) for q in queries]
                    index = torch.tensor(flat, dtype=torch.long).to(masks.device, non_blocking=True)
                    chosen = masks.flatten(0, 1).index_select(0, index).float()  # (sum of kept, 288, 288)
                    at = 0
                    for j, i in enumerate(order[start:stop]):
                        queries = picked[j]
                        mask_logits = chosen[at : at + len(queries)]  # (len(queries), 288, 288)
                        at += len(queries)
                        results[i] = {"scores": scores[j], "boxes": boxes[j], "queries": queries, "mask_logits": mask_logits}
                    del masks
                    start = stop
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _ground_batch(self, backbone_out: dict[str, Any], start: int, stop: int, boxes: list) -> tuple[np.ndarray, np.ndarray, Any]:
        """forward_grounding for text positions [start, stop) on image 0; `boxes` are theirs (all
        None, or all normalized cxcywh). Returns scores (k, Q) numpy, predicted boxes (k, Q, 4)
        numpy (normalized cxcywh) and mask logits (k, Q, 288, 288) on the device. Builds its index
        tensors on the device, so nothing waits for the backbone until the scores are read."""
        import torch
        from sam3.model.data_misc import FindStage
        from sam3.model.geometry_encoders import Prompt

        k = stop - start
        dev = self.device
        find_input = FindStage(
            img_ids=torch.zeros(k, device=dev, dtype=torch.long),  # every query looks at image 0
            text_ids=torch.arange(start, stop, device=dev, dtype=torch.long),  # query j reads text position start + j
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        if boxes[0] is None:
            geometric_prompt = self.model._get_dummy_prompt(k)
        else:
            # One positive box per query: what add_geometric_prompt appends to the dummy prompt.
            host = torch.tensor(boxes, dtype=torch.float32).view(1, k, 4)
            if dev.startswith("cuda"):
                host = host.pin_memory()
            geometric_prompt = Prompt(
                box_embeddings=host.to(dev, non_blocking=True),
                box_mask=torch.zeros(k, 1, device=dev, dtype=torch.bool),
                box_labels=torch.ones(1, k, device=dev, dtype=torch.long),
            )
        out = self.model.forward_grounding(
            backbone_out=backbone_out, find_input=find_input, geometric_prompt=geometric_prompt, find_target=None
        )
        probs = out["pred_logits"].float().sigmoid()  # (k, Q, 1)
        presence = out["presence_logit_dec"].float().sigmoid().unsqueeze(1)  # (k, 1, 1)
        # Scores and boxes in one copy (the first wait on the GPU).
        small = torch.cat([(probs * presence), out["pred_boxes"].float()], dim=-1).cpu().numpy()  # (k, Q, 5)
        return small[..., 0], small[..., 1:], out["pred_masks"]  # (k, Q, 288, 288) logits

    def upsample_masks(self, mask_logits: Any, height: int, width: int) -> list[np.ndarray]:
        """(K, h, w) logits on the device -> K (height, width) bool numpy masks (see `upsample_masks_and_boxes`)."""
        return self.upsample_masks_and_boxes(mask_logits, height, width)[0]

    def upsample_masks_and_boxes(self, mask_logits: Any, height: int, width: int) -> tuple[list[np.ndarray], list[tuple | None]]:
        """(K, h, w) logits on the device -> K (height, width) bool numpy masks and their tight
        pixel boxes (xyxy, exclusive max, as `mask_box_xyxy`; None for an empty mask).

        Same rule as the processor: bilinear to the photo's size, then sigmoid > 0.5, i.e. logit > 0
        (up: sam3/model/sam3_image_processor.py:211-219). On CUDA the threshold, the boxes and the
        packing to bits (np.packbits order of the row-major (H, W) mask) happen on the GPU, and only
        the bits (1.5 MB for 4000x3000) and the row/column occupancy are copied to the host, which
        unpacks them on several threads; no full-size array is scanned on the host."""
        import torch
        import torch.nn.functional as F

        k = int(mask_logits.shape[0])
        if k == 0:
            return [], []
        n = height * width
        if not str(mask_logits.device).startswith("cuda"):
            out = []
            for s in range(0, k, UPSAMPLE_BATCH):
                chunk = torch.nan_to_num(mask_logits[s : s + UPSAMPLE_BATCH].float(), nan=-1.0)
                up = F.interpolate(chunk[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
                out += list((up > 0).numpy())
            return out, [mask_box_xyxy(m) if m.any() else None for m in out]
        dev = mask_logits.device
        n8 = (n + 7) // 8
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=dev)
        packed = torch.empty((k, n8 + height + width), dtype=torch.uint8, device=dev)  # bits | rows occupied | columns occupied
        for s in range(0, k, UPSAMPLE_BATCH):
            chunk = torch.nan_to_num(mask_logits[s : s + UPSAMPLE_BATCH].float(), nan=-1.0)
            c = len(chunk)
            on = F.interpolate(chunk[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0] > 0  # (c, H, W)
            bits = on.view(c, n).to(torch.uint8)
            if n8 * 8 != n:
                bits = F.pad(bits, (0, n8 * 8 - n))
            packed[s : s + c, :n8] = (bits.view(c, n8, 8) * weights).sum(-1, dtype=torch.uint8)
            packed[s : s + c, n8 : n8 + height] = on.any(dim=2)
            packed[s : s + c, n8 + height :] = on.any(dim=1)
        host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(dev).synchronize()
        data = host.numpy()

        def unpack(j: int) -> np.ndarray:
            return np.unpackbits(data[j, :n8], count=n).view(bool).reshape(height, width)

        boxes: list[tuple | None] = []
        for j in range(k):
            ys, xs = np.flatnonzero(data[j, n8 : n8 + height]), np.flatnonzero(data[j, n8 + height :])
            boxes.append(None if len(xs) == 0 else (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)))
        if k == 1:
            return [unpack(0)], boxes
        # np.unpackbits releases the GIL: unpack (and page in) the masks on several cores.
        return list(_unpack_executor().map(unpack, range(k))), boxes

    # -- the Segmenter protocol -----------------------------------------------------------

    def segment(self, image: np.ndarray, plan: Plan | None) -> list[ObjectMask]:
        """One mask per object for each plan item (phrase, and box when present).

        Phrases that give no mask are listed in `last_report['no_mask']` (boxed phrases whose
        concept was found only outside the box also in 'box_misses'); that is not an error.
        """
        import torch

        items = list(plan.items) if plan is not None else []
        if not items:
            raise InputError(
                "SAM3 needs text or box prompts and the plan is empty.",
                "use the VLM planner, give --box x0,y0,x1,y1[,label], or use --segmenter classical.",
            )
        self.load()
        image = require_rgb_image(image, "SAM3")
        height, width = image.shape[:2]
        timings: dict[str, float] = {}
        phrases, boxes, warnings = _prompts(items, width, height)
        # Text first: its host->device copy waits for an idle GPU. Then the image backbone is
        # queued, and the CPU queues the (launch-bound) grounding while the GPU runs the backbone.
        t = time.perf_counter()
        text = self.encode_text(phrases, boxes)
        timings["text"] = time.perf_counter() - t
        t = time.perf_counter()
        state = self.encode_image(image)
        timings["image_queued"] = time.perf_counter() - t

        nonfinite = [0] * len(phrases)
        box_misses: list[dict[str, Any]] = []
        box_iou: dict[int, float] = {}

        def choose(i: int, scores: np.ndarray, pred_boxes: np.ndarray) -> list[int]:
            min_keep = self.min_masks_per_phrase
            if boxes[i] is not None:
                q, iou, nonfinite[i] = select_box_query(
                    scores, pred_boxes, boxes[i], self.cfg.confidence, self.cfg.box_min_iou, min(min_keep, 1)
                )
                if q is None and (np.isfinite(scores) & (scores > self.cfg.confidence)).any():
                    box_misses.append({"phrase": phrases[i], "box_xyxy": list(items[i].box_xyxy or ()), "best_box_iou": round(iou, 3)})
                if q is not None:
                    box_iou[i] = round(iou, 3)
                return [] if q is None else [q]
            cap = int(self.cfg.max_masks_per_phrase)
            keep, nonfinite[i] = select_queries(scores, self.cfg.confidence, cap, min(min_keep, cap) if cap > 0 else min_keep)
            return keep

        t = time.perf_counter()
        grounded = self.ground_phrases(state, phrases, boxes, choose, text=text)
        del state, text
        timings["image_and_ground"] = time.perf_counter() - t

        t = time.perf_counter()
        candidates: list[_Candidate] = []
        for i, res in enumerate(grounded):
            for q, logits_q in zip(res["queries"], res["mask_logits"], strict=True):
                candidates.append(_Candidate(i, q, float(res["scores"][q]), logits_q))
        nonfinite_total = sum(nonfinite)

        dropped: dict[int, str] = {}
        with torch.inference_mode():
            if candidates:
                logits = torch.stack([c.mask_logits.float() for c in candidates])  # (K, 288, 288)
                small = _iou_masks(torch.nan_to_num(logits, nan=-1.0), height, width)  # (K, h, w) bool
                flat = small.flatten(1).float()  # (K, h*w); counts stay exact in fp32 below 2**24 pixels
                inter = (flat @ flat.T).cpu().numpy()  # (K, K) pixel counts; the diagonal holds the areas
                alive = [j for j in range(len(candidates)) if inter[j, j] > 0]
                kept_alive, dropped_alive = dedup_masks(
                    inter[np.ix_(alive, alive)],
                    np.array([candidates[j].score for j in alive]),
                    [candidates[j].phrase_index for j in alive],
                    self.cfg.dedup_iou,
                    self.cfg.dedup_iom,
                )
                kept = [alive[j] for j in kept_alive]
                dropped = {alive[j]: why for j, why in dropped_alive.items()}
                kept.sort(key=lambda j: (candidates[j].phrase_index, -candidates[j].score))
                t_up = time.perf_counter()
                timings["dedup"] = t_up - t
                full, full_boxes = self.upsample_masks_and_boxes(logits[kept], height, width) if kept else ([], [])
                timings["upsample_copy"] = time.perf_counter() - t_up
            else:
                alive, kept, full, full_boxes = [], [], [], []

        masks: list[ObjectMask] = []
        returned: set[int] = set()  # phrase indices that gave a mask
        for j, mask, box in zip(kept, full, full_boxes, strict=True):
            c = candidates[j]
            if box is None:  # empty at full size
                continue
            item = items[c.phrase_index]
            prompt = (
                phrases[c.phrase_index]
                if boxes[c.phrase_index] is None
                else f"{phrases[c.phrase_index]} + box {','.join(f'{v:.0f}' for v in item.box_xyxy)}"
            )
            masks.append(ObjectMask(mask=mask, label=item.phrase or "object", prompt=prompt, score=c.score, source="sam3", box_xyxy=box))
            returned.add(c.phrase_index)
        timings["select_dedup_upsample"] = time.perf_counter() - t

        alive_phrases = {candidates[j].phrase_index for j in alive}
        kept_phrases = {candidates[j].phrase_index for j in kept}
        only_duplicates = sorted(alive_phrases - kept_phrases)
        self.last_report = {
            "phrases": len(phrases),
            "no_mask": [phrases[i] for i in range(len(items)) if i not in returned and i not in only_duplicates],
            "only_duplicates": [phrases[i] for i in only_duplicates],
            "box_misses": box_misses,
            "box_iou": [{"phrase": phrases[i], "box_iou": v} for i, v in sorted(box_iou.items())],
            "nan_scores": int(nonfinite_total),
            "candidates": len(candidates),
            "empty_masks": len(candidates) - len(alive),
            "duplicates_removed": sum(1 for why in dropped.values() if why == "iou"),
            "parts_removed": sum(1 for why in dropped.values() if why == "iom"),
            "weights": self.weights,
            "checkpoint": self.load_stats,
            "device": self.device,
            "dtype": self.cfg.dtype,
            "warnings": warnings,
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
        }
        return masks


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _prompts(items: list[PlanItem], width: int, height: int) -> tuple[list[str], list, list[str]]:
    """Plan items -> (texts, boxes as normalized cxcywh or None, warnings). An item without a
    phrase (an unlabelled --box) is sent with upstream's box-only text "visual"
    (up: sam3/model/sam3_image_processor.py:137-142)."""
    phrases, boxes, warnings = [], [], []
    for item in items:
        text = (item.phrase or "").strip() or BOX_ONLY_TEXT
        box = None
        if item.box_xyxy is not None:
            box = box_xyxy_to_cxcywh_normalized(item.box_xyxy, width, height)
            if box is None:
                warnings.append(f"box {item.box_xyxy} of {text!r} is empty inside the {width}x{height} image; used the text alone")
        phrases.append(text)
        boxes.append(box)
    return phrases, boxes, warnings


def _iou_masks(logits: Any, height: int, width: int) -> Any:
    """(K, 288, 288) logits -> (K, h, w) bool at the IoU comparison size."""
    import torch.nn.functional as F

    h, w = iou_size(height, width)
    return F.interpolate(logits[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0
