#!/usr/bin/env bash
# Stage 2: photo + masks (a run folder of ours, a folder of 0.png,1.png,... or the reference
# layout masks/obj_i/<name>/mask_k.png) -> objects/ -> scene/ -> report.html.
# Runs in the 'sam3d-objects' conda env (or the project venv).
source "$(dirname "$0")/envs/common.sh"
parse_common_args "$@"
if has_flag --help || has_flag -h; then
  print_script_help "usage: ./run_sam3d_from_masks.sh [--image PHOTO] [--masks DIR] --out RUN_DIR | --out BATCH_ROOT [options]" stage2; exit 0
fi
# A batch: --images, or --out the root of a batch (it has batch.json): stage 2 for each of its photos.
if has_flag --images || { ! has_flag --image && ! has_flag --masks && [ -f "$(flag_value --out)/batch.json" ]; }; then
  run_batch 2
fi
resolve_stage_python sam3d
exec "${STAGE_PY[@]}" -m pipeline stage2 "${PASS_ARGS[@]}"
