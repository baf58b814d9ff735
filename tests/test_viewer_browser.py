"""The viser viewer as a user runs it: a separate process, opened in headless Chromium, stopped by Ctrl-C."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from browser import assert_not_blank, chromium_driver, colour_pixels, screenshot
from report_fixture import DONE, make_run

pytestmark = pytest.mark.browser
pytest.importorskip("viser", reason="viser is not installed (pip install viser)")

ROOT = Path(__file__).resolve().parents[1]
VIEW_CODE = "import sys; from pathlib import Path; from pipeline.report.viewer import view_run; view_run(Path(sys.argv[1]), port=0)"

# Object toggles in viser's GUI: a <label for=...> whose text starts with the object id, bound to a checkbox.
TOGGLES_JS = """
return Array.from(document.querySelectorAll('label[for]')).map(l => {
  const input = document.getElementById(l.htmlFor);
  return input && input.type === 'checkbox' ? [l.textContent, input.checked] : null;
}).filter(x => x !== null);
"""
CLICK_TOGGLE_JS = """
const label = Array.from(document.querySelectorAll('label[for]')).find(l => l.textContent.startsWith(arguments[0]));
document.getElementById(label.htmlFor).click();
"""
CLOSE_NOTICES_JS = "document.querySelectorAll('.mantine-Notification-closeButton').forEach(b => b.click());"


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last is not None and (not isinstance(last, list) or last):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def test_viewer_shows_every_object_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run", n_gaussians=800)
    proc = subprocess.Popen(
        [sys.executable, "-c", VIEW_CODE, str(paths.root)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=30)
        assert first.startswith("Viewer: http://127.0.0.1:"), first
        url = first.split()[1]

        with chromium_driver(1280, 720) as driver:
            driver.get(url)
            toggles = _wait_for(
                lambda: [t for t in driver.execute_script(TOGGLES_JS) if t[0].startswith("obj_")],
                20,
                "the object toggles",
            )
            # One toggle per reconstructed object (the failed obj_003 has no Gaussians to show).
            assert [t[0].split()[0] for t in toggles] == list(DONE)
            assert all(checked for _, checked in toggles)
            driver.execute_script(CLOSE_NOTICES_JS)

            # The splats and the photo on the frustum are drawn (software WebGL).
            img = _wait_for(
                lambda: (lambda im: im if colour_pixels(im, "red") > 300 and colour_pixels(im, "green") > 300 else None)(
                    screenshot(driver)
                ),
                20,
                "red and green objects on screen",
            )
            assert_not_blank(img)

            # Hide the frustum: what is left of red and green is the splats alone.
            driver.execute_script(CLICK_TOGGLE_JS, "Camera frustum")
            time.sleep(0.5)
            splats = screenshot(driver)
            red0, green0 = colour_pixels(splats, "red"), colour_pixels(splats, "green")
            assert red0 > 300 and green0 > 300, (red0, green0)

            # Toggling obj_001 (the red ball) off removes the red splats and keeps the green ones.
            driver.execute_script(CLICK_TOGGLE_JS, "obj_001")
            after = _wait_for(
                lambda: (lambda im: im if colour_pixels(im, "red") < 0.1 * red0 else None)(screenshot(driver)),
                10,
                "the red object to disappear",
            )
            assert colour_pixels(after, "green") > 0.5 * green0

        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=15)
        stderr = proc.stderr.read()
        assert rc == 0, stderr
        assert "Traceback" not in stderr, stderr
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert any("Viewer stopped." in line for line in rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
