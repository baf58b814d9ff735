#!/usr/bin/env bash
# Create the conda envs of the full profile and install this project into each.
#   bash envs/setup.sh [all|vllm|sam3|sam3d|lite]
# conda only creates each env (envs/*.yml; for sam3d upstream's environments/default.yml). Every
# pip step then runs INSIDE the activated env (`conda activate` through `conda shell.bash hook`),
# so the env's own python, nvcc, gcc and the CC/CXX its activation scripts set are the ones used,
# as upstream's doc/setup.md does. Nothing is `pip install -U`'d or `conda env update`'d into an
# env: re-running this script only fills gaps. Versions are pinned in envs/*-requirements.txt and
# envs/*-constraints.txt; `python -m pipeline doctor` checks the result.
#   SAM3DGS_VLLM_CUDA=13 (default: vLLM 0.33.0, CUDA 13, NVIDIA driver >= 580) or 12 (driver >= 570)
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

# Run "$@" (a function below) in a subshell in which conda env $1 is activated.
in_env() {
  local name="$1" hook exe="$CONDA"
  shift
  # mamba's own CLI has no `shell.bash hook`; the conda beside it (Miniforge has both) does.
  if [ "$(basename "$exe")" = mamba ] && [ -x "$(dirname "$exe")/conda" ]; then exe="$(dirname "$exe")/conda"; fi
  (
    hook="$("$exe" shell.bash hook)" && eval "$hook" \
      || die "could not load conda's shell functions ('$exe shell.bash hook' failed)." 3
    conda activate "$name" || die "could not activate the conda env '$name'." 3
    "$@"
  )
}
pip_install() { python -m pip install --disable-pip-version-check "$@"; }  # the activated env's pip
install_self() { pip_install --no-deps -e "$SAM3DGS_ROOT"; }

vllm_steps() { pip_install -r "$1"; }
setup_vllm() {
  need_conda
  local req
  case "${SAM3DGS_VLLM_CUDA:-13}" in
    13) req=envs/vllm-requirements.txt ;;
    12) req=envs/vllm-cu12-requirements.txt ;;
    *) die "SAM3DGS_VLLM_CUDA='$SAM3DGS_VLLM_CUDA': use 13 (NVIDIA driver >= 580) or 12 (driver >= 570)." ;;
  esac
  env_exists "$SAM3DGS_ENV_VLLM" || "$CONDA" env create -n "$SAM3DGS_ENV_VLLM" -f envs/vllm.yml || die "creating the vllm env failed." 3
  in_env "$SAM3DGS_ENV_VLLM" vllm_steps "$req" || die "installing vLLM ($req) into the vllm env failed (see pip's output above)." 3
}

sam3_steps() {
  local c=envs/sam3-constraints.txt
  pip_install -c "$c" -r envs/sam3-requirements.txt || return 1
  if [ "$(uname -m)" = x86_64 ]; then
    pip_install -c "$c" -e ./sam3 || return 1
  else
    # The pinned sam3 imports decord at module level (train/data/sam3_image_dataset.py:18), and
    # decord has x86-64 wheels only; sam3 0.1.4 has the same model code with that import lazy
    # (audits/sam3.md, "PyPI 0.1.4 wheel vs the pin").
    echo "note: no decord wheel for $(uname -m): installing PyPI's sam3==0.1.4 (same model code, decord imported lazily) instead of ./sam3." >&2
    pip_install -c "$c" "sam3==0.1.4" || return 1
  fi
  install_self
}
setup_sam3() {
  need_conda; submodule sam3
  env_exists "$SAM3DGS_ENV_SAM3" || "$CONDA" env create -n "$SAM3DGS_ENV_SAM3" -f envs/sam3.yml || die "creating the sam3 env failed." 3
  in_env "$SAM3DGS_ENV_SAM3" sam3_steps || die "installing sam3 into its env failed (see pip's output above)." 3
}

sam3d_steps() {
  # up: sam-3d-objects doc/setup.md:14-29 (at cf06676), step by step, with the variables it exports.
  (
    cd sam-3d-objects || exit 1
    export PIP_EXTRA_INDEX_URL="https://pypi.ngc.nvidia.com https://download.pytorch.org/whl/cu121"
    pip_install -e '.[dev]' || exit 1
    pip_install -e '.[p3d]' || exit 1
    export PIP_FIND_LINKS="https://nvidia-kaolin.s3.us-east-2.amazonaws.com/torch-2.5.1_cu121.html"
    pip_install -e '.[inference]' || exit 1
    ./patching/hydra
  ) || return 1
  # Ours: only what is missing (no -U), under numpy<2 and upstream's own cv2 (audits/sam3d-objects.md F1).
  pip_install -c envs/sam3d-objects-constraints.txt -r envs/sam3d-objects-requirements.txt || return 1
  install_self
}
setup_sam3d() {
  need_conda; submodule sam-3d-objects
  if ! env_exists "$SAM3DGS_ENV_SAM3D"; then
    "$CONDA" env create -n "$SAM3DGS_ENV_SAM3D" -f sam-3d-objects/environments/default.yml || die "creating the sam3d-objects env failed." 3
  fi
  in_env "$SAM3DGS_ENV_SAM3D" sam3d_steps || die "installing sam-3d-objects failed (see the output above and its doc/setup.md)." 3
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
