"""The lifter interface. Backends: `sam3d` (SAM 3D Objects, GPU) and `inflate` (built-in)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from pipeline.core.types import ObjectGaussians, ObjectMask


class Lifter(Protocol):
    name: str

    def prepare(self, image: np.ndarray) -> Any:
        """Per-photo work shared by all its objects (e.g. the point map); returns an opaque context."""
        ...

    def lift(self, context: Any, obj: ObjectMask, *, seed: int) -> ObjectGaussians:
        """Reconstruct one object: Gaussians in the object-local frame plus the pose in the camera frame."""
        ...

    def release(self) -> None:
        """Free per-object memory (e.g. the CUDA cache) between objects."""
        ...
