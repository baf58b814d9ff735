"""report.html / index.html without a browser: escaping, missing parts, size, atomic writes; the viewer's scene."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixture import INJECTED, make_run

from pipeline.core.errors import InputError
from pipeline.core.runfolder import RunPaths
from pipeline.report.html import load_run_view, ply_vertex_count, write_index, write_report


def _data_images(page: str) -> list[Image.Image]:
    out = []
    for _mime, payload in re.findall(r'src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', page):
        out.append(Image.open(io.BytesIO(base64.b64decode(payload))))
    return out


def test_model_text_is_escaped_everywhere(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run", n_gaussians=20)
    page = write_report(paths.root).read_text()
    assert INJECTED not in page
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert page.count("&lt;script&gt;document.title") >= 3  # table, card, plan items, reasoning
    assert "lifter failed: &lt;mask too small&gt; &amp; empty" in page
    # Self-contained: no external URL is loaded (links to the run's own files are relative).
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert 'rel="stylesheet"' not in page


def test_table_has_one_row_per_object_with_manifest_fields(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run", n_gaussians=20)
    page = write_report(paths.root).read_text()
    rows = re.findall(r'<tr class="object-row" data-object-id="(obj_\d+)">(.*?)</tr>', page)
    assert [oid for oid, _ in rows] == ["obj_001", "obj_002", "obj_003"]
    assert ">20<" in rows[0][1] and ">done<" in rows[0][1] and "0.50 s" in rows[0][1]
    assert ">failed<" in rows[2][1]
    assert "<details" in page and "Raw answer" in page and "Reasoning" in page
    assert "no CUDA GPU: the built-in inflate lifter" in page


def test_partial_run_says_what_is_missing(tmp_path: Path) -> None:
    full = make_run(tmp_path / "full", n_gaussians=20)
    run = tmp_path / "masks-only"
    shutil.copytree(full.masks_dir, run / "masks")
    view = load_run_view(run)
    assert [o.status for o in view.objects] == ["not run"] * 3
    page = write_report(run).read_text()
    for missing in ("input/image.png", "stage1/plan.json", "scene/scene.gif", "run.json"):
        assert missing in page, missing
    assert 'id="overlay"' in page and 'id="photo"' not in page


def test_unreadable_files_are_reported_not_fatal(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run", n_gaussians=20)
    paths.plan.write_text("{ truncated")
    (paths.object_dir("obj_001") / "turntable.gif").write_bytes(b"GIF89a\x00\x01")
    page = write_report(paths.root).read_text()
    assert "stage1/plan.json could not be read" in page
    assert "No turntable" in page
    assert page.count('class="turntable"') == 1


def test_object_ids_from_files_never_become_paths(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "masks").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    Image.new("L", (4, 4), 255).save(secret)
    entries = [{"id": "../../x", "label": "a", "mask": "../secret.png"}]
    (run / "masks" / "masks.json").write_text(json.dumps({"objects": entries}))
    view = load_run_view(run)
    assert view.objects[0].files == {} and view.objects[0].mask_file is None
    write_report(run)


def test_large_photo_is_downscaled_and_write_is_atomic(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "big")
    paths.input_image.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (2400, 3600, 3), dtype=np.uint8)).save(paths.input_image)
    page = write_report(paths.root).read_text()
    (photo,) = _data_images(page)
    assert max(photo.size) == 1280
    assert len(page) < 3_000_000  # noise is the worst case for JPEG; real photos come out far smaller
    assert not list(paths.root.glob(".tmp-*"))


def test_missing_run_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        write_report(tmp_path / "nope")
    with pytest.raises(InputError):
        write_index(tmp_path / "nope")


def test_index_links_each_run_with_thumbnail_and_count(tmp_path: Path) -> None:
    make_run(tmp_path / "a b&c", n_gaussians=20)
    (tmp_path / "not-a-run").mkdir()
    page = write_index(tmp_path).read_text()
    assert 'href="a%20b%26c/report.html"' in page
    assert "a b&amp;c" in page
    assert 'data-objects="3"' in page
    assert "not-a-run" not in page
    (thumb,) = _data_images(page)
    assert max(thumb.size) <= 240
    assert (tmp_path / "a b&c" / "report.html").exists()


def test_ply_vertex_count_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "x.ply"
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1234\nproperty float x\nend_header\n" + b"\x00" * 16)
    assert ply_vertex_count(path) == 1234
    path.write_bytes(b"not a ply")
    assert ply_vertex_count(path) is None


# --------------------------------------------------------------------------- viewer scene (no browser)


def test_viewer_poses_objects_into_the_camera_frame(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from pipeline.report.viewer import load_scene_objects, splat_arrays

    paths = make_run(tmp_path / "run", n_gaussians=200)
    objects = load_scene_objects(paths.root)
    assert [o.id for o in objects] == ["obj_001", "obj_002"]
    # The fixture puts the red ball 0.55 to the left (+X) and the green box 0.55 to the right, 3 m ahead.
    assert np.allclose(objects[0].center, [0.55, 0.0, 3.0], atol=0.1)
    assert np.allclose(objects[1].center, [-0.55, 0.0, 3.0], atol=0.1)
    arrays = splat_arrays(objects[0].gaussians)
    cov = arrays["covariances"]
    assert cov.shape == (200, 3, 3) and arrays["rgbs"].shape == (200, 3) and arrays["opacities"].shape == (200, 1)
    assert np.allclose(cov, np.swapaxes(cov, 1, 2), atol=1e-7)
    # Local scale 0.12 times pose scale 0.4, isotropic: covariance (0.048)^2 * I.
    assert np.allclose(cov, np.eye(3) * 0.048**2, atol=1e-6)
    assert arrays["rgbs"][:, 0].mean() > 0.7 and arrays["rgbs"][:, 1].mean() < 0.3


def test_viewer_without_objects_is_a_clear_error(tmp_path: Path) -> None:
    from pipeline.report.viewer import view_run

    paths = make_run(tmp_path / "run", n_gaussians=20)
    shutil.rmtree(paths.objects_dir)
    with pytest.raises(InputError, match="No reconstructed objects"):
        view_run(paths.root, port=0, stop_event=threading.Event())


def test_viewer_serves_toggles_and_stops_on_event(tmp_path: Path) -> None:
    pytest.importorskip("viser")
    pytest.importorskip("torch")
    import urllib.request

    from pipeline.report.viewer import start_viewer

    paths = make_run(tmp_path / "run", n_gaussians=50)
    session = start_viewer(paths.root, port=0)
    try:
        assert session.url.startswith("http://127.0.0.1:")
        assert session.server.get_host() == "127.0.0.1"
        assert list(session.toggles) == ["obj_001", "obj_002"]
        with urllib.request.urlopen(session.url, timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read(2000).lower()
        session.toggles["obj_001"].value = False  # what a click in the browser does
        assert session.splats["obj_001"].visible is False
        assert session.splats["obj_002"].visible is True
    finally:
        session.stop()

    stop = threading.Event()
    lines: list[str] = []
    from pipeline.report.viewer import view_run

    thread = threading.Thread(target=view_run, args=(paths.root,), kwargs={"port": 0, "stop_event": stop, "log": lines.append})
    thread.start()
    stop.set()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert lines[0].startswith("Viewer: http://127.0.0.1:") and lines[-1] == "Viewer stopped."


def test_large_gif_is_reencoded_smaller_and_stays_animated(tmp_path: Path) -> None:
    from pipeline.report.html import gif_data_uri

    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)) for _ in range(6)]
    path = tmp_path / "big.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
    size = path.stat().st_size
    uri = gif_data_uri(path, max_bytes=size // 4)
    assert uri is not None and uri.startswith("data:image/gif;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    assert len(data) < size / 2
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 6 and max(im.size) < 300
