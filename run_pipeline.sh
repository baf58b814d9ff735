#!/usr/bin/env bash
# The one-shot script: stage 1 then stage 2 on one photo, each in its own env.
#   ./run_pipeline.sh --demo              the bundled demo scene on the built-in CPU backends
#   ./run_pipeline.sh --image PHOTO       the full pipeline (see README for the real setup)
#   ./run_pipeline.sh --images DIR --out ROOT   every photo in DIR (or a list file), models loaded once (docs/BATCH.md)
source "$(dirname "$0")/envs/common.sh"
parse_common_args "$@"
if has_flag --help || has_flag -h; then
  if has_flag --images; then
    print_script_help "usage: ./run_pipeline.sh --images DIR|LIST --out ROOT [--engine local|ray] [options]" batch; exit 0
  fi
  print_script_help "usage: ./run_pipeline.sh --demo | --image PHOTO [--out RUN_DIR] | --images DIR --out ROOT [options]" run; exit 0
fi
has_flag --images && run_batch all

if has_flag --demo; then
  args=()
  for a in "${PASS_ARGS[@]}"; do [ "$a" = --demo ] || args+=("$a"); done
  [ "$ENV_MANAGER" = auto ] && ENV_MANAGER=venv
  resolve_stage_python any
  exec "${STAGE_PY[@]}" -m pipeline demo "${args[@]}"
fi

has_flag --image || die "no --image given. Use ./run_pipeline.sh --image PHOTO, or --demo for the bundled scene."
has_flag --out || PASS_ARGS+=(--out "$(default_out)")

manager="$ENV_MANAGER"
if [ "$manager" = auto ]; then
  manager=venv
  if conda="$(find_conda)" && conda_env_prefix "$conda" "$SAM3DGS_ENV_SAM3" >/dev/null \
     && conda_env_prefix "$conda" "$SAM3DGS_ENV_SAM3D" >/dev/null; then manager=conda; fi
fi
if [ "$manager" = conda ]; then
  # Each stage in its own env: stage 1 in 'sam3' (vLLM from 'vllm'), stage 2 in 'sam3d-objects'.
  "$SAM3DGS_ROOT/run_agent_with_vllm.sh" --env-manager conda "${PASS_ARGS[@]}" || exit $?
  exec "$SAM3DGS_ROOT/run_sam3d_from_masks.sh" --env-manager conda "${PASS_ARGS[@]}"
fi
resolve_stage_python any
exec "${STAGE_PY[@]}" -m pipeline run "${PASS_ARGS[@]}"
