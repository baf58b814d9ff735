"""Errors that the CLI turns into one line plus a non-zero exit code.

Library code raises; only `pipeline.cli` prints and exits.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix. `str()` is one line: what is wrong, then the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class InputError(PipelineError):
    """Bad user input: a missing or unreadable photo, masks of the wrong size, no masks."""

    exit_code = 2


class MissingDependencyError(PipelineError, ImportError):
    """An optional package or env is missing; the message names the env and the install command."""

    exit_code = 3


class BackendError(PipelineError):
    """A model backend or server failed (VLM unreachable, server died, weights missing)."""

    exit_code = 4


def missing_dependency(package: str, env: str, install: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"Python package '{package}' is not installed in this interpreter (it belongs to the '{env}' env).",
        f"run `{install}`, or run this stage through its script so it uses the '{env}' env.",
    )


def describe(exc: BaseException, limit: int = 300, *, with_type: bool | None = None) -> str:
    """One line for logs and run.json: 'Type: first line of the message', at most `limit` characters.

    PipelineErrors are already written for users, so by default they keep their text without the
    type; `with_type` forces either way.
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if with_type is None:
        with_type = not isinstance(exc, PipelineError)
    return (f"{type(exc).__name__}: {first}" if with_type else first)[:limit]
