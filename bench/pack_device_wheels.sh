#!/usr/bin/env bash
# Fills the git-ignored folders that bench/device_batch_scaling.sh installs from on a bare GPU
# machine (Python 3.12, torch present, no registry): run here, in the checkout's root, then carry
# .whl and .whl-ray with the device call. Everything comes from PyPI by name (cp312 manylinux wheels).
#   .whl/      sam3 0.1.4 and the small packages it needs beside the machine's torch/timm/numpy
#   .whl-ray/  ray 2.60.0 as ray312-core.tar.xz (the wheel unpacked without ray.data, rllib, llm,
#              serve, train, tune, its Java jars, the dashboard's web client and air's examples, none
#              of which the batch imports: 76 MiB -> 28 MB, under the 64 MiB a call carries), Ray's
#              jsonschema needs, and gsplat (its CUDA extension is built on first use there)
set -euo pipefail
cd "$(dirname "$0")/.."
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
mkdir -p .whl .whl-ray
dl .whl sam3==0.1.4 ftfy==6.3.1 open_clip_torch==3.3.0 pycocotools==2.0.10 wcwidth==0.9.4
python3 -m pip wheel -q --no-deps -w .whl iopath==0.1.10  # pure Python, published as an sdist only
dl .whl-ray gsplat==1.5.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
dl "$tmp" ray==2.60.0
python3 - "$tmp" .whl-ray/ray312-core.tar.xz <<'PY'
import pathlib, sys, tarfile, zipfile
src, dst = pathlib.Path(sys.argv[1]), sys.argv[2]
drop = ("ray/data/", "ray/rllib/", "ray/llm/", "ray/serve/", "ray/train/", "ray/tune/", "ray/jars/", "ray/dashboard/client/", "ray/air/examples/")
wheel = next(src.glob("ray-2.60.0-cp312-*.whl"))
out = src / "unpacked"
with zipfile.ZipFile(wheel) as z:
    z.extractall(out, [n for n in z.namelist() if not n.startswith(drop)])
with tarfile.open(dst, "w:xz") as t:
    t.add(out, arcname=".")
PY
du -sh .whl .whl-ray
