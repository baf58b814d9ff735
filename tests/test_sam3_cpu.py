"""The SAM3 segmenter's model-free parts: query selection (NaN/inf), mask IoU and duplicate removal,
box prompts, BPE vocab resolution, checkpoint loading and the errors a user sees. No GPU, no sam3."""

from __future__ import annotations

import http.server
import importlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import SegmenterConfig
from pipeline.core.errors import BackendError, InputError, MissingDependencyError
from pipeline.core.types import Plan, PlanItem
from pipeline.masks import sam3 as S

ROOT = Path(__file__).resolve().parent.parent


# ---- selection of query slots --------------------------------------------------------------


def test_select_queries_keeps_best_passing_first_and_caps():
    scores = np.array([0.2, 0.9, 0.5, 0.7, 0.49], np.float32)
    keep, nonfinite = S.select_queries(scores, confidence=0.5, max_keep=2)
    assert keep == [1, 3] and nonfinite == 0
    keep, _ = S.select_queries(scores, confidence=0.5, max_keep=10)
    assert keep == [1, 3]  # a score must exceed the threshold, as upstream's `out_probs > threshold`
    keep, _ = S.select_queries(scores, confidence=0.45, max_keep=10)
    assert keep == [1, 3, 2, 4]


def test_select_queries_without_cap_keeps_every_passing_query_like_the_processor():
    scores = np.linspace(0.0, 1.0, 200)  # queries 100..199 are above 0.5
    keep, _ = S.select_queries(scores, confidence=0.5, max_keep=0)
    assert keep == list(range(199, 99, -1))
    assert SegmenterConfig().max_masks_per_phrase == 0  # the default keeps them all (F7)


def test_select_queries_nan_and_inf_never_pass():
    scores = np.array([np.nan, np.inf, 0.8, -np.inf, np.nan], np.float32)
    keep, nonfinite = S.select_queries(scores, confidence=0.5, max_keep=5)
    assert keep == [2] and nonfinite == 4
    keep, nonfinite = S.select_queries(np.full(200, np.nan, np.float32), confidence=0.0, max_keep=3)
    assert keep == [] and nonfinite == 200


def test_select_queries_min_keep_tops_up_with_finite_scores_only():
    scores = np.array([0.1, np.nan, 0.3, 0.05], np.float32)
    keep, _ = S.select_queries(scores, confidence=0.5, max_keep=3, min_keep=2)
    assert keep == [2, 0]
    keep, _ = S.select_queries(np.array([np.nan, 0.2]), confidence=0.5, max_keep=3, min_keep=5)
    assert keep == [1]


# ---- IoU and duplicates --------------------------------------------------------------------


def _square(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_matrix_known_values_and_empty_masks():
    a = _square(20, 20, 0, 0, 10, 10)  # area 100
    b = _square(20, 20, 5, 0, 15, 10)  # area 100, overlap 50 -> IoU 50/150
    empty = np.zeros((20, 20), bool)
    iou = S.mask_iou_matrix(np.stack([a, b, empty, empty]))
    assert iou.shape == (4, 4)
    assert iou[0, 0] == 1.0 and iou[0, 1] == pytest.approx(1 / 3)
    assert iou[2, 3] == 0.0 and iou[2, 2] == 0.0 and iou[0, 2] == 0.0
    assert np.allclose(iou, iou.T)
    assert S.mask_iou_matrix(np.zeros((0, 5, 5), bool)).shape == (0, 0)


def test_dedup_keeps_the_higher_score_of_overlapping_masks_across_phrases():
    big = _square(40, 40, 0, 0, 20, 20)
    nearly_big = _square(40, 40, 0, 0, 20, 19)  # IoU 0.95 with big
    other = _square(40, 40, 25, 25, 35, 35)
    masks = np.stack([big, nearly_big, other])
    iou = S.mask_iou_matrix(masks)
    assert S.dedup_by_iou(iou, np.array([0.6, 0.9, 0.7]), 0.8) == [1, 2]
    assert S.dedup_by_iou(iou, np.array([0.9, 0.6, 0.7]), 0.8) == [0, 2]
    assert S.dedup_by_iou(iou, np.array([0.9, 0.6, 0.7]), 0.99) == [0, 1, 2]  # below the bar: both kept


def test_dedup_threshold_is_inclusive_and_nan_scores_rank_last():
    iou = np.array([[1.0, 0.8], [0.8, 1.0]])
    assert S.dedup_by_iou(iou, np.array([0.5, 0.6]), 0.8) == [1]  # IoU == threshold is a duplicate
    assert S.dedup_by_iou(iou, np.array([np.nan, 0.1]), 0.8) == [1]  # a NaN score never wins
    assert S.dedup_by_iou(np.zeros((0, 0)), np.zeros(0), 0.8) == []


def test_box_query_is_the_passing_instance_overlapping_the_prompt_box_not_the_top_score():
    # Four instances of one concept pass; the best-scoring one (query 0) lies outside the box.
    pred = np.array([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.72, 0.7, 0.3, 0.3], [0.5, 0.5, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])
    scores = np.array([0.95, 0.80, 0.70, 0.60, 0.40])  # query 4 sits exactly in the box but does not pass
    q, iou, nonfinite = S.select_box_query(scores, pred, (0.7, 0.7, 0.2, 0.2), confidence=0.5, min_iou=0.3)
    assert q == 1 and iou == pytest.approx(1.0) and nonfinite == 0
    # Equal overlap: the higher score wins.
    q, _, _ = S.select_box_query(np.array([0.6, 0.9]), pred[[1, 1]], (0.7, 0.7, 0.2, 0.2), confidence=0.5, min_iou=0.3)
    assert q == 1
    # The concept is found, but nothing in the box: a miss, never the top-scoring instance elsewhere.
    q, iou, _ = S.select_box_query(scores, pred, (0.2, 0.8, 0.1, 0.1), confidence=0.5, min_iou=0.3)
    assert q is None and iou < 0.3
    q, _, nonfinite = S.select_box_query(np.array([np.nan, 0.2]), pred[:2], (0.7, 0.7, 0.2, 0.2), confidence=0.5, min_iou=0.3)
    assert q is None and nonfinite == 1
    q, _, _ = S.select_box_query(np.array([np.nan, 0.2]), pred[:2], (0.7, 0.7, 0.2, 0.2), confidence=0.5, min_iou=0.3, min_keep=1)
    assert q == 1  # the random-weights knob lets finite queries below the threshold compete


def test_box_iou_cxcywh_known_values():
    boxes = np.array([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]])
    assert S.box_iou_cxcywh(boxes, (0.5, 0.5, 0.2, 0.2)) == pytest.approx([1.0, 1 / 3, 0.0, 0.0])


def test_dedup_masks_drops_a_part_beside_its_whole_within_a_phrase_only():
    whole = _square(40, 40, 0, 0, 30, 30)  # area 900
    part = _square(40, 40, 5, 5, 15, 15)  # area 100, inside: IoU 0.11, intersection over the smaller 1.0
    masks = np.stack([whole, part]).reshape(2, -1).astype(np.float64)
    inter = masks @ masks.T
    kept, dropped = S.dedup_masks(inter, np.array([0.9, 0.8]), [0, 0], iou_threshold=0.8, iom_threshold=0.3)
    assert kept == [0] and dropped == {1: "iom"}  # upstream agent: IoM > 0.3 within a phrase
    kept, dropped = S.dedup_masks(inter, np.array([0.9, 0.8]), [0, 1], iou_threshold=0.8, iom_threshold=0.3)
    assert kept == [0, 1] and dropped == {}  # "laptop" and "laptop screen" are both asked for
    # Exactly 0.3 is kept (upstream drops only "> iom_thresh"); the better score stays either way.
    a, b = _square(40, 40, 0, 0, 10, 10), _square(40, 40, 7, 0, 17, 10)  # overlap 30 of 100
    flat = np.stack([a, b]).reshape(2, -1).astype(np.float64)
    assert S.dedup_masks(flat @ flat.T, np.array([0.5, 0.6]), [0, 0], 0.8, 0.3)[0] == [0, 1]
    assert S.dedup_masks(flat @ flat.T, np.array([0.5, 0.6]), [0, 0], 0.8, 0.29)[0] == [1]


def test_iou_from_intersections_matches_the_mask_formula():
    rng = np.random.default_rng(1)
    masks = rng.random((5, 16, 16)) > 0.6
    flat = masks.reshape(5, -1).astype(np.float32)
    assert np.allclose(S.iou_from_intersections(flat @ flat.T), S.mask_iou_matrix(masks))
    i, j = 1, 3
    expected = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
    assert S.mask_iou_matrix(masks)[i, j] == pytest.approx(expected)


# ---- prompts -------------------------------------------------------------------------------


def test_box_prompt_is_normalized_cxcywh_and_clamped():
    assert S.box_xyxy_to_cxcywh_normalized((100, 50, 300, 150), 400, 200) == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert S.box_xyxy_to_cxcywh_normalized((-50, 0, 200, 200), 400, 200) == pytest.approx((0.25, 0.5, 0.5, 1.0))
    assert S.box_xyxy_to_cxcywh_normalized((500, 0, 600, 100), 400, 200) is None
    assert S.box_xyxy_to_cxcywh_normalized((10, 10, 10, 50), 400, 200) is None


def test_unlabelled_box_flag_sends_visual_to_sam3_and_keeps_object_as_the_label():
    from pipeline.stages import parse_box_flags

    items = parse_box_flags(["10,10,60,60", "0,0,40,40,red mug"], 100, 100)
    phrases, boxes, _ = S._prompts(items, 100, 100)
    assert phrases == ["visual", "red mug"]  # upstream's box-only text, not the concept "object"
    assert all(b is not None for b in boxes)


def test_prompts_use_visual_text_for_box_only_items_and_warn_on_empty_boxes():
    items = [PlanItem("red mug"), PlanItem("", (0, 0, 50, 50)), PlanItem("table", (900, 900, 950, 950))]
    phrases, boxes, warnings = S._prompts(items, 100, 100)
    assert phrases == ["red mug", S.BOX_ONLY_TEXT, "table"]
    assert boxes[0] is None and boxes[1] == pytest.approx((0.25, 0.25, 0.5, 0.5)) and boxes[2] is None
    assert len(warnings) == 1 and "table" in warnings[0]


def test_iou_size_keeps_aspect_and_caps_the_long_side():
    assert S.iou_size(3000, 4000) == (768, 1024)
    assert S.iou_size(480, 640) == (480, 640)


# ---- BPE vocab resolution ------------------------------------------------------------------


@pytest.fixture
def isolated_packages(tmp_path, monkeypatch):
    """sys.path holding only tmp_path, so find_spec sees the fake sam3/open_clip made there."""
    for name in ("sam3", "open_clip"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    importlib.invalidate_caches()
    yield tmp_path
    importlib.invalidate_caches()


def _write_gz(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x1f\x8b fake vocab")
    return path


def test_bpe_explicit_path_wins_and_a_missing_one_is_an_input_error(tmp_path):
    vocab = _write_gz(tmp_path / "v.txt.gz")
    assert S.resolve_bpe_path(vocab) == vocab
    with pytest.raises(InputError, match="--sam3-bpe"):
        S.resolve_bpe_path(tmp_path / "nope.txt.gz")


def test_bpe_found_in_open_clip_when_sam3_wheel_lacks_it(isolated_packages):
    (isolated_packages / "sam3").mkdir()
    (isolated_packages / "sam3" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (isolated_packages / "open_clip").mkdir()
    (isolated_packages / "open_clip" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    vocab = _write_gz(isolated_packages / "open_clip" / S.BPE_FILENAME)
    assert S.resolve_bpe_path() == vocab
    assert "open_clip" not in sys.modules and "sam3" not in sys.modules


def test_bpe_prefers_sam3_assets_over_open_clip(isolated_packages):
    (isolated_packages / "open_clip").mkdir()
    (isolated_packages / "open_clip" / "__init__.py").write_text("")
    _write_gz(isolated_packages / "open_clip" / S.BPE_FILENAME)
    (isolated_packages / "sam3").mkdir()
    (isolated_packages / "sam3" / "__init__.py").write_text("")
    # A git checkout of facebookresearch/sam3 keeps assets/ beside the package folder.
    sibling = _write_gz(isolated_packages / "assets" / S.BPE_FILENAME)
    assert S.resolve_bpe_path() == sibling
    inside = _write_gz(isolated_packages / "sam3" / "assets" / S.BPE_FILENAME)
    assert S.resolve_bpe_path() == inside


def test_bpe_missing_everywhere_names_the_wheel_gap_and_both_fixes(isolated_packages):
    (isolated_packages / "sam3").mkdir()  # an empty submodule folder: a namespace package, no assets
    with pytest.raises(MissingDependencyError) as info:
        S.resolve_bpe_path()
    text = str(info.value)
    assert "0.1.4 wheel" in text and "pip install open_clip_torch" in text and "--sam3-bpe" in text


# ---- errors before any model is built ------------------------------------------------------


def test_missing_sam3_package_names_the_env_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam3", None)  # makes `import sam3...` raise ImportError
    seg = S.Sam3Segmenter(SegmenterConfig(), device="cpu")
    with pytest.raises(MissingDependencyError) as info:
        seg.load()
    text = str(info.value)
    assert "'sam3'" in text and "envs/setup.sh sam3" in text and "pip install sam3==0.1.4" in text
    assert info.value.exit_code == 3 and seg.model is None


def test_empty_plan_is_an_input_error_without_loading_anything():
    seg = S.Sam3Segmenter(SegmenterConfig())
    with pytest.raises(InputError, match="--box"):
        seg.segment(np.zeros((8, 8, 3), np.uint8), Plan(items=[]))
    with pytest.raises(InputError):
        seg.segment(np.zeros((8, 8, 3), np.uint8), None)
    assert seg.model is None


def test_module_import_stays_light():
    code = "import sys, pipeline.masks.sam3; bad = [m for m in ('torch', 'sam3', 'huggingface_hub', 'open_clip') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- checkpoint loading and download errors ------------------------------------------------


def test_load_checkpoint_into_maps_detector_keys_and_rejects_foreign_files(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ckpt = {"model": {f"detector.{k}": v for k, v in source.state_dict().items()} | {"tracker.x": torch.zeros(1)}}
    good = tmp_path / "sam3.pt"
    torch.save(ckpt, good)
    stats = S.load_checkpoint_into(model, good)
    assert stats["loaded"] == 4 and stats["missing"] == 0
    assert torch.equal(model[1].weight, source[1].weight)

    foreign = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(BackendError, match="0 of 4"):
        S.load_checkpoint_into(model, foreign)

    partial = tmp_path / "partial.pt"  # 2 of 4 keys: the old 50 % rule loaded it with a warning
    torch.save({f"detector.{k}": v for k, v in source.state_dict().items() if k.startswith("0.")}, partial)
    with pytest.raises(BackendError, match="2 of 4.*missing e.g. 1.weight"):
        S.load_checkpoint_into(model, partial)

    mis_sized = tmp_path / "mis_sized.pt"  # was an uncaught RuntimeError from load_state_dict
    torch.save({f"detector.{k}": v for k, v in source.state_dict().items()} | {"detector.1.bias": torch.zeros(3)}, mis_sized)
    with pytest.raises(BackendError, match=r"1.bias: \(3,\) in the file, \(2,\) in the model"):
        S.load_checkpoint_into(model, mis_sized)

    for name, obj in {
        "ddp": {"model": {f"module.detector.{k}": v for k, v in source.state_dict().items()}},
        "no_prefix": dict(source.state_dict()),
    }.items():  # layouts of upstream's training code (DDP) and of a saved image model: upstream #606
        torch.nn.init.zeros_(model[1].weight)
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        assert S.load_checkpoint_into(model, path)["loaded"] == 4, name
        assert torch.equal(model[1].weight, source[1].weight), name

    pickled = tmp_path / "pickle.pt"
    torch.save({"detector.0.weight": object()}, pickled)  # not loadable with weights_only=True
    with pytest.raises(BackendError, match="could not read"):
        S.load_checkpoint_into(model, pickled)


def test_make_random_weights_finite_redraws_uninitialised_params_but_not_buffers():
    torch = pytest.importorskip("torch")

    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.positional_embedding = torch.nn.Parameter(torch.full((4, 3), float("nan")))
            self.proj = torch.nn.Parameter(torch.full((2,), 1e30))
            self.ok = torch.nn.Parameter(torch.ones(2))
            self.register_buffer("attn_mask", torch.full((2, 2), float("-inf")))

    m = Text()
    fixed = S.make_random_weights_finite(m)
    assert set(fixed) == {"positional_embedding", "proj"}
    assert torch.isfinite(m.positional_embedding).all() and m.proj.abs().max() < 1
    assert torch.equal(m.ok, torch.ones(2)) and torch.isinf(m.attn_mask).all()


class _HubStandIn(http.server.BaseHTTPRequestHandler):
    """Answers like huggingface.co does for a gated repo the token may not read."""

    status = 403
    error_code = "GatedRepo"

    def _refuse(self):
        self.send_response(self.status)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "Access to model facebook/sam3 is restricted.")
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "Access to model facebook/sam3 is restricted."}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    pytest.importorskip("huggingface_hub")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_without_access")
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_gated_checkpoint_download_says_how_to_get_access(hub, tmp_path):
    with pytest.raises(BackendError) as info:
        S.download_sam3_checkpoint(cache_dir=tmp_path / "cache", endpoint=hub)
    text = str(info.value)
    assert "gated" in text and "HF_TOKEN" in text and "--sam3-checkpoint" in text
    assert "hf_test_token" not in text  # the token itself is never printed


def test_offline_hub_without_cache_is_a_backend_error(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 or no network gives
    with pytest.raises(BackendError, match="not in the cache.*--sam3-checkpoint"):
        S.download_sam3_checkpoint(cache_dir=tmp_path / "cache")
