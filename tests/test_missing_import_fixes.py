"""A module the pinned sam3 imports but does not declare (einops, psutil, decord: audits/sam3.md F2)
is named in the error with the pip command that installs it, not only "rerun setup.sh sam3"."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.core.config import SegmenterConfig
from pipeline.core.errors import MissingDependencyError
from pipeline.masks import sam3 as S


@pytest.mark.parametrize(("module", "package"), [("einops", "einops"), ("psutil", "psutil"), ("decord", "decord==0.6.0")])
def test_a_missing_sam3_import_names_its_package(tmp_path: Path, monkeypatch, module: str, package: str):
    pytest.importorskip("torch")
    # A sam3 whose model code stops at an undeclared import, as the pinned one does
    # (up: sam3/sam/rope.py:13 einops, sam3/model/sam3_video_predictor.py:15 psutil,
    # sam3/train/data/sam3_image_dataset.py:18 decord).
    pkg = tmp_path / "sam3"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "sam3_image_processor.py").write_text(f"import {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "sam3" or n.startswith("sam3.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ModuleNotFoundError(name=module)
    try:
        with pytest.raises(MissingDependencyError) as info:
            S.Sam3Segmenter(SegmenterConfig(), device="cpu").load()
    finally:
        # The fake sam3 and sam3.model just imported must not outlive the test (monkeypatch restores
        # only the entries it removed): a later `import sam3.model...` would find this fake.
        for name in [n for n in sys.modules if n == "sam3" or n.startswith("sam3.")]:
            del sys.modules[name]
    text = str(info.value)
    assert f"'{module}'" in text and "'sam3' env" in text
    assert f"`pip install {package}`" in text
