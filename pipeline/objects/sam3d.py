"""The `sam3d` lifter: SAM 3D Objects (facebookresearch/sam-3d-objects) behind the Lifter protocol.

What it adds around upstream's `notebook/inference.py` `Inference`:
- finds the checkout and its checkpoints, downloads the gated checkpoints when missing, from the
  Hub commit that matches the pinned code (resumable, one corrupt file re-downloaded on its own),
  and says clearly what is missing;
- loads the model once per process;
- computes the photo's point map once (the pipeline's own `compute_pointmap`, i.e. MoGe) and
  passes it to every object as `pointmap=`; upstream's notebook recomputes it per object;
- calls the pipeline's `run()` exactly as `Inference.__call__` does, except that the layout
  post-optimization is off (with a given point map the pinned code infers a mirrored camera for
  it) and the decoded formats and sampling steps follow --sam3d-mesh / --sam3d-*-steps;
- converts each output into plain numpy `ObjectGaussians` (activated parameters, object-local
  frame, pose as given by the model); no library object leaves this module;
- one retry after freeing memory when an object fails.

torch, huggingface_hub and the upstream code are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.atomic import write_json_atomic
from pipeline.core.config import LifterConfig
from pipeline.core.errors import BackendError, InputError, MissingDependencyError, PipelineError, describe
from pipeline.core.hub import hf_hub_cache, hf_token, hub_error
from pipeline.core.types import Gaussians, ObjectGaussians, ObjectMask, Pose

HF_REPO_ID = "facebook/sam-3d-objects"
HF_REPO_URL = f"https://huggingface.co/{HF_REPO_ID}"
HF_CHECKPOINT_PREFIX = "checkpoints/"  # the repo keeps every file the pipeline needs under this folder
# The Hub commit whose checkpoints match the pinned code (LifterConfig.sam3d_hf_revision; docs/SAM3D.md).
HF_REVISION: str = {f.name: f.default for f in dataclasses.fields(LifterConfig)}["sam3d_hf_revision"]
DOWNLOAD_RECORD = "sam3dgs_download.json"  # written into checkpoints/<tag>/ by download_checkpoints
SAM3D_ENV = "sam3d-objects"
SETUP_COMMAND = "bash envs/setup.sh sam3d"
SUBMODULE_COMMAND = "git submodule update --init sam-3d-objects"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
FREE_FRACTION = 0.85

# upstream's to_glb turns the mesh from the Gaussians' z-up frame to glTF's y-up with
# v_yup = v_zup @ _ZUP_TO_YUP (row vectors); upstream's layout code undoes it with @ _ZUP_TO_YUP.T.
_ZUP_TO_YUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])

# One loaded model per (config path, compile) in this process.
_MODEL_CACHE: dict[tuple[str, bool], Any] = {}

# What upstream downloads by itself on the first Inference(...), outside the gated repo; an offline
# GPU node needs both in its caches (docs/SAM3D.md, "Offline GPU nodes"; doctor imports these).
# DINOv2: up: sam3d_objects/model/backbone/dit/embedder/dino.py:35-41 torch.hub.load(
# "facebookresearch/dinov2", source="github"): the code unpacks to $TORCH_HOME/hub/<this dir> and
# the weights go to $TORCH_HOME/hub/checkpoints/. The variant is named by the gated pipeline.yaml;
# the file below is the one public SAM 3D Objects setups pre-fetch (about 1.2 GB).
DINOV2_HUB_DIR = "facebookresearch_dinov2_main"
DINOV2_WEIGHTS_FILE = "dinov2_vitl14_reg4_pretrain.pth"
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
# MoGe (the depth model): Ruicheng/moge-vitl's model.pt through huggingface_hub (about 1.3 GB, not gated).
MOGE_REPO_ID = "Ruicheng/moge-vitl"
MOGE_FILE = "model.pt"


def torch_hub_dir() -> Path:
    """torch.hub's folder as torch.hub.get_dir() computes it, without importing torch:
    $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def first_load_downloads() -> list[tuple[str, Path, bool]]:
    """(what, where it is looked for, present) for each file upstream fetches on its first load."""
    dino_code = torch_hub_dir() / DINOV2_HUB_DIR
    dino_weights = torch_hub_dir() / "checkpoints" / DINOV2_WEIGHTS_FILE
    moge = hf_hub_cache() / ("models--" + MOGE_REPO_ID.replace("/", "--")) / "snapshots"
    moge_present = any(p.is_file() for p in moge.glob(f"*/{MOGE_FILE}")) if moge.is_dir() else False
    return [
        ("DINOv2 code (torch.hub, from GitHub)", dino_code, (dino_code / "hubconf.py").is_file()),
        ("DINOv2 weights (torch.hub, from dl.fbaipublicfiles.com)", dino_weights, dino_weights.is_file()),
        (f"MoGe weights ({MOGE_REPO_ID}/{MOGE_FILE}, Hugging Face)", moge, moge_present),
    ]


# ----------------------------------------------------------------------------------------------
# Finding the checkout and its checkpoints


def resolve_checkout(sam3d_root: Path | None) -> Path:
    """The sam-3d-objects checkout: `sam3d_root`, else the submodule at the project root."""
    root = Path(sam3d_root).expanduser() if sam3d_root else PROJECT_ROOT / "sam-3d-objects"
    given = sam3d_root is not None
    if not root.is_dir():
        if given:
            raise InputError(f"--sam3d-root {root} is not a folder.", f"point it at a sam-3d-objects checkout, or run `{SUBMODULE_COMMAND}` and drop the flag.")
        raise MissingDependencyError(f"no sam-3d-objects checkout at {root}.", f"run `{SUBMODULE_COMMAND}` (or pass --sam3d-root / set SAM3D_ROOT).")
    entries = [p.name for p in root.iterdir()]
    if not entries or entries == [".git"]:
        raise MissingDependencyError(f"{root} is an uninitialised git submodule (empty folder).", f"run `{SUBMODULE_COMMAND}`.")
    if not (root / "notebook" / "inference.py").is_file():
        raise InputError(f"{root} is not a sam-3d-objects checkout (no notebook/inference.py).", f"run `{SUBMODULE_COMMAND}` or pass --sam3d-root with the right folder.")
    return root


def checkpoint_dir(root: Path, tag: str) -> Path:
    return Path(root) / "checkpoints" / tag


def _hf_token(token: str | None) -> str | None:
    """An explicit token, else HF_TOKEN or a saved login token (never prompts)."""
    return token or hf_token()


# ----------------------------------------------------------------------------------------------
# Downloading the gated checkpoints


@dataclass
class RemoteFile:
    """One file of the checkpoint repo, with what the Hub says it should be."""

    name: str  # path in the repo, e.g. checkpoints/pipeline.yaml
    size: int | None = None
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob id (sha1 of "blob <size>\0" + content), for small files


def _file_digest(path: Path, algo: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algo)
    h.update(prefix)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_matches(path: Path, remote: RemoteFile) -> str | None:
    """None when `path` has the expected size and checksum, else why not."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"size {size} instead of {remote.size}"
    if remote.sha256:
        digest = _file_digest(path, "sha256")
        if digest != remote.sha256:
            return f"sha256 {digest[:12]}… instead of {remote.sha256[:12]}…"
    elif remote.blob_id:
        digest = _file_digest(path, "sha1", f"blob {size}\0".encode())
        if digest != remote.blob_id:
            return f"git blob id {digest[:12]}… instead of {remote.blob_id[:12]}…"
    return None


class RemoteListing(NamedTuple):
    files: list[RemoteFile]
    commit: str | None  # the Hub commit the listing is of


def list_remote_checkpoints(repo_id: str, token: str | None, endpoint: str | None = None, revision: str | None = HF_REVISION) -> RemoteListing:
    """Files under checkpoints/ in the repo at `revision`, with sizes and checksums (one request)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise hub_error(exc, repo_id) or BackendError(
            f"could not list the files of {repo_id}: {_short_error(exc)}", "check the network (or HF_ENDPOINT) and try again; finished files are kept."
        ) from exc
    files = []
    for s in info.siblings or []:
        if s.rfilename.startswith(HF_CHECKPOINT_PREFIX):
            lfs = s.lfs
            sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
            size = s.size if s.size is not None else ((lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)) if lfs else None)
            files.append(RemoteFile(s.rfilename, size, sha, None if lfs else s.blob_id))
    if not any(f.name == HF_CHECKPOINT_PREFIX + "pipeline.yaml" for f in files):
        raise BackendError(f"{repo_id} has no {HF_CHECKPOINT_PREFIX}pipeline.yaml at {revision}.", "check --sam3d-hf-revision and the repo id.")
    return RemoteListing(files, getattr(info, "sha", None))


def _hub_fetch(repo_id: str, local_dir: Path, token: str | None, endpoint: str | None, revision: str | None) -> Callable[[str, bool], Path]:
    """A fetch(filename, force) -> path that downloads one repo file at `revision` into `local_dir` (resumable)."""

    def fetch(filename: str, force: bool) -> Path:
        from huggingface_hub import hf_hub_download

        kwargs: dict[str, Any] = {"local_dir": str(local_dir), "token": token, "force_download": force, "revision": revision}
        if endpoint:
            kwargs["endpoint"] = endpoint
        return Path(hf_hub_download(repo_id, filename, **kwargs))

    return fetch


def _is_consistency_error(exc: BaseException) -> bool:
    # huggingface_hub's text when the received size differs from the announced one
    # ("Consistency check failed: file should be of size ... Please retry with `force_download=True`.").
    return "Consistency check failed" in str(exc)


def download_checkpoints(
    root: Path,
    tag: str = "hf",
    token: str | None = None,
    *,
    repo_id: str = HF_REPO_ID,
    revision: str = HF_REVISION,
    endpoint: str | None = None,
    fetch: Callable[[str, bool], Path] | None = None,
    remote_files: list[RemoteFile] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Path:
    """Download the gated checkpoints at Hub commit `revision` into `root/checkpoints/<tag>/` and
    return that folder.

    Like upstream's setup doc, the repo's `checkpoints/*` files land in `checkpoints/<tag>/`
    (upstream's doc downloads the repo's `main`; we pin the commit that matches the pinned code).
    Files are fetched one by one into `checkpoints/<tag>-download/` (huggingface_hub resumes
    partial files there), checked against the Hub's size and sha256 / git blob id, then moved into
    place with `pipeline.yaml` last, so its presence means the set is complete. A file that fails
    huggingface_hub's consistency check or our checksum is fetched again with force_download, that
    file only; a second failure is an error.
    `DOWNLOAD_RECORD` in the folder names the repo and commit (for run.json).
    `fetch` and `remote_files` replace the Hub calls (tests); `token` defaults to HF_TOKEN.
    """
    root = Path(root)
    target = checkpoint_dir(root, tag)
    staging = root / "checkpoints" / f"{tag}-download"
    if (target / "pipeline.yaml").is_file():
        return target
    if fetch is None:
        token = _hf_token(token)
        if not token:
            raise PipelineError(
                f"SAM 3D Objects checkpoints are missing ({target / 'pipeline.yaml'}) and no Hugging Face token is set.",
                f"accept the licence on {HF_REPO_URL}, then `export HF_TOKEN=hf_...` and run again (about 13 GB are downloaded once).",
            )
        fetch = _hub_fetch(repo_id, staging, token, endpoint, revision)
    commit: str | None = revision
    if remote_files is None:
        remote_files, commit = list_remote_checkpoints(repo_id, token, endpoint, revision)
        commit = commit or revision
    # pipeline.yaml last: it is what every reader checks for.
    ordered = sorted(remote_files, key=lambda f: (f.name == HF_CHECKPOINT_PREFIX + "pipeline.yaml", f.name))
    target.mkdir(parents=True, exist_ok=True)
    for remote in ordered:
        final = target / remote.name[len(HF_CHECKPOINT_PREFIX):]
        if final.name == "pipeline.yaml" and final.parent == target:
            write_json_atomic(target / DOWNLOAD_RECORD, {"repo_id": repo_id, "revision": revision, "commit": commit})
        if final.is_file() and (remote.size is None or final.stat().st_size == remote.size):
            continue  # moved into place by an earlier, interrupted run
        path = _fetch_verified(fetch, remote, repo_id, log)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
    if staging.is_dir():
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    log(f"SAM 3D Objects checkpoints ready in {target} ({repo_id} at {commit})")
    return target


def checkpoints_origin(ckpt: Path) -> str:
    """Where the checkpoints in `ckpt` came from, for run.json: 'repo@commit' when we downloaded them."""
    try:
        record = json.loads((Path(ckpt) / DOWNLOAD_RECORD).read_text())
        return f"{record['repo_id']}@{record.get('commit') or record['revision']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{HF_REPO_ID}@unknown (found in {ckpt}, not downloaded by sam3d-gs)"


def _fetch_verified(fetch: Callable[[str, bool], Path], remote: RemoteFile, repo_id: str, log: Callable[[str], None]) -> Path:
    """Fetch one file; on a consistency error or checksum mismatch fetch it once more with force."""
    for force in (False, True):
        try:
            path = fetch(remote.name, force)
        except Exception as exc:
            access = hub_error(exc, repo_id) if _hub_installed() else None
            if access is not None:
                raise access from exc
            if _is_consistency_error(exc) and not force:
                log(f"{remote.name}: corrupt download ({_short_error(exc)}); downloading this file again")
                continue
            raise BackendError(
                f"downloading {remote.name} from {repo_id} failed: {_short_error(exc)}",
                "run again: finished files are kept and partial ones resume.",
            ) from exc
        problem = file_matches(path, remote)
        if problem is None:
            return path
        if force:
            raise BackendError(f"{remote.name} from {repo_id} is still corrupt after a fresh download ({problem}).", "check the disk and network, then run again.")
        log(f"{remote.name}: checksum mismatch ({problem}); downloading this file again")
    raise AssertionError("unreachable")


def _hub_installed() -> bool:
    return importlib.util.find_spec("huggingface_hub") is not None


# ----------------------------------------------------------------------------------------------
# GPU checks


def check_gpu_memory(free_bytes: int, total_bytes: int, min_gib: float, device: str = "cuda") -> None:
    """Raise when the GPU has less than `min_gib` in total, or less than 85% of that free now."""
    gib = 1024**3
    if total_bytes < min_gib * gib:
        raise PipelineError(
            f"SAM 3D Objects needs a GPU with about 32 GB; {device} has {total_bytes / gib:.1f} GiB.",
            "use a larger GPU (--device cuda:N picks another one), or the built-in lifter with --lifter inflate.",
        )
    # a 32 GB card with a desktop on it still works: ask for most, not all, of min_gib to be free
    if free_bytes < FREE_FRACTION * min_gib * gib:
        raise PipelineError(
            f"only {free_bytes / gib:.1f} GiB of {total_bytes / gib:.1f} GiB are free on {device}; SAM 3D Objects needs about 32 GB.",
            "stop what holds the GPU (e.g. a vLLM server kept with --keep-server: see nvidia-smi) or pick another GPU with --device cuda:N.",
        )


def _require_gpu(device: str, min_gib: float) -> str:
    """The CUDA device to use; raises the no-GPU / too-little-memory errors.

    `cuda:N` is pinned first (CUDA_VISIBLE_DEVICES, then cuda:0) when nothing in this process has
    started CUDA yet: upstream picks its attention backend from GPU 0's name (up: sam3d_objects/
    pipeline/inference_pipeline.py:11-21) and its layout optimizer defaults to cuda:0 (up:
    inference_utils.py:85-86). Otherwise torch.cuda.set_device covers upstream's bare "cuda" uses.
    """
    from pipeline.core.device import pick_device, pin_cuda_device

    device = pin_cuda_device(device)
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            "torch is not installed in this interpreter.", f"run this stage in the '{SAM3D_ENV}' env (`{SETUP_COMMAND}` creates it)."
        ) from exc
    device = pick_device(device)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise PipelineError(
            f"SAM 3D Objects needs a CUDA GPU (about 32 GB) but {'none is available' if not torch.cuda.is_available() else 'the device is ' + device}.",
            "run on a GPU machine, or use the built-in CPU lifter with --lifter inflate (or --profile lite).",
        )
    index = torch.device(device).index or 0
    torch.cuda.set_device(index)
    free, total = torch.cuda.mem_get_info(index)
    check_gpu_memory(free, total, min_gib, f"cuda:{index}")
    return f"cuda:{index}"


# ----------------------------------------------------------------------------------------------
# Loading upstream


def load_inference_module(checkout: Path) -> Any:
    """Import the checkout's notebook/inference.py (the public entry point) and return the module."""
    checkout = Path(checkout).resolve()
    notebook = checkout / "notebook"
    for p in (str(notebook), str(checkout)):
        if p not in sys.path:
            sys.path.insert(0, p)
    # notebook/inference.py sets CUDA_HOME from CONDA_PREFIX at import (up: L5). The scripts run the
    # env's python by path, so CONDA_PREFIX is unset or names another env (e.g. an auto-activated
    # base): the env that is running is the right value whenever it is a conda env.
    if (Path(sys.prefix) / "conda-meta").is_dir():
        os.environ["CONDA_PREFIX"] = sys.prefix
    else:
        os.environ.setdefault("CONDA_PREFIX", sys.prefix)
    name = "sam3d_notebook_inference_" + hashlib.sha1(str(checkout).encode()).hexdigest()[:10]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, notebook / "inference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError, RuntimeError, AttributeError, ValueError, KeyError) as exc:
        # upstream imports pytorch3d, kaolin, open3d, gradio, ... at import time (up: L8-34): inside
        # a set-up env a failure here is a broken install (e.g. a numpy ABI or CUDA mismatch).
        del sys.modules[name]
        if _sam3d_installed():
            raise MissingDependencyError(
                f"SAM 3D Objects is installed in {sys.prefix} but importing it fails: {_short_error(exc)}",
                f"repair that env (re-run `{SETUP_COMMAND}`; `python -m pipeline doctor` shows the failing import); the traceback is in the log.",
            ) from exc
        what = f"module '{exc.name}' is missing" if isinstance(exc, ImportError) and exc.name else _short_error(exc)
        raise MissingDependencyError(
            f"SAM 3D Objects cannot be imported here: {what} (python: {sys.executable}).",
            f"run this stage in the '{SAM3D_ENV}' conda env (create it with `{SETUP_COMMAND}`).",
        ) from exc
    return module


def _sam3d_installed() -> bool:
    """Whether upstream's package is installed in this interpreter (`pip install -e .` in its env)."""
    try:
        importlib.metadata.distribution("sam3d_objects")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def load_model(checkout: Path, config_path: Path, *, compile: bool = False) -> Any:
    """`Inference(config_path, compile=...)` from the checkout, loaded once per process."""
    key = (str(Path(config_path).resolve()), bool(compile))
    if key not in _MODEL_CACHE:
        module = load_inference_module(checkout)
        _MODEL_CACHE[key] = module.Inference(key[0], compile=bool(compile))
    return _MODEL_CACHE[key]


def unload_models() -> None:
    """Drop the cached models and free their GPU memory (for long-lived processes and tests)."""
    _MODEL_CACHE.clear()
    free_memory()


def free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The lifter


@dataclass
class Sam3dPhotoContext:
    """Per-photo state shared by all its objects."""

    image: np.ndarray  # (H, W, 3) uint8
    pointmap: Any | None  # torch (H, W, 3) float, pytorch3d camera frame; None: the pipeline computes one per object


class Sam3dLifter:
    """SAM 3D Objects as a Lifter. Load once, then prepare(image) per photo and lift() per object."""

    name = "sam3d"

    def __init__(self, cfg: LifterConfig, *, device: str = "auto", allow_cpu: bool = False):
        """Checks the checkout, GPU, install and checkpoints (downloading them if needed), then loads.

        `allow_cpu` skips the GPU checks; only for the contract stand-in in tests.
        """
        self.cfg = cfg
        for flag, steps in (("--sam3d-ss-steps", cfg.sam3d_ss_steps), ("--sam3d-slat-steps", cfg.sam3d_slat_steps)):
            if steps is not None and steps < 1:
                raise InputError(f"{flag} {steps} is not a step count.", "give 1 or more, or leave it out for pipeline.yaml's count (25).")
        self.checkout = resolve_checkout(cfg.sam3d_root)
        self.device = "cpu" if allow_cpu else _require_gpu(device, float(cfg.sam3d_min_gpu_gib))
        self.module = load_inference_module(self.checkout)  # before any download: fail fast in the wrong env
        ckpt = checkpoint_dir(self.checkout, cfg.checkpoint_tag)
        if not (ckpt / "pipeline.yaml").is_file():
            download_checkpoints(self.checkout, cfg.checkpoint_tag, revision=cfg.sam3d_hf_revision)
        self.config_path = ckpt / "pipeline.yaml"
        self.inference = load_model(self.checkout, self.config_path, compile=bool(cfg.sam3d_compile))
        self.pointmap_computations = 0  # depth / point-map passes run for the photos so far
        self.pointmap_method = ""  # how the last photo's point map was obtained (for run.json)
        self.retried: list[str] = []  # objects that failed once and were retried
        self.intrinsics: np.ndarray | None = None  # (3, 3) pixels, fitted to the last photo's point map

    # -- per photo ---------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> Sam3dPhotoContext:
        """Compute the photo's point map once with the pipeline's own depth model (MoGe).

        Uses `InferencePipelinePointMap.compute_pointmap`, the method `run()` calls, with the
        pipeline's mask-based clipping switched off for this call: that clipping depends on the
        object's mask, and `run()` applies it again per object to the map we pass in. Pipelines
        without `compute_pointmap` get no shared map (one computation per object, counted).
        """
        rgb = _as_rgb_uint8(image)
        pipeline = getattr(self.inference, "_pipeline", None)
        self.intrinsics = None
        if pipeline is None or not callable(getattr(pipeline, "compute_pointmap", None)):
            self.pointmap_method = "per-object (pipeline has no compute_pointmap)"
            return Sam3dPhotoContext(rgb, None)
        import torch

        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        clip = getattr(pipeline, "clip_pointmap_beyond_scale", None)
        device_ctx = pipeline.device if isinstance(getattr(pipeline, "device", None), torch.device) else contextlib.nullcontext()
        failed = None
        try:
            pipeline.clip_pointmap_beyond_scale = None
            with torch.no_grad(), device_ctx:
                out = pipeline.compute_pointmap(rgba)
        except Exception as exc:  # e.g. out of memory on a huge photo: each object computes its own instead
            failed = _short_error(exc)
        finally:
            pipeline.clip_pointmap_beyond_scale = clip
        if failed is not None:
            self.release()  # outside the except block, so the failed call's tensors can go
            self.pointmap_method = f"per-object (the shared point map failed: {failed})"
            return Sam3dPhotoContext(rgb, None)
        pointmap = out["pointmap"].permute(1, 2, 0).contiguous()  # (3, H, W) -> (H, W, 3), as run(pointmap=) expects
        self.pointmap_computations += 1
        self.pointmap_method = "once per photo (pipeline.compute_pointmap)"
        # The camera the objects are placed with, so the scene GIF's first frame is the photo's view.
        from pipeline.scene.camera import intrinsics_from_pointmap

        self.intrinsics = intrinsics_from_pointmap(pointmap.float().cpu().numpy(), rgb.shape[1], rgb.shape[0])
        return Sam3dPhotoContext(rgb, pointmap)

    # -- per object --------------------------------------------------------------------------

    def lift(self, context: Sam3dPhotoContext, obj: ObjectMask, *, seed: int) -> ObjectGaussians:
        mask = np.asarray(obj.mask, dtype=bool)
        if mask.shape != context.image.shape[:2]:
            raise InputError(f"mask {obj.id or obj.label} is {mask.shape[1]}x{mask.shape[0]}, the photo {context.image.shape[1]}x{context.image.shape[0]}.", "use masks made for this photo.")
        if not mask.any():
            raise InputError(f"mask {obj.id or obj.label} is empty.", "drop it or segment again.")
        if context.pointmap is None:
            self.pointmap_computations += 1  # the pipeline runs its depth model inside this call
        return output_to_object_gaussians(self.run_upstream(context.image, mask, seed=seed, pointmap=context.pointmap))

    def run_upstream(self, image: np.ndarray, mask: np.ndarray, *, seed: int, pointmap: Any | None) -> dict[str, Any]:
        """What upstream's `Inference.__call__` does (up: notebook/inference.py:101-120 at cf06676):
        the mask into the alpha channel with its own `merge_mask_to_rgba`, then `run()` with the same
        arguments, except:
        - with_layout_postprocess=False: with a given point map the pinned pipeline infers the
          camera from the map in pytorch3d's frame, i.e. with negative focal lengths (up: pm:271,
          282-287), and its post-optimization would render with a mirrored camera (up: pm:396-409);
          on the depth-model path it is skipped anyway (no "intrinsics" key, up: pm:259, 405).
          Upstream's own later revision turns it off in __call__ too (notebook/inference.py @ feef0c86).
        - decode_formats without "mesh" for --no-sam3d-mesh (None: pipeline.yaml's list, as upstream);
        - stage1/stage2_inference_steps from --sam3d-ss-steps/--sam3d-slat-steps (None: pipeline.yaml's).
        """
        pipeline = self.inference._pipeline
        rgba = self.inference.merge_mask_to_rgba(image, mask)
        return pipeline.run(
            rgba,
            None,
            seed,
            stage1_only=False,
            with_mesh_postprocess=False,
            with_texture_baking=False,
            with_layout_postprocess=False,
            use_vertex_color=True,
            stage1_inference_steps=self.cfg.sam3d_ss_steps,
            stage2_inference_steps=self.cfg.sam3d_slat_steps,
            pointmap=pointmap,
            decode_formats=self.decode_formats(),
        )

    def decode_formats(self) -> list[str] | None:
        """None (pipeline.yaml's formats) with the mesh wanted, else those formats without "mesh"
        (up: sam3d_objects/pipeline/inference_pipeline.py:589-615 decodes only what is listed)."""
        if self.cfg.sam3d_mesh:
            return None
        configured = getattr(self.inference._pipeline, "decode_formats", None) or ["gaussian"]
        return [f for f in configured if f != "mesh"]

    def versions(self) -> dict[str, str]:
        """For run.json's versions: the upstream code and the checkpoints that ran."""
        return {
            "sam-3d-objects": _git_head(self.checkout) or f"unknown ({self.checkout})",
            "sam-3d-objects checkpoints": checkpoints_origin(self.config_path.parent),
        }

    def lift_with_retry(self, context: Sam3dPhotoContext, obj: ObjectMask, *, seed: int) -> ObjectGaussians:
        """lift(); on failure free memory and try once more; then a BackendError with the cause.

        Input errors (empty or wrong-size mask) are not retried. Between objects the caller calls
        release() (Stage 2 does after every object, done or failed, outside its except block).
        """
        label = obj.id or obj.label
        try:
            return self.lift(context, obj, seed=seed)
        except InputError:
            raise
        except Exception as first:
            first_cause = _short_error(first)
        # Outside the except block: the failed call's frames (and their tensors) are gone now.
        self.release()
        self.retried.append(label)
        try:
            return self.lift(context, obj, seed=seed)
        except InputError:
            raise
        except Exception as second:
            raise BackendError(
                f"SAM 3D Objects failed on {label} twice: {_short_error(second)} (first try: {first_cause})",
                _fix_for(second),
            ) from second

    def release(self) -> None:
        """Free per-object memory: Python garbage and the CUDA cache."""
        free_memory()


def output_to_object_gaussians(output: dict[str, Any]) -> ObjectGaussians:
    """Upstream's output dict -> ObjectGaussians (numpy, activated, object-local frame + pose).

    Gaussians come from the activated getters (positions mapped through the aabb, exp scales
    with the minimum kernel size, sigmoid opacity, normalized w-first quaternions) and the raw
    DC colour coefficients; the pose from 'rotation' (1, 4), 'translation' (1, 3), 'scale' (1, 3).
    The mesh ('glb', a trimesh mesh in glTF's y-up frame) is turned back into the Gaussians'
    frame, so one pose places both, and exported as binary glTF.
    """
    gaussian_list = output.get("gaussian")
    gs = gaussian_list[0] if gaussian_list else output.get("gs")
    if gs is None:
        raise BackendError("SAM 3D Objects returned no Gaussians ('gaussian'/'gs' missing).", "check the checkpoints' decode_formats include 'gaussian'.")
    xyz = _np(gs.get_xyz)
    n = xyz.shape[0]
    gaussians = Gaussians(
        xyz=xyz.reshape(n, 3),
        features_dc=_np(gs._features_dc).reshape(n, 3),  # (N, 1, 3): degree-0 SH only (sh_degree 0)
        opacity=_np(gs.get_opacity).reshape(n, 1),
        scale=_np(gs.get_scaling).reshape(n, 3),
        rotation=_np(gs.get_rotation).reshape(n, 4),
    )
    q = _np(output["rotation"]).reshape(4).astype(np.float64)
    norm = np.linalg.norm(q)
    pose = Pose(
        rotation=q / norm if norm > 0 else np.array([1.0, 0.0, 0.0, 0.0]),
        translation=_np(output["translation"]).reshape(3),
        scale=_np(output["scale"]).reshape(3),
    )
    return ObjectGaussians(gaussians=gaussians, pose=pose, source="sam3d-objects", mesh_glb=mesh_to_glb_bytes(output.get("glb")))


def mesh_to_glb_bytes(mesh: Any) -> bytes | None:
    """A trimesh mesh from upstream (y-up) -> binary glTF in the Gaussians' local frame, or None."""
    if mesh is None or not hasattr(mesh, "export"):
        return None
    local = mesh.copy()
    transform = np.eye(4)
    transform[:3, :3] = _ZUP_TO_YUP  # column-vector form of v @ _ZUP_TO_YUP.T
    local.apply_transform(transform)
    data = local.export(file_type="glb")
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# Readiness (for `doctor`)


def check_sam3d_ready(cfg: LifterConfig, *, check_gpu: bool = True) -> list[str]:
    """Problems that would stop the sam3d lifter, each with its fix; empty when ready.

    Imports nothing from upstream (no model load); looks at the checkout, checkpoints, token,
    whether sam3d_objects is importable in this interpreter, and the GPU.
    """
    problems: list[str] = []
    checkout: Path | None = None
    try:
        checkout = resolve_checkout(cfg.sam3d_root)
    except PipelineError as exc:
        problems.append(str(exc))
    if checkout is not None:
        ckpt = checkpoint_dir(checkout, cfg.checkpoint_tag)
        if not (ckpt / "pipeline.yaml").is_file():
            if _hf_token(None):
                problems.append(f"SAM 3D Objects checkpoints missing ({ckpt / 'pipeline.yaml'}). Fix: none needed if your token has access: the first sam3d run downloads them (about 13 GB).")
            else:
                problems.append(
                    f"SAM 3D Objects checkpoints missing ({ckpt / 'pipeline.yaml'}) and no HF_TOKEN. Fix: accept the licence on {HF_REPO_URL}, then `export HF_TOKEN=hf_...`."
                )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        for what, path, present in first_load_downloads():
            if not present:
                problems.append(f"{what} is not cached at {path} and HF_HUB_OFFLINE is set: the first model load would download it. Fix: pre-seed TORCH_HOME/HF_HOME (docs/SAM3D.md, 'Offline GPU nodes').")
    if importlib.util.find_spec("sam3d_objects") is None:
        problems.append(f"sam3d_objects is not importable by {sys.executable}. Fix: use the '{SAM3D_ENV}' conda env (`{SETUP_COMMAND}`).")
    if check_gpu:
        try:
            _require_gpu("auto", float(getattr(cfg, "sam3d_min_gpu_gib", 30.0)))
        except PipelineError as exc:
            problems.append(str(exc))
    return problems


# ----------------------------------------------------------------------------------------------
# Small helpers


def _git_head(path: Path) -> str | None:
    """The commit checked out at `path` (a submodule too), or None."""
    if not (Path(path) / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return head if out.returncode == 0 and len(head) == 40 else None


def _np(value: Any) -> np.ndarray:
    """torch tensor (any device, any float dtype) or array -> float32 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(f"the photo has shape {image.shape}, expected (H, W, 3).", "pass an RGB image.")
    if image.dtype != np.uint8:
        raise InputError(f"the photo has dtype {image.dtype}, expected uint8.", "pass 8-bit RGB.")
    return np.ascontiguousarray(image[..., :3])


def _short_error(exc: BaseException) -> str:
    return describe(exc, 240, with_type=True)


def _fix_for(exc: BaseException) -> str:
    if "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
        return "free GPU memory (stop other GPU processes, e.g. a kept vLLM server) or use a smaller photo; the other objects go on."
    return "the error is recorded in run.json; the other objects go on."

