"""The planner interface. Backends: `vlm` (any OpenAI-compatible server, e.g. vLLM + Qwen3-VL)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pipeline.core.types import ObjectMask, Plan


class Planner(Protocol):
    name: str

    def plan(self, image: np.ndarray, *, query: str | None = None) -> Plan:
        """Propose what to segment in an RGB uint8 (H, W, 3) photo. `query` switches to query mode."""
        ...

    def verify(self, image: np.ndarray, candidates: list[ObjectMask], query: str) -> list[int]:
        """Query mode: show numbered candidate masks, return the indices that match `query`."""
        ...
