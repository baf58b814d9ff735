"""Checks of Sam3Segmenter against upstream SAM3's own code, shared by the CPU tests
(tests/test_sam3_upstream.py, the .venv-sam3 env) and the GPU tests (tests/test_sam3_gpu.py).
Every check takes a loaded segmenter (real model, random weights) and computes what it expects
through upstream's per-phrase path, never through the code under test."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import BackendError
from pipeline.core.types import Plan, PlanItem
from pipeline.masks import sam3 as S


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like image: a smooth background and a few filled discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([120 + 60 * xx / w, 110 + 50 * yy / h, 140 - 40 * xx / w], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h, rng.uniform(0.05, 0.15) * min(h, w)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def processor_outputs(seg: S.Sam3Segmenter, state: dict, phrase: str, box_cxcywh=None) -> dict:
    """One phrase the processor's way, on an image state from `seg.encode_image`: its text alone
    through the text encoder (Sam3Processor.set_text_prompt, sam3_image_processor.py:112-125), a
    box appended to the dummy prompt (add_geometric_prompt, :128-152), forward_grounding with the
    processor's one-query FindStage (:30-38), scores as `_forward_grounding` computes them (:183-196).
    Returns numpy scores (Q,), boxes (Q, 4) normalized cxcywh, and mask logits (Q, 288, 288) on the device."""
    from sam3.model.sam3_image_processor import Sam3Processor

    proc = Sam3Processor(seg.model, device=seg.device, confidence_threshold=0.0)
    with seg._upstream_context(), torch.inference_mode():
        backbone_out = dict(state["backbone_out"])
        backbone_out.update(seg.model.backbone.forward_text([phrase], device=seg.device))
        prompt = seg.model._get_dummy_prompt()
        if box_cxcywh is not None:
            prompt.append_boxes(
                torch.tensor(list(box_cxcywh), device=seg.device, dtype=torch.float32).view(1, 1, 4),
                torch.tensor([True], device=seg.device, dtype=torch.bool).view(1, 1),
            )
        out = seg.model.forward_grounding(backbone_out=backbone_out, find_input=proc.find_stage, geometric_prompt=prompt, find_target=None)
        scores = (out["pred_logits"].sigmoid() * out["presence_logit_dec"].sigmoid().unsqueeze(1)).squeeze(-1)[0]
    return {
        "scores": scores.float().cpu().numpy(),
        "boxes": out["pred_boxes"][0].float().cpu().numpy(),
        "mask_logits": out["pred_masks"][0].float(),
    }


def processor_masks(mask_logits, height: int, width: int) -> np.ndarray:
    """The processor's masks: bilinear to the photo, sigmoid, > 0.5 (sam3_image_processor.py:211-219)."""
    up = F.interpolate(mask_logits[:, None].float(), (height, width), mode="bilinear", align_corners=False).sigmoid()
    return (up[:, 0] > 0.5).cpu().numpy()


def _xyxy_px(cxcywh, width: int, height: int) -> np.ndarray:
    cx, cy, w, h = (float(v) for v in cxcywh)
    return np.array([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])


def _iou_px(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


# ---- batched grounding == the processor's per-phrase path -----------------------------------


def check_batched_equals_processor(
    seg: S.Sam3Segmenter,
    image: np.ndarray,
    items: list[PlanItem],
    score_tol: float,
    max_differing_fraction: float = 0.0,
    state: dict | None = None,
) -> dict:
    """Our batched text encoding + grounding gives the processor's scores for every phrase, and the
    masks of the chosen queries (upsampled by ours) equal the processor's own masks pixel for pixel
    (on the GPU, cuDNN picks other kernels for another batch size, so pixels whose logit is within
    about 1e-3 of 0 may flip: `max_differing_fraction`)."""
    height, width = image.shape[:2]
    phrases, boxes, _ = S._prompts(items, width, height)
    state = state if state is not None else seg.encode_image(image)
    batched = seg.ground_phrases(state, phrases, boxes, lambda i, s, b: [int(q) for q in np.argsort(-s)[:2]])
    worst, differing, total = 0.0, 0, 0
    for i, phrase in enumerate(phrases):
        ref = processor_outputs(seg, state, phrase, boxes[i])
        ours = batched[i]
        assert ours["scores"].shape == ref["scores"].shape == (ref["scores"].shape[0],) and ours["boxes"].shape == ref["boxes"].shape
        worst = max(worst, float(np.abs(ours["scores"] - ref["scores"]).max()))
        assert np.abs(ours["boxes"] - ref["boxes"]).max() < 10 * score_tol, phrase
        q = ours["queries"]
        ours_masks = np.stack(seg.upsample_masks(ours["mask_logits"], height, width))
        ref_masks = processor_masks(ref["mask_logits"][q], height, width)
        differing += int((ours_masks != ref_masks).sum())
        total += ref_masks.size
    assert worst < score_tol, f"max |score difference| {worst:.2e}"
    assert differing <= max_differing_fraction * total, f"{differing} of {total} mask pixels differ"
    return {"max_score_diff": worst, "differing_pixels": differing}


# ---- a box prompt keeps the instance in the box, not the best-scoring one -------------------


def _threshold(scores: np.ndarray) -> float:
    """A confidence that a fifth or more of the queries pass (many "instances"), halfway between two
    scores that are clearly apart, so last-bit differences between two paths cannot flip a query."""
    ranked = np.sort(scores.astype(np.float64))[::-1]
    for k in range(len(ranked) // 5, len(ranked) - 1):
        if ranked[k - 1] - ranked[k] > 1e-5:
            return float((ranked[k - 1] + ranked[k]) / 2)
    raise AssertionError("random-weight scores too close together to set a threshold")


def find_box_case(seg: S.Sam3Segmenter, image: np.ndarray, phrase: str, state: dict | None = None) -> dict:
    """A prompt box for which several queries ("instances") pass the threshold and the top-scoring
    one lies outside the box. Found with upstream's per-phrase path: the box is the predicted box
    of a passing query far from the top scorer; the answer is then checked for that very box."""
    height, width = image.shape[:2]
    state = state if state is not None else seg.encode_image(image)
    start = S.box_xyxy_to_cxcywh_normalized((0.25 * width, 0.25 * height, 0.75 * width, 0.75 * height), width, height)
    first = processor_outputs(seg, state, phrase, start)
    scores = first["scores"]
    confidence = _threshold(scores)
    top = int(np.argmax(scores))
    top_box = _xyxy_px(first["boxes"][top], width, height)
    far = [
        q
        for q in np.argsort(-scores)
        if scores[q] > confidence and q != top and _iou_px(_xyxy_px(first["boxes"][q], width, height), top_box) < 0.1
    ]
    assert far, "no passing query away from the top scorer"
    for q in far[:4]:
        b = np.clip(_xyxy_px(first["boxes"][q], width, height), 0, [width, height, width, height])
        if b[2] - b[0] < 4 or b[3] - b[1] < 4:
            continue
        prompt_px = tuple(float(v) for v in b)
        ref = processor_outputs(seg, state, phrase, S.box_xyxy_to_cxcywh_normalized(prompt_px, width, height))
        s = ref["scores"]
        confidence = _threshold(s)  # the box moves every score (random weights: the presence score)
        passing = [int(p) for p in np.flatnonzero(s > confidence)]
        ious = {p: _iou_px(_xyxy_px(ref["boxes"][p], width, height), np.array(prompt_px)) for p in passing}
        expected = max(passing, key=lambda p: (ious[p], s[p]))
        ref_top = int(np.argmax(s))
        pair = processor_masks(ref["mask_logits"][[expected, ref_top]], height, width)
        distinct = pair[0].any() and not np.array_equal(pair[0], pair[1])
        if len(passing) >= 3 and expected != ref_top and ious[expected] >= 0.3 and ious[ref_top] < ious[expected] and distinct:
            return {"box_xyxy": prompt_px, "confidence": confidence, "expected": expected, "top": ref_top, "ref": ref, "ious": ious}
    raise AssertionError("no prompt box found whose top-scoring query lies outside it")


def check_box_prompt_keeps_the_instance_in_the_box(seg: S.Sam3Segmenter, image: np.ndarray, phrase: str = "chair", state: dict | None = None) -> dict:
    """Returns what it found and the report of the segment() call that kept the instance."""
    height, width = image.shape[:2]
    case = find_box_case(seg, image, phrase, state)
    old = (seg.cfg.confidence, seg.cfg.box_min_iou, seg.min_masks_per_phrase)
    seg.cfg.confidence, seg.cfg.box_min_iou, seg.min_masks_per_phrase = case["confidence"], 0.3, 0
    try:
        masks = seg.segment(image, Plan(items=[PlanItem(phrase, case["box_xyxy"])]))
        report = seg.last_report
        ref_masks = processor_masks(case["ref"]["mask_logits"][[case["expected"], case["top"]]], height, width)
        assert len(masks) == 1, report
        assert np.array_equal(masks[0].mask, ref_masks[0])  # the instance in the box ...
        assert not np.array_equal(masks[0].mask, ref_masks[1])  # ... not the best-scoring one
        assert masks[0].score < float(case["ref"]["scores"][case["top"]])
        assert report["box_misses"] == [] and abs(report["box_iou"][0]["box_iou"] - case["ious"][case["expected"]]) < 0.01
        # Nothing passing overlaps the box enough: a miss, reported, and no mask of another instance.
        seg.cfg.box_min_iou = 1.01  # no box overlaps this much
        assert seg.segment(image, Plan(items=[PlanItem(phrase, case["box_xyxy"])])) == []
        miss = seg.last_report["box_misses"]
        assert len(miss) == 1 and miss[0]["phrase"] == phrase and abs(miss[0]["best_box_iou"] - case["ious"][case["expected"]]) < 0.002
        assert seg.last_report["no_mask"] == [phrase]
    finally:
        seg.cfg.confidence, seg.cfg.box_min_iou, seg.min_masks_per_phrase = old
    return {"passing": len(case["ious"]), "kept_iou": case["ious"][case["expected"]], "top_iou": case["ious"][case["top"]], "report": report}


# ---- strict checkpoint loading ---------------------------------------------------------------


def constant_state(model, value: float = 0.5) -> dict:
    """The model's own keys and shapes, every tensor a broadcast constant: torch.save stores one
    element per tensor, so a full-size "checkpoint" of the 840 M-parameter model is a few hundred KB."""
    out = {}
    for k, v in model.state_dict().items():
        fill = torch.full((), value, dtype=v.dtype) if v.is_floating_point() or v.is_complex() else torch.zeros((), dtype=v.dtype)
        out[k] = fill.expand(v.shape)
    return out


def check_strict_loading(model, tmp_path, caplog) -> dict:
    """Complete files in upstream's layouts load (and report their stats); a partial file, a missing
    key or a size mismatch is a one-line BackendError, before any weight changes. The model's own
    weights are back afterwards (the checks load constant ones into it)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return _strict_loading_checks(model, tmp_path, caplog)
    finally:
        restore(model, saved)


def _strict_loading_checks(model, tmp_path, caplog) -> dict:
    import logging

    state = constant_state(model)
    n = len(state)
    first_param = next(k for k, v in model.state_dict().items() if v.is_floating_point())

    def save(name, obj):
        path = tmp_path / name
        torch.save(obj, path)
        return path

    def refused(path, *words):
        before = model.state_dict()[first_param].clone()
        try:
            S.load_checkpoint_into(model, path)
        except BackendError as exc:
            text = str(exc)
            assert "\n" not in text and all(w in text for w in words), text
            assert torch.equal(model.state_dict()[first_param], before)  # nothing was loaded
            return text
        raise AssertionError(f"{path.name} loaded")

    backbone_only = {f"detector.{k}": v for k, v in state.items() if k.startswith("backbone.")}
    assert 0.5 * n < len(backbone_only) < n  # more than half: the old 50 % rule let it through
    refused(save("backbone_only.pt", backbone_only), f"{len(backbone_only)} of {n}", "sam3.pt")
    one_missing = {f"detector.{k}": v for k, v in list(state.items())[1:]}
    refused(save("one_missing.pt", one_missing), f"{n - 1} of {n}", list(state)[0])
    key = "transformer.decoder.query_embed.weight" if "transformer.decoder.query_embed.weight" in state else first_param
    bad = {f"detector.{k}": v for k, v in state.items()} | {f"detector.{key}": torch.zeros(3, 7)}
    refused(save("mis_sized.pt", bad), key, "shape")

    stats = {}
    official = {f"detector.{k}": v for k, v in state.items()} | {
        "tracker.sam_mask_decoder.conv_s0.weight": torch.zeros(2),
        "detector.backbone.vision_backbone.sam2_convs.0.weight": torch.zeros(2),
    }
    layouts = {
        "official": official,
        "model_wrapped": {"model": official},
        "ddp": {"model": {f"module.{k}": v for k, v in official.items()}},
        "no_prefix": dict(state),
    }
    for name, obj in layouts.items():
        with torch.no_grad():
            model.state_dict()[first_param].fill_(-1.0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.masks.sam3"):
            stats[name] = S.load_checkpoint_into(model, save(f"{name}.pt", obj))
        assert stats[name]["loaded"] == n and stats[name]["missing"] == 0 and stats[name]["unexpected"] == 0, (name, stats[name])
        assert not caplog.records, (name, caplog.text)
        assert bool((model.state_dict()[first_param] == 0.5).all()), name  # really loaded
    assert stats["official"]["ignored_tracker"] == 1 and stats["official"]["ignored_sam2_convs"] == 1
    assert stats["ddp"]["layout"] == "detector.*" and stats["no_prefix"]["layout"] == "image-model keys"

    extra = {f"detector.{k}": v for k, v in state.items()} | {"detector.something.new": torch.zeros(2)}
    with caplog.at_level(logging.WARNING, logger="pipeline.masks.sam3"):
        got = S.load_checkpoint_into(model, save("extra.pt", extra))
    assert got["unexpected"] == 1 and "something.new" in caplog.text
    return stats


def restore(model, saved: dict) -> None:
    with torch.no_grad():
        model.load_state_dict(saved, strict=True)
