"""What a batch knows is done: stage keys, run.json stage records, photo statuses, batch.json, index.html."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.batch import manifest as M
from pipeline.report.html import write_batch_index, write_index
from pipeline.stages import Configs


def test_stage_keys_change_with_what_the_stage_depends_on_only():
    base = Configs()
    k1, k2 = M.stage_key("stage1", base), M.stage_key("stage2", base)
    c = Configs()
    c.run.progress, c.planner.vlm_timeout, c.lifter.sam3d_compile, c.server.gpu_memory_utilization = False, 5.0, True, 0.3
    assert (M.stage_key("stage1", c), M.stage_key("stage2", c)) == (k1, k2)  # speed and transport settings
    c = Configs()
    c.segmenter.confidence = 0.7
    assert M.stage_key("stage1", c) != k1 and M.stage_key("stage2", c) == k2
    c = Configs()
    c.export.gif_frames = 8
    assert M.stage_key("stage1", c) == k1 and M.stage_key("stage2", c) != k2
    c = Configs()
    c.run.seed = 1
    assert M.stage_key("stage1", c) != k1 and M.stage_key("stage2", c) != k2
    c = Configs()
    c.segmenter.sam3_checkpoint = Path("finetuned.pt")  # other weights, other masks: stage 1 is redone
    assert M.stage_key("stage1", c) != k1 and M.stage_key("stage2", c) == k2


def _run(tmp_path: Path) -> tuple[Path, Path]:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"jpeg bytes")
    run = tmp_path / "run"
    (run / "masks").mkdir(parents=True)
    (run / "masks" / "masks.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"format_version": 1, "objects": {}}))
    return photo, run


def _record(run: Path, photo: Path, stage: str, status: str = "done", final: bool = True) -> None:
    M.record_stage(run, stage, image=str(photo), image_stamp=M.file_stamp(photo), key="K", status=status, error=None if status == "done" else "x",
                   objects=3, seconds=1.0, final=final, masks_stamp=M.file_stamp(run / "masks" / "masks.json") if stage == "stage2" else None)


def test_stage_record_holds_only_for_the_same_inputs(tmp_path: Path):
    photo, run = _run(tmp_path)
    assert M.stage_record(run, "stage1", photo, "K") is None
    _record(run, photo, "stage1")
    _record(run, photo, "stage2")
    data = json.loads((run / "run.json").read_text())
    assert data["objects"] == {} and data["batch"]["stage1"]["objects"] == 3  # merged into run.json, nothing lost
    assert M.stage_record(run, "stage1", photo, "K")["status"] == "done"
    assert M.stage_record(run, "stage1", photo, "other key") is None
    assert M.stage_record(run, "stage2", None, "K") is not None
    # New masks (stage 1 redone): stage 2's record no longer holds.
    st = (run / "masks" / "masks.json").stat()
    os.utime(run / "masks" / "masks.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert M.stage_record(run, "stage2", None, "K") is None
    # The photo file changed: stage 1 is redone.
    photo.write_bytes(b"other jpeg bytes!")
    assert M.stage_record(run, "stage1", photo, "K") is None


def test_stage_record_needs_outputs_and_a_final_result(tmp_path: Path):
    photo, run = _run(tmp_path)
    _record(run, photo, "stage1", status="failed", final=False)  # a crash or server error: retried next time
    assert M.stage_record(run, "stage1", photo, "K") is None
    _record(run, photo, "stage1", status="failed", final=True)  # bad input: stays failed for these inputs
    assert M.stage_record(run, "stage1", photo, "K")["status"] == "failed"
    _record(run, photo, "stage1")
    (run / "masks" / "masks.json").unlink()
    assert M.stage_record(run, "stage1", photo, "K") is None
    (run / "run.json").write_text("{not json")
    assert M.stage_record(run, "stage1", photo, "K") is None


def test_photo_status():
    done, part, fail = {"status": "done"}, {"status": "partial"}, {"status": "failed"}
    both = ["stage1", "stage2"]
    assert M.photo_status(both, {"stage1": done, "stage2": done}) == "done"
    assert M.photo_status(both, {"stage1": done, "stage2": None}) == "pending"
    assert M.photo_status(both, {"stage1": done, "stage2": part}) == "partial"
    assert M.photo_status(both, {"stage1": fail, "stage2": None}) == "failed"
    assert M.photo_status(["stage1"], {"stage1": done}) == "done"


def test_batch_json_is_atomic_and_throttled(tmp_path: Path):
    rows = [M.PhotoRow("/p/a.jpg", "a-jpg-1"), M.PhotoRow("/p/b.jpg", "b-jpg-2")]
    bm = M.BatchManifest(tmp_path, engine="local", config={"run": {}}, versions={"python": "3"}, rows=rows, min_interval=60)
    assert bm.save() is True
    rows[0].status = "done"
    assert bm.save() is False  # within the interval: not rewritten
    assert bm.save(force=True) is True
    data = M.read_batch(tmp_path)
    assert data["engine"] == "local" and data["counts"]["done"] == 1 and data["counts"]["pending"] == 1
    assert data["photos"][0] == {"image": "/p/a.jpg", "run_dir": "a-jpg-1", "status": "done", "error": None, "objects": 0, "seconds": 0.0, "stage": None}
    assert [p.name for p in tmp_path.iterdir()] == ["batch.json"]  # no temporaries left


def test_batch_index_shows_every_photo_with_its_status(tmp_path: Path):
    (tmp_path / "a-jpg-1").mkdir()
    (tmp_path / "a-jpg-1" / "report.html").write_text("<html>")
    photos = [
        {"image": "/p/a.jpg", "run_dir": "a-jpg-1", "status": "done", "error": None, "objects": 4, "seconds": 12.5},
        {"image": "/p/sub dir/<b>.png", "run_dir": "sub_dir/_b_-png-2", "status": "failed", "error": "not an image <x>", "objects": 0, "seconds": 0.1},
        {"image": "/p/c.jpg", "run_dir": "c-jpg-3", "status": "pending", "error": None, "objects": 0, "seconds": 0},
    ]
    page = write_batch_index(tmp_path, photos).read_text()
    assert page.count('<tr class="photo"') == 3
    assert 'href="a-jpg-1/report.html"' in page and 'href="sub_dir/_b_-png-2/"' in page  # no report yet: the folder
    assert 'data-status="failed"' in page and "not an image &lt;x&gt;" in page
    assert "sub dir/&lt;b&gt;.png" in page and "sub dir/<b>.png" not in page  # names are escaped
    assert "1 done" in page and "1 failed" in page and "1 pending" in page
    # `report --index` on a batch root writes the same page from batch.json.
    (tmp_path / "batch.json").write_text(json.dumps({"photos": photos}))
    (tmp_path / "index.html").unlink()
    assert write_index(tmp_path).read_text().count('<tr class="photo"') == 3
