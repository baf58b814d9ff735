#!/usr/bin/env bash
# bench/batch_scaling.py on a bare GPU machine that has torch but not Ray, sam3 or gsplat (the
# workplace's device machines): installs what was carried, builds gsplat's CUDA extension once, then
# runs the benchmark. Run from the checkout's root; results go to $OUT (or /tmp/bs_out).
#   carried (bench/pack_device_wheels.sh fills both): .whl/      sam3 0.1.4 and its small deps, open_clip_torch (the BPE vocab) as cp312 wheels
#            .whl-ray/  ray312-core.tar.xz (ray 2.60.0 cp312 unpacked without its Java jars, RLlib,
#                       Tune, Train, Serve, Data, LLM and dashboard UI, none of which the batch uses),
#                       jsonschema, jsonschema-specifications, referencing, rpds-py, gsplat wheels
#   env:     GPUS (default 1,2), PHOTOS (default 32), SIZE (default 1024x768), ENGINE (default ray),
#            WARMUP (photos per GPU of the untimed first batch, default 2), SETUP_ONLY=1 (install and
#            build only, no benchmark)
set -o pipefail
out="${OUT:-/tmp/bs_out}"
mkdir -p "$out"
site=/tmp/site
export PYTHONUNBUFFERED=1
if [ ! -f "$site/.batch-scaling-ready" ]; then
  t0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl .whl-ray/*.whl || exit 3
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .whl-ray/ray312-core.tar.xz "$site" || exit 3
  touch "$site/.batch-scaling-ready"
  echo "installed in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH="$site"
# The machine's torch env comes without .pyc files: each new process compiled about 1,760 modules
# (8.6 s of a SAM3 worker's 13 s start, docs/PERFORMANCE.md). `pip install` writes them, so a user's
# env has them; write them once here too.
if [ ! -f "$site/.pyc-ready" ]; then
  t0=$(date +%s)
  python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "$site" >/dev/null 2>&1
  touch "$site/.pyc-ready"
  echo "bytecode compiled in $(( $(date +%s) - t0 )) s"
fi
python3 -c 'import ray, sam3, gsplat, torch; print("ray", ray.__version__, "| sam3 ok | gsplat", gsplat.__version__, "| torch", torch.__version__, "| GPUs", torch.cuda.device_count())' || exit 3
nvidia-smi -L
# gsplat compiles its CUDA extension on first use (cached in ~/.cache/torch_extensions): once, here,
# not inside the timed runs.
python3 - <<'PY' || exit 4
import time

import torch

t = time.time()
from gsplat import rasterization

n = 64
means = torch.randn(n, 3, device="cuda") + torch.tensor([0, 0, 4.0], device="cuda")
quats = torch.nn.functional.normalize(torch.randn(n, 4, device="cuda"), dim=-1)
scales = torch.full((n, 3), 0.05, device="cuda")
opac = torch.full((n,), 0.8, device="cuda")
cols = torch.rand(n, 3, device="cuda")
K = torch.tensor([[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]], device="cuda")[None]
img, _, _ = rasterization(means, quats, scales, opac, cols, torch.eye(4, device="cuda")[None], K, 64, 64)
torch.cuda.synchronize()
print(f"gsplat ready in {time.time() - t:.0f} s, image {tuple(img.shape)}")
PY
[ -n "$SETUP_ONLY" ] && exit 0  # set up only (e.g. to run the GPU tests first)
timeout "${BENCH_TIMEOUT:-480}" python3 bench/batch_scaling.py --photos "${PHOTOS:-32}" --gpus "${GPUS:-1,2}" --size "${SIZE:-1024x768}" \
  --engine "${ENGINE:-ray}" --warm-up "${WARMUP:-2}" --work /tmp/bs 2>&1 | tee "$out/batch_scaling.log"
rc=$?
cp /tmp/bs/batch_scaling.md /tmp/bs/batch_scaling.json "$out/" 2>/dev/null
for f in /tmp/bs/batch-*.log; do [ -f "$f" ] && tail -c 200000 "$f" > "$out/$(basename "$f")"; done
if [ "$rc" != 0 ]; then  # the workers' and Ray's own logs, for the reason
  { for f in /tmp/bs/out-*/logs/*.log /tmp/ray/session_latest/logs/worker-*.err /tmp/ray/session_latest/logs/raylet.err; do
      [ -s "$f" ] && { echo "== $f"; tail -n 40 "$f"; }
    done; } > "$out/failure_logs.txt" 2>/dev/null
fi
exit $rc
