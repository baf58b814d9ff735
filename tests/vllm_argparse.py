"""vLLM's own `vllm serve` argument parser, run on this CPU machine from the PyPI wheel's Python source.

`ensure_parser_env()` builds, once, a git-ignored cache folder (outputs/.cache/vllm-argparse-<version>/):
  src/   the wheel's *.py/*.json/*.jinja files (no compiled kernels; the 336 MB wheel is not kept),
  site/  the few small packages the parser's import chain needs, installed with `pip --target --no-deps`.
Nothing goes into .venv: the check runs in a subprocess of .venv's Python with
PYTHONPATH=src:site and VLLM_TARGET_DEVICE=cpu, so it uses .venv's torch (2.13; vLLM wants 2.14, but
the parser only imports torch, it runs no kernel) and .venv's pydantic/openai/huggingface_hub.

`check_argvs([...])` feeds each `vllm serve ...` argv to the real parser, the way
vllm/entrypoints/cli/main.py + cli/serve.py:164-172 build it (a "serve" subparser given to
`make_arg_parser`), then runs the checks vLLM runs before loading the model
(`validate_parsed_serve_args`, cli_args.py:531; the reasoning parser name as in
`validate_api_server_args`, cli_args.py:625-632), and the
`MultiModalConfig` validation of --limit-mm-per-prompt / --mm-processor-kwargs
(config/multimodal.py:301-345, 471-495).

Run as a script (`python tests/vllm_argparse.py --build`) it only builds the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VLLM_VERSION = "0.33.0"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "outputs" / ".cache" / f"vllm-argparse-{VLLM_VERSION}"
# The minimum found by importing vllm.entrypoints.common.cli_args on a CPU with only .venv's
# packages and adding what each ImportError named (versions within vLLM 0.33.0's METADATA pins).
PACKAGES = [
    "regex==2026.11.19",
    "psutil==7.2.2",
    "cbor2==6.3.0",
    "pyzmq==27.3.0",
    "transformers==5.20.2",  # vLLM 0.33 wants >=5.16.1,<5.21
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "aiohttp==3.14.5",
    "multidict==7.2.1",
    "yarl==1.25.1",
    "propcache==0.5.4",
    "aiohappyeyeballs==2.7.1",
    "aiosignal==1.4.0",
    "frozenlist==1.8.0",
    "openai-harmony==0.0.8",
    "cloudpickle==3.1.3",
    "pybase64==1.5.1",
    "cachetools==8.0.2",
    "uvloop==0.23.0",
    "py-cpuinfo==9.0.0",
    "fastapi==0.136.3",  # vLLM 0.33 wants <0.137 (newer fastapi imports opentelemetry)
    "starlette==1.10.0",
    "annotated-doc==0.0.7",
    "prometheus-client==0.26.0",
    "partial-json-parser==0.2.1.1.post7",
    "xgrammar==0.2.8",
    "apache-tvm-ffi==0.1.11",
    "llguidance==1.7.6",  # vLLM 0.33 wants >=1.7,<1.8 (imported while the parser lists KV connectors)
]
KEEP_SUFFIXES = (".py", ".json", ".jinja")


class ParserUnavailable(RuntimeError):
    """The cache could not be built (no network to PyPI, pip failed, ...)."""


def _pip(*args: str, cwd: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=1200)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        raise ParserUnavailable(f"`pip {' '.join(args[:4])} ...` failed: {' | '.join(lines[-3:])[:400]}")


def ensure_parser_env(cache: Path = CACHE) -> Path:
    """The cache folder, built if missing (downloads from PyPI). Raises ParserUnavailable."""
    marker = cache / "READY"
    if marker.exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-argparse-", dir=cache.parent))
    try:
        _pip("download", "--no-deps", "--only-binary=:all:", f"vllm=={VLLM_VERSION}", "-d", str(work / "wheel"))
        wheels = sorted((work / "wheel").glob("vllm-*.whl"))
        if not wheels:
            raise ParserUnavailable(f"pip download gave no vllm=={VLLM_VERSION} wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if name.startswith("vllm/") and name.endswith(KEEP_SUFFIXES):
                    wheel.extract(name, work / "src")
        shutil.rmtree(work / "wheel")
        _pip("install", "--no-deps", "--only-binary=:all:", "--no-compile", "--target", str(work / "site"), *PACKAGES)
        (work / "READY").write_text(f"vllm=={VLLM_VERSION}\n" + "\n".join(PACKAGES) + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        work.rename(cache)  # atomic: a half-built cache is never taken for a ready one
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return cache


def check_argvs(argvs: list[list[str]], cache: Path = CACHE, timeout: float = 900.0) -> list[dict]:
    """Each `[vllm, serve, model, flags...]` argv through vLLM's parser: [{ok, error, values}]."""
    env = dict(os.environ, PYTHONPATH=f"{cache / 'src'}{os.pathsep}{cache / 'site'}", VLLM_TARGET_DEVICE="cpu")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--check"],
        input=json.dumps([argv[1:] for argv in argvs]),  # without argv[0], the executable
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM's parser could not be run (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULTS ") :])


def _check_main() -> int:
    """Inside the subprocess: vLLM's parser on each argv read from stdin."""
    import contextlib
    import io

    from vllm.config.multimodal import MultiModalConfig
    from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.reasoning import ReasoningParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    results = []
    for args in json.loads(sys.stdin.read()):
        top = FlexibleArgumentParser(prog="vllm")
        subparsers = top.add_subparsers(dest="subparser", required=True)
        make_arg_parser(subparsers.add_parser("serve", usage="vllm serve [model_tag] [options]"))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = top.parse_args(args)
            validate_parsed_serve_args(ns)
            # The check of validate_api_server_args (common/cli_args.py:625-632), without its other inputs.
            if ns.reasoning_parser and ns.reasoning_parser not in ReasoningParserManager.list_registered():
                raise KeyError(f"invalid reasoning parser: {ns.reasoning_parser}")
            MultiModalConfig(limit_per_prompt=ns.limit_mm_per_prompt or {}, mm_processor_kwargs=ns.mm_processor_kwargs)
        except SystemExit:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            results.append({"ok": False, "error": lines[-1] if lines else "argparse exited"})
            continue
        except Exception as exc:  # noqa: BLE001 - every rejection is a result
            results.append({"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            continue
        keys = ("model_tag", "host", "port", "served_model_name", "max_model_len", "gpu_memory_utilization",
                "tensor_parallel_size", "limit_mm_per_prompt", "mm_processor_kwargs", "reasoning_parser", "enforce_eager")
        values = {k: getattr(ns, k, None) for k in keys}
        results.append({"ok": True, "error": "", "values": json.loads(json.dumps(values, default=str))})
    print("RESULTS " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(_check_main())
    if sys.argv[1:] == ["--build"]:
        print(ensure_parser_env())
        sys.exit(0)
    print("usage: python tests/vllm_argparse.py --build | --check < argvs.json", file=sys.stderr)
    sys.exit(2)
