"""report.html and index.html opened in headless Chromium from file:// with no network access needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from browser import assert_not_blank, chromium_driver, colour_pixels, screenshot
from report_fixture import make_run

from pipeline.report.html import write_index, write_report

pytestmark = pytest.mark.browser

ALL_IMAGES_LOADED_JS = """
const imgs = Array.from(document.images);
return imgs.map(i => [i.id || i.className || i.alt, i.complete && i.naturalWidth > 0, i.src.slice(0, 5)]);
"""


def test_report_renders_every_object_offline(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "outputs" / "demo-run", n_gaussians=50)
    report = write_report(paths.root)
    # A second run without stage 2 (no objects/, no scene/) for the index page.
    partial = tmp_path / "outputs" / "partial-run"
    shutil.copytree(paths.root / "input", partial / "input")
    shutil.copytree(paths.root / "masks", partial / "masks")
    index = write_index(tmp_path / "outputs")

    with chromium_driver(1280, 1800) as driver:
        driver.get(report.as_uri())
        # No injected script ran: the title is ours and the injected <img src=x> does not exist.
        assert driver.title == "sam3d-gs · demo-run"
        rows = driver.find_elements("css selector", "#objects-table tbody tr.object-row")
        assert [r.get_attribute("data-object-id") for r in rows] == ["obj_001", "obj_002", "obj_003"]
        statuses = [r.find_element("css selector", "td.status").text for r in rows]
        assert statuses == ["done", "done", "failed"]
        assert "pwned" in rows[1].text  # the label is shown as text, not executed

        img = screenshot(driver)
        assert_not_blank(img)
        assert colour_pixels(img, "red") > 200 and colour_pixels(img, "green") > 200

        images = driver.execute_script(ALL_IMAGES_LOADED_JS)
        assert images, "no images on the page"
        assert all(src == "data:" for _, _, src in images), images  # self-contained
        assert all(ok for _, ok, _ in images), [name for name, ok, _ in images if not ok]
        assert len(driver.find_elements("css selector", "img.turntable")) == 2
        assert driver.find_elements("css selector", "#photo") and driver.find_elements("css selector", "#overlay")
        assert driver.find_elements("css selector", "#scene-gif")

        # The planner's answers are folded and hold the model text verbatim (escaped).
        raw = driver.find_element("css selector", "details#plan-raw-response")
        assert raw.get_attribute("open") is None
        raw.find_element("css selector", "summary").click()
        assert "<prompt_list>" in raw.find_element("css selector", "pre").text

        driver.get(index.as_uri())
        tiles = driver.find_elements("css selector", "a.run")
        assert sorted(t.find_element("css selector", ".name").text for t in tiles) == ["demo-run", "partial-run"]
        counts = {t.find_element("css selector", ".name").text: t.get_attribute("data-objects") for t in tiles}
        assert counts == {"demo-run": "3", "partial-run": "3"}
        assert (partial / "report.html").exists()  # the index made the missing report, so no link is dead
        assert_not_blank(screenshot(driver))
        href = next(t for t in tiles if "partial-run" in t.text).get_attribute("href")
        driver.get(href)
        assert driver.title == "sam3d-gs · partial-run"
        assert "scene/scene.gif" in driver.find_element("css selector", "#missing").text
