"""The segmenter interface. Backends: `sam3` (SAM3, GPU) and `classical` (built-in, no model)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pipeline.core.types import ObjectMask, Plan


class Segmenter(Protocol):
    name: str

    def segment(self, image: np.ndarray, plan: Plan | None) -> list[ObjectMask]:
        """One mask per object for an RGB uint8 (H, W, 3) photo.

        With a plan, each item's phrase (and box when present) is a prompt; without one (or with
        an empty plan) a segmenter that can, finds the object instances by itself.
        Returned masks have no `id` yet: the masks writer assigns obj_001, obj_002, ...
        """
        ...
