"""SAM3 with the real package and RANDOM weights (load_from_HF=False) on a CUDA GPU: the full path
photo -> Sam3Segmenter.segment -> masks/ files, batched grounding == one phrase at a time through
Sam3Processor, the box-prompt choice, strict checkpoint loading, and the forced-mask path on a
4000x3000 photo (bits packed on the GPU == upsampled bools). Skipped where there is no CUDA GPU or
no sam3 (run: pytest -m gpu). The same checks run on the CPU in tests/test_sam3_upstream.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("sam3.model_builder", reason="needs the sam3 package (the 'sam3' env)")

import sam3_checks as C  # noqa: E402

from pipeline.core.config import SegmenterConfig  # noqa: E402
from pipeline.core.types import Plan, PlanItem, mask_box_xyxy  # noqa: E402
from pipeline.masks import sam3 as S  # noqa: E402

PHRASES = ["red mug", "wooden table", "laptop", "potted plant", "blue book", "glass bottle"]


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

    image = C.photo(768, 1024)
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

    image = C.photo(480, 640, seed=1)
    items = [PlanItem(p) for p in PHRASES] + [PlanItem("mug", (50.0, 60.0, 250.0, 300.0)), PlanItem("book", (300.0, 100.0, 600.0, 400.0))]
    phrases, boxes, _ = S._prompts(items, 640, 480)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32, so batch shape does not change rounding
    try:
        state = seg.encode_image(image)
        batched = seg.ground_phrases(state, phrases, boxes, lambda i, s, b: [int(q) for q in np.argsort(-s)[:3]])
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
    image = C.photo(3000, 4000, seed=2)
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


def test_box_prompt_keeps_the_instance_in_the_box_not_the_top_score(seg):
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # ours and the processor's path round alike
    try:
        got = C.check_box_prompt_keeps_the_instance_in_the_box(seg, C.photo(480, 640, seed=3))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    print("box choice:", got)


def test_batched_path_equals_the_processor_per_phrase_exactly_in_fp32(seg):
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        items = [
            PlanItem("red mug"),
            PlanItem("laptop"),
            PlanItem("bowl", (40.0, 50.0, 300.0, 260.0)),
            PlanItem("", (200.0, 100.0, 500.0, 400.0)),
        ]
        got = C.check_batched_equals_processor(seg, C.photo(360, 480, seed=4), items, score_tol=1e-5, max_differing_fraction=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    print("batched vs processor:", got)


def test_strict_checkpoint_loading_and_stats_in_the_report(seg, tmp_path, caplog):
    stats = C.check_strict_loading(seg.model, tmp_path, caplog)
    print("load stats:", json.dumps(stats["official"]))
    # Through the segmenter: the stats of the file it loaded end up in its report (masks.json meta).
    path = tmp_path / "sam3.pt"
    torch.save({"model": {f"detector.{k}": v for k, v in C.constant_state(seg.model).items()} | {"tracker.x": torch.zeros(1)}}, path)
    other = S.Sam3Segmenter(SegmenterConfig(sam3_checkpoint=path, dtype="float32"), device="cuda", load_from_hf=False)
    other.load()
    other.segment(C.photo(120, 160), Plan(items=[PlanItem("cup")]))
    report = other.last_report
    assert report["weights"] == f"checkpoint {path}" and report["checkpoint"]["loaded"] == len(seg.model.state_dict())
    assert report["checkpoint"]["ignored_tracker"] == 1 and report["checkpoint"]["layout"] == "detector.*"
    del other
    torch.cuda.empty_cache()


def test_forced_masks_4000x3000_bits_from_the_gpu_equal_the_upsampled_masks(seg):
    """12 phrases, every query passing (confidence 0), 12 masks kept: what the bench times as
    'masks kept'. The bits packed on the GPU and unpacked on the host equal a plain upsample."""
    image = C.photo(3000, 4000, seed=2)
    plan = Plan(items=[PlanItem(p) for p in (PHRASES * 2)[:12]])
    old = (seg.cfg.confidence, seg.cfg.max_masks_per_phrase, seg.cfg.dedup_iou, seg.cfg.dedup_iom, seg.cfg.dtype)
    seg.cfg.confidence, seg.cfg.max_masks_per_phrase, seg.cfg.dedup_iou, seg.cfg.dedup_iom, seg.cfg.dtype = 0.0, 1, 1.01, 1.01, "bfloat16"
    try:
        masks = seg.segment(image, plan)
        report = seg.last_report
        print(f"forced masks: {len(masks)} kept, report {json.dumps(report)}")
        assert report["candidates"] == 12 and len(masks) == 12 - report["empty_masks"] and len(masks) >= 10
        assert all(m.mask.shape == (3000, 4000) and m.mask.dtype == bool for m in masks)
        assert all(m.box_xyxy == mask_box_xyxy(m.mask) for m in masks)  # boxes from the GPU's row/column occupancy
    finally:
        seg.cfg.confidence, seg.cfg.max_masks_per_phrase, seg.cfg.dedup_iou, seg.cfg.dedup_iom, seg.cfg.dtype = old
    logits = torch.randn(5, 288, 288, device="cuda")
    for h, w in ((3000, 4000), (101, 203), (7, 5)):  # H*W a multiple of 8, and not
        packed, boxes = seg.upsample_masks_and_boxes(logits, h, w)
        plain = (torch.nn.functional.interpolate(logits[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0] > 0).cpu().numpy()
        assert len(packed) == 5 and all(np.array_equal(a, b) for a, b in zip(packed, plain, strict=True)), (h, w)
        assert boxes == [mask_box_xyxy(m) if m.any() else None for m in plain], (h, w)
    assert seg.upsample_masks_and_boxes(torch.full((1, 288, 288), -5.0, device="cuda"), 30, 40)[1] == [None]  # empty
