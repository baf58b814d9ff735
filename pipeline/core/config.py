"""One typed config per stage. The CLI (pipeline/cli.py) is generated from these dataclasses:
every field becomes `--field-name` with its `help` as documentation, so the same flag means the
same thing in every subcommand and in the bash scripts that pass arguments through.

Field metadata keys: help (str), env (environment variable that supplies the default),
flag (override the flag name), action ('append' for repeatable flags), secret (never written
to run.json).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def opt(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A config field with documentation attached (used by the CLI generator)."""
    meta["help"] = help
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Options shared by every stage."""

    image: Path | None = opt(None, "The photo (any format Pillow reads; EXIF rotation applied).")
    out: Path | None = opt(None, "The run folder itself (default: outputs/<image name>-<time>).")
    profile: Literal["auto", "full", "lite"] = opt(
        "auto", "full: vLLM Qwen3-VL + SAM3 + SAM 3D Objects; lite: built-in CPU backends; auto: per stage, what is available."
    )
    force: bool = opt(False, "Redo objects and masks that are already done for the same inputs, and ask the VLM again where stage1/plan.json keeps a plan.")
    seed: int = opt(0, "Random seed for reproducible output.")
    device: str = opt("auto", "Torch device: auto, cuda, cuda:N, mps or cpu (auto: env SAM3DGS_DEVICE if set, else detected).")
    progress: bool = opt(True, "Show progress bars on long steps.")


@dataclass
class PlannerConfig:
    """Stage 1a: the VLM that names the objects to segment."""

    planner: Literal["auto", "vlm", "none"] = opt(
        "auto", "vlm: ask an OpenAI-compatible VLM; none: no planner (the classical segmenter finds objects itself)."
    )
    prompt: str | None = opt(None, "Query mode: only segment what this text asks for, e.g. 'the two mugs left of the laptop'.")
    vlm_url: str | None = opt(None, "Base URL of a running OpenAI-compatible server (…/v1); skips starting vLLM.", env="SAM3DGS_VLM_URL", url=True)
    vlm_model: str = opt("qwen3-vl-8b-thinking", "Model name to request from the server (vLLM's --served-model-name).", env="SAM3DGS_VLM_MODEL")
    vlm_api_key: str | None = opt(None, "API key for the VLM server.", env="SAM3DGS_VLM_API_KEY", secret=True)
    vlm_timeout: float = opt(900.0, "Seconds to wait for one VLM answer (a thinking model may think for minutes).")
    vlm_max_image_side: int = opt(1280, "Longest side, in pixels, of the image sent to the VLM (downscaled inline base64; also caps a started vLLM's image size).")
    max_objects: int = opt(15, "Keep at most this many planned objects.")
    vlm_max_tokens: int = opt(16384, "Most tokens one VLM answer may use, thinking included (sent as max_completion_tokens).")
    vlm_thinking_budget: int | None = opt(None, "vLLM only: tokens the model may think before vLLM closes its <think> (thinking_token_budget), so the JSON answer always fits (default: --vlm-max-tokens minus 2048; -1: none sent).")
    vlm_temperature: float = opt(0.6, "Sampling temperature (Qwen3-VL Thinking's recommended 0.6; 0, greedy decoding, is refused for a thinking model, as Qwen's settings say).")
    vlm_top_p: float = opt(0.95, "Sampling top_p (Qwen3-VL Thinking's recommended 0.95).")
    vlm_top_k: int = opt(20, "vLLM only: sampling top_k (Qwen3-VL Thinking's recommended 20; -1 for none).")
    vlm_presence_penalty: float = opt(0.0, "Sampling presence_penalty (Qwen3-VL Thinking's recommended 0.0).")
    vlm_repetition_penalty: float = opt(1.0, "vLLM only: sampling repetition_penalty (Qwen3-VL Thinking's recommended 1.0).")
    vlm_vllm_fields: Literal["auto", "on", "off"] = opt(
        "auto", "Send vLLM's own request fields (top_k, repetition_penalty, thinking_token_budget): auto = to a vLLM the pipeline started, or to a server whose /v1/models says owned_by 'vllm' (other servers may reject unknown fields)."
    )
    vlm_structured_output: bool = opt(True, "Ask for JSON through response_format=json_schema (per request, plain text when the server's 400 names response_format; off when a started vLLM has no reasoning parser).")


@dataclass
class VLMServerConfig:
    """Starting and stopping vLLM for stage 1 (only when no --vlm-url is given)."""

    vlm_model_id: str = opt("Qwen/Qwen3-VL-8B-Thinking", "Hugging Face model id or local folder that vLLM serves.")
    vllm_command: str = opt("vllm", "Executable that provides `serve` (argv[0]); e.g. a path inside the vllm env.")
    vlm_port: int = opt(0, "Port for vLLM on 127.0.0.1 (0: pick a free one).")
    gpus: str | None = opt(None, "GPU ids for vLLM, e.g. '0' or '0,1' (sets CUDA_VISIBLE_DEVICES).")
    tensor_parallel_size: int = opt(1, "vLLM --tensor-parallel-size.")
    max_model_len: int = opt(32768, "vLLM --max-model-len (prompt + answer; the KV cache for it must fit: 4.5 GiB for Qwen3-VL-8B at 32768).")
    gpu_memory_utilization: float | None = opt(None, "vLLM --gpu-memory-utilization (default by mode: scene 0.88, vLLM stops before SAM3; query, both at once: what the free GPU memory leaves after --sam3-reserve-gib; 0.88/0.6 without nvidia-smi).")
    sam3_reserve_gib: float = opt(10.0, "Query mode and serve-vlm, without --gpu-memory-utilization: GiB of vLLM's GPU left free for SAM3 (3.2 GiB of weights plus grounding).")
    ready_timeout: float = opt(1800.0, "Seconds to wait for vLLM to become ready (first load can be slow).")
    keep_server: bool = opt(False, "Leave vLLM running after stage 1 and print its URL.")
    models_dir: Path | None = opt(None, "Where to download model weights (default: the Hugging Face cache).", env="SAM3DGS_MODELS_DIR")
    reasoning_parser: str = opt("qwen3", "vLLM --reasoning-parser (moves <think> text to a separate field); '' for none.")
    limit_mm_per_prompt: str = opt('{"image": 1, "video": 0}', "vLLM --limit-mm-per-prompt as JSON (one image per request is all the planner sends).")
    vllm_arg: list[str] = opt([], "One more argument passed to `vllm serve` as is (repeatable), e.g. --vllm-arg=--enforce-eager.", action="append")


@dataclass
class SegmenterConfig:
    """Stage 1b: text or box prompts -> one mask per object."""

    segmenter: Literal["auto", "sam3", "classical"] = opt("auto", "sam3: SAM3 (a CUDA GPU, or the CPU with --device cpu, slowly); classical: built-in, no model.")
    box: list[str] = opt([], "A box prompt 'x0,y0,x1,y1[,label]' in pixels (repeatable).", action="append")
    confidence: float = opt(0.5, "SAM3: keep masks whose score is above this (as upstream's processor).")
    dedup_iou: float = opt(0.8, "Masks overlapping an earlier one by this IoU or more are dropped as duplicates.")
    dedup_iom: float = opt(0.3, "SAM3: within one phrase, a mask whose overlap covers more than this fraction of the smaller of it and a better-scoring mask is dropped (a part beside its whole; upstream agent's rule). 1 turns it off.")
    max_masks_per_phrase: int = opt(0, "SAM3: keep at most this many instances of a phrase without a box; 0 keeps every instance above --confidence, as upstream's processor (a phrase with a box keeps one).")
    box_min_iou: float = opt(0.3, "SAM3: for a phrase with a box, the kept instance is the one whose predicted box overlaps the prompt box most; below this box IoU the phrase gets no mask (reported as a box miss).")
    sam3_phrase_batch: int = opt(32, "SAM3: phrases grounded together on the encoded image (halved automatically if the GPU runs out of memory).")
    sam3_checkpoint: Path | None = opt(None, "Local SAM3 checkpoint (default: download facebook/sam3 with HF_TOKEN).")
    sam3_bpe: Path | None = opt(None, "CLIP BPE vocab bpe_simple_vocab_16e6.txt.gz (default: found in sam3 or open_clip).")
    dtype: Literal["bfloat16", "float32"] = opt("bfloat16", "Autocast dtype on CUDA.")


@dataclass
class LifterConfig:
    """Stage 2: photo + mask -> Gaussians with a pose."""

    lifter: Literal["auto", "sam3d", "inflate"] = opt("auto", "sam3d: SAM 3D Objects on GPU; inflate: built-in silhouette inflation.")
    masks: Path | None = opt(None, "Existing masks: a run folder, a folder of 0.png,1.png,... or the reference layout masks/obj_i/<name>/mask_k.png.")
    sam3d_root: Path | None = opt(None, "The sam-3d-objects checkout (default: ./sam-3d-objects).", env="SAM3D_ROOT")
    checkpoint_tag: str = opt("hf", "Checkpoint folder under sam-3d-objects/checkpoints/.")
    sam3d_compile: bool = opt(False, "torch.compile SAM 3D Objects (minutes of warm-up once per process, then faster per object).")
    sam3d_min_gpu_gib: float = opt(30.0, "Refuse to load SAM 3D Objects on a GPU smaller than this many GiB, or with under 85 percent of that free (upstream asks for 32 GB).")
    sam3d_hf_revision: str = opt(
        "2e73555018d2741ccd486e56c24fac41155a1dc6",
        "Commit of the Hugging Face repo facebook/sam-3d-objects to download checkpoints from (the one matching the pinned code; see docs/SAM3D.md).",
    )
    sam3d_mesh: bool = opt(True, "SAM 3D Objects: also decode the mesh (objects/<id>/mesh.glb, scene/scene.glb); --no-sam3d-mesh skips the mesh decoder, Gaussians only, faster.")
    sam3d_ss_steps: int | None = opt(None, "SAM 3D Objects: sampling steps of the sparse-structure generator (upstream's stage1_inference_steps; default: pipeline.yaml's, 25).")
    sam3d_slat_steps: int | None = opt(None, "SAM 3D Objects: sampling steps of the structured-latent generator (upstream's stage2_inference_steps; default: pipeline.yaml's, 25).")
    inflate_gaussians: int = opt(6000, "Gaussians per object for the inflate lifter (front and back together).")


@dataclass
class ExportConfig:
    """Writing .ply, .splat, turntable GIFs and the composed scene."""

    renderer: Literal["auto", "cpu", "gsplat"] = opt("auto", "Turntable renderer: gsplat (CUDA) or the built-in CPU one.")
    turntable: bool = opt(True, "Write turntable GIFs.")
    gif_frames: int = opt(24, "Frames per turntable GIF.")
    gif_size: int = opt(256, "Width and height of object turntable GIFs in pixels (the scene GIF keeps the photo's aspect).")
    scene_gif_size: int = opt(384, "Longer side of the scene GIF in pixels (it keeps the photo's aspect; frame 0 is the photo's view).")
    gif_fps: float = opt(12.0, "Frames per second of the turntable and scene GIFs.")


STAGE_CONFIGS = (RunConfig, PlannerConfig, VLMServerConfig, SegmenterConfig, LifterConfig, ExportConfig)


@dataclass
class BatchConfig:
    """`batch`: a folder (or list) of photos through the stages, models loaded once per worker (docs/BATCH.md).
    --out is the batch root: one run folder per photo under it, plus batch.json and index.html."""

    images: Path | None = opt(None, "A folder of photos (searched recursively; hidden files skipped) or a text file listing one photo path per line.")
    stage: Literal["all", "1", "2"] = opt("all", "Which stages: all, 1 (plan + masks), or 2 (3D objects, for the photos whose stage 1 is done).")
    engine: Literal["local", "ray"] = opt("local", "local: worker processes on this machine; ray: Ray actors on this machine or a cluster (--ray-address).")
    ray_address: str | None = opt(None, "Ray cluster to join, e.g. 'auto' or 'ray://head:10001' (default: start a local Ray).", env="SAM3DGS_RAY_ADDRESS")
    vlm_concurrency: int = opt(8, "VLM requests in flight at once over all stage 1 workers (vLLM batches them).")
    worker_gpus: str | None = opt(None, "Local engine: GPU ids the stage workers share out, e.g. '0,1,2,3' (default: CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists).")
    stage1_workers: int = opt(0, "Stage 1 workers (0: one per GPU, as far as they fit; one on a machine without GPUs).")
    stage2_workers: int = opt(0, "Stage 2 workers (0: one per GPU, one on a machine without GPUs); several per GPU need --stage2-gpus below 1 on Ray.")
    stage1_gpus: float | None = opt(None, "Ray: GPUs per stage 1 worker, fractions allowed (default where the cluster has GPUs: 0.5 beside a node's vLLM actor, else 1; 0 without GPUs).")
    stage2_gpus: float | None = opt(None, "Ray: GPUs per stage 2 worker, fractions allowed, e.g. 0.5 for two SAM 3D workers per 141 GB GPU (default: 1 where the cluster has GPUs, else 0).")
    vlm_gpus: float | None = opt(None, "Ray cluster: GPUs for each node's vLLM server actor (default: 0.5 where the cluster has GPUs, else 0).")
    worker_cpus: float = opt(1.0, "Ray: CPUs reserved per stage worker.")
    pipelined: bool = opt(False, "Run stage 2 on a photo as soon as its stage 1 is done (default: all of stage 1, then stage 2 on every GPU).")
    plan_ahead: bool = opt(True, "Ask the VLM for the first photos' plans in the driver while the stage 1 workers start (local engine, or Ray's own local Ray; docs/BATCH.md).")
    max_attempts: int = opt(3, "Tries per photo when its worker process dies (a crash, out of memory); then the photo is marked failed.")
    retry_failed: bool = opt(False, "Also redo photos that failed or were partial in an earlier batch for the same inputs (crashed ones are always retried).")
    stage1_python: str | None = opt(None, "Interpreter for stage 1 workers (the sam3 env's python; default: this one).", env="SAM3DGS_STAGE1_PYTHON")
    stage2_python: str | None = opt(None, "Interpreter for stage 2 workers (the sam3d-objects env's python; default: this one).", env="SAM3DGS_STAGE2_PYTHON")
    worker_ready_timeout: float = opt(3600.0, "Seconds a stage worker may take to load its models before it counts as failed.")


def env_default(f: dataclasses.Field) -> Any:
    name = f.metadata.get("env")
    if name and os.environ.get(name):
        return os.environ[name]
    return None


def display_url(url: str) -> str:
    """The URL without a user:password part, query or fragment (where keys hide), for messages and records."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def to_record(cfg: Any) -> dict[str, Any]:
    """A config as a JSON-able dict for run.json, with secrets redacted."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("secret") and value:
            value = "<redacted>"
        elif f.metadata.get("url") and value:
            value = display_url(value)
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out
