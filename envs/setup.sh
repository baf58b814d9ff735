#!/usr/bin/env bash
# Create the conda envs of the full profile and install this project into each.
#   bash envs/setup.sh [all|vllm|sam3|sam3d|lite]
# Needs conda (or mamba) and, for sam3d, a CUDA GPU machine (pytorch3d builds against it).
# Gated weights are downloaded later, on first use, with HF_TOKEN (no interactive login).
source "$(dirname "$0")/common.sh"
what="${1:-all}"
cd "$SAM3DGS_ROOT" || exit 2

need_conda() { CONDA="$(find_conda)" || die "conda not found. Install Miniconda/Miniforge, or set CONDA_EXE." 3; }
env_exists() { conda_env_prefix "$CONDA" "$1" >/dev/null; }
submodule() {
  if [ ! -e "$1/.git" ] && [ -z "$(ls -A "$1" 2>/dev/null)" ]; then
    git submodule update --init "$1" || die "could not fetch the $1 submodule (network?). Run: git submodule update --init $1" 3
  fi
}
install_self() { "$1" -m pip install --no-deps -e "$SAM3DGS_ROOT"; }

setup_vllm() {
  need_conda
  env_exists "$SAM3DGS_ENV_VLLM" || "$CONDA" env create -n "$SAM3DGS_ENV_VLLM" -f envs/vllm.yml || die "creating the vllm env failed." 3
}
setup_sam3() {
  need_conda; submodule sam3
  env_exists "$SAM3DGS_ENV_SAM3" || "$CONDA" env create -n "$SAM3DGS_ENV_SAM3" -f envs/sam3.yml || die "creating the sam3 env failed." 3
  local py; py="$(conda_env_prefix "$CONDA" "$SAM3DGS_ENV_SAM3")/bin/python"
  "$py" -m pip install -e ./sam3 && install_self "$py" || die "installing sam3 into its env failed." 3
}
setup_sam3d() {
  need_conda; submodule sam-3d-objects
  if ! env_exists "$SAM3DGS_ENV_SAM3D"; then
    "$CONDA" env create -n "$SAM3DGS_ENV_SAM3D" -f sam-3d-objects/environments/default.yml || die "creating the sam3d-objects env failed." 3
  fi
  local py; py="$(conda_env_prefix "$CONDA" "$SAM3DGS_ENV_SAM3D")/bin/python"
  # upstream's doc/setup.md, step by step
  ( cd sam-3d-objects \
    && PIP_EXTRA_INDEX_URL="https://pypi.ngc.nvidia.com https://download.pytorch.org/whl/cu121" "$py" -m pip install -e '.[dev]' \
    && PIP_EXTRA_INDEX_URL="https://pypi.ngc.nvidia.com https://download.pytorch.org/whl/cu121" "$py" -m pip install -e '.[p3d]' \
    && PIP_FIND_LINKS="https://nvidia-kaolin.s3.us-east-2.amazonaws.com/torch-2.5.1_cu121.html" "$py" -m pip install -e '.[inference]' \
    && PATH="$(dirname "$py"):$PATH" ./patching/hydra ) || die "installing sam-3d-objects failed (see its doc/setup.md)." 3
  "$CONDA" env update -n "$SAM3DGS_ENV_SAM3D" -f envs/sam3d-objects.yml && install_self "$py" || die "adding our packages to sam3d-objects failed." 3
}

case "$what" in
  vllm) setup_vllm ;;
  sam3) setup_sam3 ;;
  sam3d) setup_sam3d ;;
  lite) ensure_venv ;;
  all) setup_vllm; setup_sam3; setup_sam3d; ensure_venv ;;
  *) die "unknown target '$what': use all, vllm, sam3, sam3d or lite." ;;
esac
echo "done. Check with: python -m pipeline doctor"
