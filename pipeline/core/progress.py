"""Progress bars on long steps: tqdm on stderr, shown only on a terminal (not in logs or CI)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: list[T], enabled: bool, desc: str, unit: str = "obj") -> Iterable[T]:
    if not enabled or not items:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)
