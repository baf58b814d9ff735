"""Planning ahead: while stage 1's workers start (a local Ray's start, SAM3's build), the driver
already asks the VLM for the first photos' plans, so the server works from the moment it is ready.

Runs only until the workers are ready (`finish`), then every plan made travels with its photo to a
worker (the request's "plan" field, docs/BATCH.md), which uses it in place of asking the VLM again
when its key matches (Stage1.plan_ahead / Stage1.process). A photo whose plan failed here is planned
by its worker as usual, so errors are recorded in one place only. At most `concurrency` requests are in
flight here, and none once the workers take over (finish waits for those in flight).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from pipeline.core.errors import describe

_log = logging.getLogger("pipeline.batch.ahead")


class PlanAhead:
    def __init__(self, stage1: Any, photos: list[tuple[int, str]], concurrency: int):
        """`stage1`: a pipeline.stages.Stage1 that reaches the running server; `photos`: (index, path) in order."""
        self.stage1 = stage1
        self.plans: dict[int, dict[str, Any]] = {}
        self.failed = 0
        self._todo = deque(photos)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"plan-ahead-{k}", daemon=True) for k in range(max(0, min(concurrency, len(photos))))]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._todo:
                    return
                i, path = self._todo.popleft()
            try:
                plan = self.stage1.plan_ahead(path)
            except Exception as exc:  # noqa: BLE001 - its worker plans it again and records the error
                with self._lock:
                    self.failed += 1
                _log.info("planning ahead: %s: %s (its worker plans it)", path, describe(exc))
                continue
            with self._lock:
                self.plans[i] = plan

    def abandon(self) -> None:
        """The workers did not start: take no more photos, wait for nothing (the threads are daemons)."""
        self._stop.set()

    def finish(self) -> dict[int, dict[str, Any]]:
        """Take no more photos; wait for the requests in flight; the plans by photo index."""
        self._stop.set()
        for t in self._threads:
            t.join()
        return dict(self.plans)
