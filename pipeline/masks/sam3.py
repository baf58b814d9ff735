"""Segmenter `sam3`: SAM3 (PyPI `sam3` 0.1.4, facebookresearch/sam3) in the `sam3` env, on a CUDA GPU.

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
- A plan item's box becomes a positive box prompt for its phrase (the same geometric prompt that
  `Sam3Processor.add_geometric_prompt` builds); phrases with and without boxes are batched apart,
  so no query needs padded prompts.
- Scores as in `Sam3Processor._forward_grounding`: sigmoid(logit) x sigmoid(presence logit).
  NaN or infinite scores never pass the threshold (they are counted in `last_report`).
- One object = one mask: per phrase the best masks whose score reaches `confidence` (at most
  `max_masks_per_phrase`, and one for a phrase with a box), then masks that overlap a
  higher-scoring one by mask IoU >= `dedup_iou` are dropped, across phrases.
- Masks are upsampled from the model's 288x288 logits to the photo's size only for the objects
  that are kept, a few at a time, so 4000x3000 photos stay within a small memory budget.

The selection and duplicate-removal rules are pure numpy functions (`select_queries`,
`mask_iou_matrix`, `dedup_by_iou`) so they are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import SegmenterConfig
from pipeline.core.device import autocast_context, pick_device
from pipeline.core.errors import BackendError, InputError, MissingDependencyError, missing_dependency
from pipeline.core.hub import hf_token, hub_error
from pipeline.core.types import ObjectMask, Plan, PlanItem, require_rgb_image

log = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SAM3_HF_REPO = "facebook/sam3"
SAM3_HF_CHECKPOINT = "sam3.pt"
SAM3_HF_CONFIG = "config.json"
SAM3_RESOLUTION = 1008  # the image side the model was trained at (Sam3Processor's default)
SAM3_INSTALL = "bash envs/setup.sh sam3   (or, inside that env: pip install sam3==0.1.4 open_clip_torch)"
BOX_ONLY_TEXT = "visual"  # the text Sam3Processor uses when a prompt has a box and no phrase
IOU_MAX_SIDE = 1024  # masks are compared at most this large: enough for IoU, cheap on 12 MP photos
UPSAMPLE_BATCH = 8  # masks upsampled to the photo's size at once (8 x 4000x3000 fp32 = 384 MB)


# --------------------------------------------------------------------------------------------
# Pure functions (numpy only): tested on CPU.
# --------------------------------------------------------------------------------------------


def select_queries(scores: np.ndarray, confidence: float, max_keep: int, min_keep: int = 0) -> tuple[list[int], int]:
    """Which of one phrase's query slots to keep, best first.

    scores: (Q,) float, sigmoid(logit) x presence. A slot passes when its score is finite and
    >= confidence; at most `max_keep` pass. `min_keep` (a test knob for random weights) then
    tops up with the best finite scores below the threshold. Returns (indices, non-finite count).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = np.isfinite(scores)
    nonfinite = int((~finite).sum())
    ranked = np.where(finite, scores, -np.inf)
    order = [int(i) for i in np.argsort(-ranked, kind="stable") if finite[i]]
    passing = [i for i in order if scores[i] >= confidence][: max(0, max_keep)]
    if len(passing) < min_keep:
        extra = [i for i in order if i not in set(passing)]
        passing += extra[: min_keep - len(passing)]
    return passing, nonfinite


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
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ranked = np.where(np.isfinite(scores), scores, -np.inf)
    kept: list[int] = []
    for i in np.argsort(-ranked, kind="stable"):
        if all(iou[i, j] < iou_threshold for j in kept):
            kept.append(int(i))
    return sorted(kept)


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

        if isinstance(exc, getattr(hf_errors, "EntryNotFoundError", ())) and not isinstance(exc, getattr(hf_errors, "LocalEntryNotFoundError", ())):
            raise BackendError(f"{repo_id} has no {SAM3_HF_CHECKPOINT}.", "pass --sam3-checkpoint PATH to a SAM3 image checkpoint.") from None
        mapped = hub_error(exc, repo_id, alternative="download sam3.pt yourself and pass --sam3-checkpoint PATH")
        if mapped is not None:
            raise mapped from None
        raise


def load_checkpoint_into(model: Any, path: Path) -> dict[str, int]:
    """Load a SAM3 checkpoint (`torch.load(weights_only=True)`) into the image model.

    Keys follow upstream's file: the image model's weights carry a `detector.` prefix (tracker
    weights are ignored, the image model has no tracker). Nothing matching, or most weights
    missing, is an error; a few missing keys are logged."""
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackendError(
            f"could not read the SAM3 checkpoint {path}: {exc}".splitlines()[0], "pass a valid sam3.pt with --sam3-checkpoint."
        ) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict):
        raise BackendError(f"{path} is not a state dict.", "pass facebook/sam3's sam3.pt with --sam3-checkpoint.")
    state = {k.replace("detector.", "", 1): v for k, v in ckpt.items() if "detector" in k}
    expected = set(model.state_dict().keys())
    matched = expected & set(state)
    if not matched or len(matched) < 0.5 * len(expected):
        raise BackendError(
            f"{path} does not hold SAM3 image-model weights ({len(matched)} of {len(expected)} expected keys found).",
            "pass facebook/sam3's sam3.pt with --sam3-checkpoint.",
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        log.warning("SAM3 checkpoint %s: %d model keys not in the file (e.g. %s)", path, len(missing), list(missing)[:3])
    return {"loaded": len(matched), "missing": len(missing), "unexpected": len(unexpected)}


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


# --------------------------------------------------------------------------------------------
# The segmenter.
# --------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """One kept query of one phrase, before duplicate removal."""

    phrase_index: int
    query: int
    score: float
    mask_logits: Any  # torch (288, 288) float32 on the GPU


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
        cfg: confidence, dedup_iou, max_masks_per_phrase, sam3_phrase_batch, sam3_checkpoint, sam3_bpe, dtype.
        device: torch device ('auto' picks CUDA; SAM3 needs CUDA).
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
        self.last_report: dict[str, Any] = {}

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> Any:
        """Build SAM3 once per process (later calls return the same model)."""
        if self.model is not None:
            return self.model
        try:
            import torch
        except ImportError as exc:
            raise missing_dependency("torch", "sam3", SAM3_INSTALL) from exc
        try:
            from sam3.model.sam3_image_processor import Sam3Processor
            from sam3.model_builder import build_sam3_image_model
        except ImportError as exc:
            # sam3 itself, or one of its own imports (pycocotools, iopath, ...), is missing.
            missing = exc.name if exc.name and exc.name.split(".")[0] != "sam3" else "sam3"
            raise missing_dependency(missing, "sam3", SAM3_INSTALL) from exc
        device = pick_device(self.requested_device)
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise BackendError(
                f"SAM3 needs a CUDA GPU; the device here is '{device}'.",
                "run on a machine with an NVIDIA GPU, or use --segmenter classical.",
            )
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
        # Upstream builds some tensors on the current CUDA device ("cuda"), so select ours first.
        with torch.cuda.device(torch.device(device)):
            model = build_sam3_image_model(bpe_path=str(bpe), device="cuda", eval_mode=True, load_from_HF=False, checkpoint_path=None)
        if checkpoint is not None:
            load_checkpoint_into(model, checkpoint)
            self.weights = f"checkpoint {checkpoint}"
        else:
            fixed = make_random_weights_finite(model)
            self.weights = "random"
            log.warning(
                "SAM3 runs with RANDOM weights (load_from_hf=False, no --sam3-checkpoint): masks are meaningless; tests and benchmarks only. Re-drew %d uninitialised parameters.",
                len(fixed),
            )
        model = model.to(device).eval()
        # Convolution shapes are fixed here (1008 px input, 288 px masks), so cuDNN's autotuner
        # pays off after the first call (measured: 157 -> 136 ms for 12 phrases on an H100).
        torch.backends.cudnn.benchmark = True
        self.model = model
        self.device = device
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
        # (3, H, W) uint8 view of the (H, W, 3) array (no CPU copy): Sam3Processor.set_image reads
        # H, W from the last two axes, moves it to the GPU and resizes there (cheap for 12 MP).
        chw = torch.from_numpy(image).permute(2, 0, 1)
        with torch.inference_mode(), autocast_context(self.device, self.cfg.dtype):
            return self.processor.set_image(chw)

    def encode_text(self, phrases: list[str], boxes_cxcywh: list[tuple[float, float, float, float] | None]) -> dict[str, Any]:
        """All phrases through the text encoder in ONE call, phrases without a box first, so each
        grounding batch reads a contiguous range of text features. Returns {'text_out', 'order'}
        where order[p] is the phrase index at text position p."""
        import torch

        self.load()
        order = [i for i, b in enumerate(boxes_cxcywh) if b is None] + [i for i, b in enumerate(boxes_cxcywh) if b is not None]
        with torch.inference_mode(), autocast_context(self.device, self.cfg.dtype):
            text_out = self.model.backbone.forward_text([phrases[i] for i in order], device=self.device)
        return {"text_out": text_out, "order": order}

    def ground_phrases(
        self,
        state: dict[str, Any],
        phrases: list[str],
        boxes_cxcywh: list[tuple[float, float, float, float] | None],
        choose: Callable[[int, np.ndarray], list[int]] | None = None,
        text: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Batched grounding of every phrase on the one encoded image.

        text: `encode_text(phrases, boxes_cxcywh)` when already computed (else computed here).
        choose(phrase_index, scores) -> query indices whose masks to keep (default: none).
        Returns one dict per phrase: 'scores' (Q,) float32 numpy (sigmoid x presence), 'queries'
        (the chosen indices) and 'mask_logits' (len(queries), 288, 288) float32 on the GPU. Only the
        chosen masks outlive their batch, so memory stays bounded by one batch.
        """
        import torch

        text = text if text is not None else self.encode_text(phrases, boxes_cxcywh)
        order: list[int] = text["order"]
        n = len(order)
        n_plain = sum(1 for b in boxes_cxcywh if b is None)
        results: list[dict[str, Any] | None] = [None] * n
        with torch.inference_mode(), autocast_context(self.device, self.cfg.dtype):
            backbone_out = {**state["backbone_out"], **text["text_out"]}
            batch = max(1, int(self.cfg.sam3_phrase_batch))
            for lo, hi in ((0, n_plain), (n_plain, n)):  # text positions without boxes, then with boxes
                start = lo
                while start < hi:
                    stop = min(start + batch, hi)
                    try:
                        scores, masks = self._ground_batch(backbone_out, start, stop, [boxes_cxcywh[i] for i in order[start:stop]])
                    except torch.cuda.OutOfMemoryError:
                        if batch == 1:
                            raise
                        torch.cuda.empty_cache()
                        batch = max(1, batch // 2)
                        log.warning("SAM3: out of GPU memory; grounding %d phrases at a time from now on", batch)
                        continue
                    for j, i in enumerate(order[start:stop]):
                        queries = [int(q) for q in choose(i, scores[j])] if choose is not None else []
                        chosen = masks[j, queries].float().clone()  # (len(queries), 288, 288)
                        results[i] = {"scores": scores[j], "queries": queries, "mask_logits": chosen}
                    del masks
                    start = stop
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _ground_batch(self, backbone_out: dict[str, Any], start: int, stop: int, boxes: list) -> tuple[np.ndarray, Any]:
        """forward_grounding for text positions [start, stop) on image 0; `boxes` are theirs (all
        None, or all normalized cxcywh). Returns scores (k, Q) numpy and mask logits (k, Q, 288, 288)
        on the GPU. Builds its index tensors on the GPU, so nothing waits for the backbone until
        the scores are read."""
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
        scores = (probs * presence).squeeze(-1).cpu().numpy()  # (k, Q); the first wait on the GPU
        return scores, out["pred_masks"]  # (k, Q, 288, 288) logits

    def upsample_masks(self, mask_logits: Any, height: int, width: int) -> np.ndarray:
        """(K, h, w) logits on the GPU -> (K, height, width) bool numpy, a few at a time.
        Same rule as the processor: bilinear to the photo's size, then sigmoid > 0.5 (logit > 0)."""
        import torch
        import torch.nn.functional as F

        out = np.zeros((mask_logits.shape[0], height, width), dtype=bool)
        for s in range(0, mask_logits.shape[0], UPSAMPLE_BATCH):
            chunk = torch.nan_to_num(mask_logits[s : s + UPSAMPLE_BATCH].float(), nan=-1.0)
            up = F.interpolate(chunk[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            out[s : s + len(chunk)] = (up > 0).cpu().numpy()
        return out

    # -- the Segmenter protocol -----------------------------------------------------------

    def segment(self, image: np.ndarray, plan: Plan | None) -> list[ObjectMask]:
        """One mask per object for each plan item (phrase, and box when present).

        Phrases that give no mask are listed in `last_report['no_mask']`; that is not an error.
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

        def choose(i: int, scores: np.ndarray) -> list[int]:
            max_keep = 1 if boxes[i] is not None else max(1, int(self.cfg.max_masks_per_phrase))
            keep, nonfinite[i] = select_queries(scores, self.cfg.confidence, max_keep, min(self.min_masks_per_phrase, max_keep))
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

        with torch.inference_mode():
            if candidates:
                logits = torch.stack([c.mask_logits.float() for c in candidates])  # (K, 288, 288)
                small = _iou_masks(torch.nan_to_num(logits, nan=-1.0), height, width)  # (K, h, w) bool
                nonempty = small.flatten(1).any(1).cpu().numpy()
                flat = small.flatten(1).float()  # (K, h*w); counts stay exact in fp32 below 2**24 pixels
                iou = iou_from_intersections((flat @ flat.T).cpu().numpy())  # (K, K)
                alive = [j for j in range(len(candidates)) if nonempty[j]]
                kept_alive = dedup_by_iou(iou[np.ix_(alive, alive)], np.array([candidates[j].score for j in alive]), self.cfg.dedup_iou)
                kept = [alive[j] for j in kept_alive]
                kept.sort(key=lambda j: (candidates[j].phrase_index, -candidates[j].score))
                full = self.upsample_masks(logits[kept], height, width) if kept else np.zeros((0, height, width), bool)
            else:
                alive, kept, full = [], [], np.zeros((0, height, width), bool)

        masks: list[ObjectMask] = []
        returned: set[int] = set()  # phrase indices that gave a mask
        for j, mask in zip(kept, full, strict=True):
            c = candidates[j]
            if not mask.any():
                continue
            item = items[c.phrase_index]
            prompt = (
                phrases[c.phrase_index]
                if boxes[c.phrase_index] is None
                else f"{phrases[c.phrase_index]} + box {','.join(f'{v:.0f}' for v in item.box_xyxy)}"
            )
            masks.append(ObjectMask(mask=mask, label=item.phrase or "object", prompt=prompt, score=c.score, source="sam3"))
            returned.add(c.phrase_index)
        timings["select_dedup_upsample"] = time.perf_counter() - t

        alive_phrases = {candidates[j].phrase_index for j in alive}
        kept_phrases = {candidates[j].phrase_index for j in kept}
        only_duplicates = sorted(alive_phrases - kept_phrases)
        self.last_report = {
            "phrases": len(phrases),
            "no_mask": [phrases[i] for i in range(len(items)) if i not in returned and i not in only_duplicates],
            "only_duplicates": [phrases[i] for i in only_duplicates],
            "nan_scores": int(nonfinite_total),
            "candidates": len(candidates),
            "empty_masks": len(candidates) - len(alive),
            "duplicates_removed": len(alive) - len(kept),
            "weights": self.weights,
            "dtype": self.cfg.dtype,
            "warnings": warnings,
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
        }
        return masks


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _prompts(items: list[PlanItem], width: int, height: int) -> tuple[list[str], list, list[str]]:
    """Plan items -> (texts, boxes as normalized cxcywh or None, warnings)."""
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
