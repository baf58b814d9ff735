"""SAM3 with the real package and RANDOM weights (load_from_HF=False) on a CUDA GPU: the full path
photo -> Sam3Segmenter.segment -> masks/ files, and batched grounding == one phrase at a time
through Sam3Processor. Skipped where there is no CUDA GPU or no sam3 (run: pytest -m gpu)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("sam3.model_builder", reason="needs the sam3 package (the 'sam3' env)")

from pipeline.core.config import SegmenterConfig  # noqa: E402
from pipeline.core.types import Plan, PlanItem  # noqa: E402
from pipeline.masks import sam3 as S  # noqa: E402

PHRASES = ["red mug", "wooden table", "laptop", "potted plant", "blue book", "glass bottle"]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like image: a smooth background and a few filled shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([120 + 60 * xx / w, 110 + 50 * yy / h, 140 - 40 * xx / w], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h, rng.uniform(0.05, 0.15) * min(h, w)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def seg():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    cfg = SegmenterConfig(confidence=0.5, dedup_iou=0.8, max_masks_per_phrase=3, dtype="float32")
    segmenter = S.Sam3Segmenter(cfg, device="cuda", load_from_hf=False, min_masks_per_phrase=3)
    segmenter.load()
    assert segmenter.weights == "random"
    return segmenter


def test_full_path_photo_to_masks_folder(seg, tmp_path):
    from pipeline.masks.store import read_masks, write_masks

    image = _photo(768, 1024)
    plan = Plan(items=[PlanItem(p) for p in PHRASES[:4]] + [PlanItem("bowl", (100.0, 120.0, 400.0, 380.0))])
    calls = {"image": 0, "text": 0}
    backbone = seg.model.backbone
    real_image, real_text = backbone.forward_image, backbone.forward_text

    def count_image(*a, **k):
        calls["image"] += 1
        return real_image(*a, **k)

    def count_text(*a, **k):
        calls["text"] += 1
        return real_text(*a, **k)

    backbone.forward_image, backbone.forward_text = count_image, count_text
    try:
        masks = seg.segment(image, plan)
    finally:
        del backbone.forward_image, backbone.forward_text
    assert calls == {"image": 1, "text": 1}  # one backbone pass, one text-encoder call for 5 prompts

    report = seg.last_report
    print("report:", json.dumps(report))
    assert report["phrases"] == 5 and report["weights"] == "random"
    assert masks, f"random weights gave no mask at all: {report}"
    for m in masks:
        assert m.mask.shape == (768, 1024) and m.mask.dtype == bool and m.mask.any()
        assert m.label in PHRASES + ["bowl"] and m.source == "sam3" and np.isfinite(m.score)
    assert sum(m.label == "bowl" for m in masks) <= 1  # a phrase with a box is one object
    assert report["no_mask"] == [
        p for p in PHRASES[:4] + ["bowl"] if p not in {m.label for m in masks} and p not in report["only_duplicates"]
    ]
    iou = S.mask_iou_matrix(np.stack([m.mask for m in masks]))
    np.fill_diagonal(iou, 0)
    assert iou.max() < 0.8 + 0.05  # duplicates removed (decided at <= 1024 px, checked at full size)

    written = write_masks(tmp_path / "masks", image, masks, meta={"segmenter_report": report})
    assert [w.id for w in written] == [f"obj_{i:03d}" for i in range(1, len(written) + 1)]
    for name in ["masks.json", "overlay.png"] + [f"{w.id}.png" for w in written]:
        assert (tmp_path / "masks" / name).is_file(), name
    doc = json.loads((tmp_path / "masks" / "masks.json").read_text())
    assert doc["meta"]["segmenter_report"]["phrases"] == 5
    back = read_masks(tmp_path / "masks")
    assert len(back) == len(written)
    for a, b in zip(written, back, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.label == b.label


def test_batched_grounding_matches_set_text_prompt_one_phrase_at_a_time(seg):
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    image = _photo(480, 640, seed=1)
    items = [PlanItem(p) for p in PHRASES] + [PlanItem("mug", (50.0, 60.0, 250.0, 300.0)), PlanItem("book", (300.0, 100.0, 600.0, 400.0))]
    phrases, boxes, _ = S._prompts(items, 640, 480)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32, so batch shape does not change rounding
    try:
        state = seg.encode_image(image)
        batched = seg.ground_phrases(state, phrases, boxes, lambda i, s: [int(q) for q in np.argsort(-s)[:3]])
        proc = Sam3Processor(seg.model, device=seg.device, confidence_threshold=0.0)
        worst_score, worst_logit = 0.0, 0.0
        for i, phrase in enumerate(phrases):
            st = proc.set_image(Image.fromarray(image))  # the reference system's way: image again per phrase
            st = proc.set_text_prompt(phrase, st)
            if boxes[i] is not None:
                st = proc.add_geometric_prompt(list(boxes[i]), True, st)
            with torch.inference_mode():
                out = seg.model.forward_grounding(
                    backbone_out=st["backbone_out"], find_input=proc.find_stage, geometric_prompt=st["geometric_prompt"], find_target=None
                )
            ref = (out["pred_logits"].sigmoid() * out["presence_logit_dec"].sigmoid().unsqueeze(1)).squeeze(-1)[0].float().cpu().numpy()
            ours = batched[i]["scores"]
            assert ours.shape == ref.shape == (200,)
            worst_score = max(worst_score, float(np.nanmax(np.abs(ours - ref))))
            q = batched[i]["queries"]
            diff = (out["pred_masks"][0, q].float() - batched[i]["mask_logits"]).abs().max().item()
            worst_logit = max(worst_logit, diff)
            # The processor's own post-processing keeps every query scoring > 0 here: same scores.
            assert np.allclose(np.sort(st["scores"].float().cpu().numpy())[::-1][:3], np.sort(ours)[::-1][:3], atol=1e-3)
        print(f"batched vs one-by-one: max |score diff| {worst_score:.2e}, max |mask logit diff| {worst_logit:.2e}")
        assert worst_score < 1e-3 and worst_logit < 1e-2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_large_photo_4000x3000_bf16_bounded_memory(seg):
    image = _photo(3000, 4000, seed=2)
    plan = Plan(items=[PlanItem(p) for p in (PHRASES * 2)[:12]])
    seg.cfg.dtype = "bfloat16"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        masks = seg.segment(image, plan)
    finally:
        seg.cfg.dtype = "float32"
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"4000x3000, 12 phrases, bf16: {len(masks)} masks, peak +{peak_gib:.1f} GiB, report {json.dumps(seg.last_report)}")
    assert masks and all(m.mask.shape == (3000, 4000) for m in masks)
    assert peak_gib < 30
