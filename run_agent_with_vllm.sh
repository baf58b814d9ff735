#!/usr/bin/env bash
# Stage 1: photo -> plan (vLLM-served Qwen3-VL, started and stopped here unless --vlm-url) -> masks/.
# Runs in the 'sam3' conda env (or the project venv); vLLM runs from the 'vllm' env.
source "$(dirname "$0")/envs/common.sh"
parse_common_args "$@"
if has_flag --help || has_flag -h; then
  if has_flag --images; then
    print_script_help "usage: ./run_agent_with_vllm.sh --images DIR|LIST --out ROOT [options]" batch; exit 0
  fi
  print_script_help "usage: ./run_agent_with_vllm.sh --image PHOTO [--out RUN_DIR] | --images DIR --out ROOT [options]" stage1; exit 0
fi
# Many photos: stage 1 for all of them with one vLLM server (then ./run_sam3d_from_masks.sh --out ROOT).
has_flag --images && run_batch 1
resolve_stage_python sam3
if ! has_flag --vllm-command && ! has_flag --vlm-url && vllm="$(vllm_command_from_conda)"; then
  PASS_ARGS+=(--vllm-command "$vllm")
fi
exec "${STAGE_PY[@]}" -m pipeline stage1 "${PASS_ARGS[@]}"
