"""Hugging Face downloads: the token (never an interactive login) and one mapping of hub errors to
one-line errors with their fix, shared by every model download (Qwen3-VL, SAM3, SAM 3D Objects)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import BackendError, PipelineError


def hf_home() -> Path:
    """huggingface_hub's HF_HOME, computed as its constants.py does (without importing it):
    $HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(os.path.expanduser(home))


def hf_hub_cache() -> Path:
    """huggingface_hub's model cache: $HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    return hf_home() / "hub"


def hf_token() -> str | None:
    """HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), else a token saved by an earlier `hf auth login`
    (where huggingface_hub keeps it: $HF_TOKEN_PATH, else HF_HOME/token); never prompts."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    saved = Path(os.path.expanduser(os.environ.get("HF_TOKEN_PATH") or hf_home() / "token"))
    try:
        return saved.read_text().strip() or None
    except OSError:
        return None


def access_fix(repo_id: str, alternative: str = "") -> str:
    """The fix for a gated or refused repo; `alternative` names a local-file way around it."""
    fix = (
        f"accept the licence on https://huggingface.co/{repo_id} with your account, create a read token at "
        "https://huggingface.co/settings/tokens and `export HF_TOKEN=hf_...` (no interactive login is needed)"
    )
    return fix + (f", or {alternative}." if alternative else ".")


def hub_error(exc: BaseException, repo_id: str, *, alternative: str = "", what: str | None = None) -> PipelineError | None:
    """A one-line error for the hub failures users can act on; None for anything else.

    `alternative` is how to avoid the download (e.g. 'pass --sam3-checkpoint PATH'); `what` names the
    thing downloaded in messages (default: the repo id).
    """
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # huggingface_hub < 0.23 keeps them in utils
        from huggingface_hub import utils as hf_errors  # type: ignore[no-redef]
    what = what or repo_id
    who = "with HF_TOKEN" if hf_token() else "without HF_TOKEN (it is not set)"
    fix = access_fix(repo_id, alternative)
    if isinstance(exc, getattr(hf_errors, "GatedRepoError", ())):
        return BackendError(f"{what} is gated: the request {who} was refused (accept the licence first).", fix)
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
        return BackendError(f"{what} was not found on Hugging Face, or it is private and the request {who} was refused.", fix)
    if isinstance(exc, getattr(hf_errors, "LocalEntryNotFoundError", ())):
        return BackendError(
            f"cannot download {what}: Hugging Face is unreachable and it is not in the cache (no complete copy).",
            "connect to the internet (or unset HF_HUB_OFFLINE)" + (f", or {alternative}." if alternative else "."),
        )
    if isinstance(exc, getattr(hf_errors, "HfHubHTTPError", ())):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return BackendError(f"Hugging Face refused the download of {what} {who} (HTTP {status}).", fix)
        return BackendError(
            f"downloading {what} failed (HTTP {status}: {' '.join(str(exc).split())[:120]}).",
            "run again: finished files are kept and the download resumes" + (f"; or {alternative}." if alternative else "."),
        )
    return None
