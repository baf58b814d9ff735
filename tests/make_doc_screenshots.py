"""Refresh docs/report.png and docs/viewer.png from a real run (not collected by pytest).

    .venv/bin/python -m pipeline demo --out /tmp/demo-run
    .venv/bin/python tests/make_doc_screenshots.py /tmp/demo-run

Uses the same headless Chromium set-up as the browser tests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import DOCS, assert_not_blank, chromium_driver, screenshot  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(run_dir: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from pipeline.report.html import write_report

    report = write_report(run_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "view", str(run_dir), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split()[1]  # type: ignore[union-attr]
        with chromium_driver(1280, 1500) as driver:
            driver.get(report.as_uri())
            img = screenshot(driver)
            assert_not_blank(img)
            Image.fromarray(img).save(DOCS / "report.png", optimize=True)
        with chromium_driver(1280, 720) as driver:
            driver.get(url)
            time.sleep(6)  # let the software renderer sort and draw the splats
            driver.execute_script("document.querySelectorAll('.mantine-Notification-closeButton').forEach(b => b.click());")
            time.sleep(1)
            img = screenshot(driver)
            assert_not_blank(img)
            Image.fromarray(img).save(DOCS / "viewer.png", optimize=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    print(f"wrote {DOCS / 'report.png'} and {DOCS / 'viewer.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
