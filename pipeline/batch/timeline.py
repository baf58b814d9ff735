"""Timestamped milestones of a batch ("timeline: ..." lines in ROOT/logs/pipeline.log only): where
its time goes. bench/batch_scaling.py reads them into its start-up breakdown."""

from __future__ import annotations

import logging

_log = logging.getLogger("pipeline.batch.timeline")


def mark(event: str) -> None:
    _log.info("timeline: %s", event)
