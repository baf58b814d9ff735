"""Which backend runs each stage: explicit flags win, then the profile decides.

`--profile full`  vLLM-served VLM planner + SAM3 + SAM 3D Objects (fails clearly if missing)
`--profile lite`  built-in CPU backends (no planner, classical segmenter, inflate lifter)
`--profile auto`  per stage, the full backend when it is usable here, else the built-in one

The choice and the reason for it are printed and recorded in run.json under "backends".
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import LifterConfig, PlannerConfig, RunConfig, SegmenterConfig, VLMServerConfig


@dataclass
class BackendChoice:
    planner: str  # 'vlm' or 'none'
    segmenter: str  # 'sam3' or 'classical'
    lifter: str  # 'sam3d' or 'inflate'
    start_vlm_server: bool = False
    reasons: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        return {
            "planner": self.planner,
            "segmenter": self.segmenter,
            "lifter": self.lifter,
            "vlm_server_started": self.start_vlm_server,
            "reasons": dict(self.reasons),
        }


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def module_available(name: str) -> bool:
    """True when `name` is a real module here. An empty folder (e.g. the uninitialised `sam3/`
    submodule next to the working directory) is a namespace package without an origin: not counted."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def sam3d_root(cfg: LifterConfig) -> Path:
    return Path(cfg.sam3d_root) if cfg.sam3d_root else Path(__file__).resolve().parent.parent / "sam-3d-objects"


def _sam3d_usable(cfg: LifterConfig) -> tuple[bool, str]:
    root = sam3d_root(cfg)
    if not (root / "notebook" / "inference.py").exists():
        return False, f"no sam-3d-objects checkout at {root}"
    if not (root / "checkpoints" / cfg.checkpoint_tag / "pipeline.yaml").exists():
        return False, f"no checkpoints at {root / 'checkpoints' / cfg.checkpoint_tag}"
    if not module_available("sam3d_objects"):
        return False, "sam3d_objects is not importable in this env"
    if not cuda_available():
        return False, "no CUDA GPU"
    return True, "sam-3d-objects checkout, checkpoints and a CUDA GPU are present"


def choose_planner(
    run: RunConfig, planner: PlannerConfig, server: VLMServerConfig, *, has_gpu: Callable[[], bool] | None = None
) -> tuple[str, str]:
    """('vlm' or 'none', why). An explicit --vlm-url is a request to use it, in every profile.
    `has_gpu`: whether a CUDA GPU is there for vLLM (a batch driver counts its engine's GPUs instead
    of asking its own torch; default: cuda_available), asked only when the profile leaves it to the machine."""
    if planner.planner != "auto":
        return planner.planner, "--planner flag"
    if planner.vlm_url:
        return "vlm", f"--vlm-url {planner.vlm_url}"
    if run.profile == "lite":
        return "none", "profile lite: the classical segmenter finds objects itself"
    if run.profile == "full":
        return "vlm", "profile full: start vLLM"
    if shutil.which(server.vllm_command) and (has_gpu or cuda_available)():
        return "vlm", f"'{server.vllm_command}' found and a CUDA GPU is present"
    return "none", f"no --vlm-url, and '{server.vllm_command}' or a CUDA GPU is missing"


def choose_backends(
    run: RunConfig, planner: PlannerConfig, server: VLMServerConfig, seg: SegmenterConfig, lifter: LifterConfig
) -> BackendChoice:
    reasons: dict[str, str] = {}
    profile = run.profile

    plan_name, reasons["planner"] = choose_planner(run, planner, server)
    start_server = plan_name == "vlm" and not planner.vlm_url

    # Segmenter.
    if seg.segmenter != "auto":
        seg_name, reasons["segmenter"] = seg.segmenter, "--segmenter flag"
    elif profile == "lite":
        seg_name, reasons["segmenter"] = "classical", "profile lite"
    elif profile == "full":
        seg_name, reasons["segmenter"] = "sam3", "profile full"
    elif module_available("sam3.model_builder") and cuda_available():
        seg_name, reasons["segmenter"] = "sam3", "sam3 importable and a CUDA GPU is present"
    else:
        seg_name = "classical"
        reasons["segmenter"] = "sam3 not importable here" if not module_available("sam3.model_builder") else "no CUDA GPU"
    if seg_name == "sam3" and plan_name == "none" and not seg.box:
        # SAM3 needs prompts; without a planner or boxes the built-in segmenter finds objects.
        if seg.segmenter == "sam3":
            reasons["segmenter"] += " (no planner: give --box or a VLM)"
        else:
            seg_name, reasons["segmenter"] = "classical", "no planner and no --box prompts for SAM3"

    # Lifter.
    if lifter.lifter != "auto":
        lift_name, reasons["lifter"] = lifter.lifter, "--lifter flag"
    elif profile == "lite":
        lift_name, reasons["lifter"] = "inflate", "profile lite"
    elif profile == "full":
        lift_name, reasons["lifter"] = "sam3d", "profile full"
    else:
        ok, why = _sam3d_usable(lifter)
        lift_name, reasons["lifter"] = ("sam3d", why) if ok else ("inflate", why)
    return BackendChoice(plan_name, seg_name, lift_name, start_server, reasons)
