# Shared by the entry scripts: find an interpreter for each stage's env. Sourced, not run.
# Nothing here is edited by users: every choice is a flag or an environment variable.
#   --env-manager conda|venv|none|auto   (env SAM3DGS_ENV_MANAGER, default auto)
#   SAM3DGS_ENV_VLLM / SAM3DGS_ENV_SAM3 / SAM3DGS_ENV_SAM3D   conda env names
#   SAM3DGS_VENV   the light venv (default <project>/.venv);  CONDA_EXE   a conda to use
set -o pipefail

SAM3DGS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$SAM3DGS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
SAM3DGS_ENV_VLLM="${SAM3DGS_ENV_VLLM:-vllm}"
SAM3DGS_ENV_SAM3="${SAM3DGS_ENV_SAM3:-sam3}"
SAM3DGS_ENV_SAM3D="${SAM3DGS_ENV_SAM3D:-sam3d-objects}"
SAM3DGS_VENV="${SAM3DGS_VENV:-$SAM3DGS_ROOT/.venv}"
ENV_MANAGER="${SAM3DGS_ENV_MANAGER:-auto}"
PASS_ARGS=()

die() {  # one clear line, non-zero exit
  echo "error: $1" >&2
  exit "${2:-2}"
}

# Split our own flags (--env-manager) from the ones passed through to python -m pipeline.
parse_common_args() {
  PASS_ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --env-manager) [ $# -ge 2 ] || die "--env-manager needs a value: conda, venv, none or auto."; ENV_MANAGER="$2"; shift 2 ;;
      --env-manager=*) ENV_MANAGER="${1#*=}"; shift ;;
      *) PASS_ARGS+=("$1"); shift ;;
    esac
  done
  case "$ENV_MANAGER" in conda|venv|none|auto) ;; *) die "--env-manager '$ENV_MANAGER' is not one of conda, venv, none, auto." ;; esac
}

# The value of a flag among PASS_ARGS (--name VALUE or --name=VALUE), or empty.
flag_value() {
  local name="$1" i
  for ((i = 0; i < ${#PASS_ARGS[@]}; i++)); do
    case "${PASS_ARGS[$i]}" in
      "$name") echo "${PASS_ARGS[$((i + 1))]:-}"; return ;;
      "$name="*) echo "${PASS_ARGS[$i]#*=}"; return ;;
    esac
  done
}

has_flag() {
  local a
  for a in "${PASS_ARGS[@]}"; do case "$a" in "$1"|"$1="*) return 0 ;; esac; done
  return 1
}

find_conda() {
  local c
  for c in "${CONDA_EXE:-}" "$(command -v conda 2>/dev/null)" "$(command -v mamba 2>/dev/null)" \
           "$HOME/miniconda3/bin/conda" "$HOME/miniforge3/bin/conda" "$HOME/anaconda3/bin/conda" \
           "$HOME/mambaforge/bin/conda" /opt/conda/bin/conda /opt/miniconda3/bin/conda; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

conda_env_prefix() {  # prints the prefix of a named conda env, or fails
  local conda="$1" name="$2"
  "$conda" env list 2>/dev/null | awk -v n="$name" '$1 == n {print $NF}' | head -n 1 | grep .
}

python_ok() {  # python >= 3.10?
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null
}

# Create the light venv and install its requirements once (re-run when requirements change).
# Arguments: extra requirements files installed on top (e.g. envs/requirements-test.txt).
ensure_venv() {
  local req="$SAM3DGS_ROOT/envs/requirements-lite.txt" stamp py f missing=0 extras=("$@") extra_args=()
  for f in "${extras[@]}"; do extra_args+=(-r "$f"); done
  # The stamp lists a hash per requirements file installed, so the demo after the tests (or the
  # other way round) does not reinstall anything.
  stamp="$SAM3DGS_VENV/.sam3d-gs-requirements"
  for f in "$req" "${extras[@]}"; do
    grep -qx "$(sha256sum "$f" | cut -c1-16)" "$stamp" 2>/dev/null || missing=1
  done
  if [ -x "$SAM3DGS_VENV/bin/python" ] && [ "$missing" = 0 ]; then link_project_into_venv; return 0; fi
  py="${SAM3DGS_PYTHON:-$(command -v python3 || command -v python)}"
  [ -n "$py" ] || die "no python3 found. Install Python 3.10+ and re-run." 3
  python_ok "$py" || die "$py is older than Python 3.10. Install Python 3.10+ or set SAM3DGS_PYTHON." 3
  local log="$SAM3DGS_ROOT/outputs/.setup.log"
  mkdir -p "$SAM3DGS_ROOT/outputs"
  echo "setting up the light env in $SAM3DGS_VENV (once; log: $log) ..." >&2
  if [ ! -x "$SAM3DGS_VENV/bin/python" ]; then
    "$py" -m venv "$SAM3DGS_VENV" >"$log" 2>&1 || die "could not create the venv $SAM3DGS_VENV (python3-venv missing? see $log)." 3
  fi
  # SAM3DGS_PIP_ARGS lets users add e.g. '--extra-index-url https://download.pytorch.org/whl/cpu'.
  # shellcheck disable=SC2086
  "$SAM3DGS_VENV/bin/python" -m pip install --disable-pip-version-check ${SAM3DGS_PIP_ARGS:-} \
      -r "$req" "${extra_args[@]}" >>"$log" 2>&1 \
    || die "installing the light requirements failed: see $log (last line: $(tail -n 1 "$log"))." 3
  for f in "$req" "${extras[@]}"; do sha256sum "$f" | cut -c1-16; done >>"$stamp"
  link_project_into_venv
}

# Make `import pipeline` work in the venv from any folder: a .pth file naming this checkout
# (the offline equivalent of an editable install).
link_project_into_venv() {
  "$SAM3DGS_VENV/bin/python" - "$SAM3DGS_ROOT" <<'PY' || die "could not link the project into $SAM3DGS_VENV." 3
import pathlib, sys, sysconfig
pth = pathlib.Path(sysconfig.get_paths()["purelib"]) / "sam3d_gs.pth"
if not pth.exists() or pth.read_text().strip() != sys.argv[1]:
    pth.write_text(sys.argv[1] + "\n")
PY
}

# Sets STAGE_PY (an argv array) to run python in the env of a stage: sam3 | sam3d | any.
STAGE_PY=()
resolve_stage_python() {
  local stage="$1" env_name conda prefix manager="$ENV_MANAGER"
  case "$stage" in sam3) env_name="$SAM3DGS_ENV_SAM3" ;; sam3d) env_name="$SAM3DGS_ENV_SAM3D" ;; *) env_name="" ;; esac
  if [ "$manager" = auto ]; then
    manager=venv
    if [ -n "$env_name" ] && conda="$(find_conda)" && conda_env_prefix "$conda" "$env_name" >/dev/null; then manager=conda; fi
  fi
  case "$manager" in
    conda)
      conda="$(find_conda)" || die "conda not found (looked at CONDA_EXE, PATH, ~/miniconda3, ~/miniforge3, ~/anaconda3, /opt/conda). Install Miniconda or use --env-manager venv." 3
      [ -n "$env_name" ] || env_name="$SAM3DGS_ENV_SAM3"
      prefix="$(conda_env_prefix "$conda" "$env_name")" || die "conda env '$env_name' does not exist. Create it with: bash envs/setup.sh $stage" 3
      STAGE_PY=("$prefix/bin/python") ;;
    venv)
      ensure_venv
      STAGE_PY=("$SAM3DGS_VENV/bin/python") ;;
    none)
      local py="${SAM3DGS_PYTHON:-$(command -v python3)}"
      python_ok "$py" || die "no Python 3.10+ on PATH for --env-manager none." 3
      STAGE_PY=("$py") ;;
  esac
}

# The vllm executable of the vllm conda env, if there is one (used as --vllm-command).
vllm_command_from_conda() {
  local conda prefix
  conda="$(find_conda)" || return 1
  prefix="$(conda_env_prefix "$conda" "$SAM3DGS_ENV_VLLM")" || return 1
  [ -x "$prefix/bin/vllm" ] && echo "$prefix/bin/vllm"
}

# --images DIR|LIST: many photos through `python -m pipeline batch --stage $1` (all | 1 | 2). The driver
# runs in the light venv (with Ray for --engine ray); in conda mode without Ray, in the first stage's env.
# Each stage's workers run with that stage's env interpreter (--stage1-python / --stage2-python).
run_batch() {
  local stage="$1" manager="$ENV_MANAGER" conda prefix vllm driver="" extra=()
  has_flag --image && die "--image and --images are exclusive: --image PHOTO for one photo, --images DIR (or a list file) for a batch."
  has_flag --out || die "a batch needs --out ROOT: one run folder per photo goes under it."
  if [ "$manager" = auto ]; then
    manager=venv
    if conda="$(find_conda)" \
       && { [ "$stage" = 2 ] || conda_env_prefix "$conda" "$SAM3DGS_ENV_SAM3" >/dev/null; } \
       && { [ "$stage" = 1 ] || conda_env_prefix "$conda" "$SAM3DGS_ENV_SAM3D" >/dev/null; }; then manager=conda; fi
  fi
  if [ "$manager" = conda ]; then
    conda="$(find_conda)" || die "conda not found (looked at CONDA_EXE, PATH, ~/miniconda3, ~/miniforge3, ~/anaconda3, /opt/conda). Install Miniconda or use --env-manager venv." 3
    if [ "$stage" != 2 ] && ! has_flag --stage1-python; then
      prefix="$(conda_env_prefix "$conda" "$SAM3DGS_ENV_SAM3")" || die "conda env '$SAM3DGS_ENV_SAM3' does not exist. Create it with: bash envs/setup.sh sam3" 3
      extra+=(--stage1-python "$prefix/bin/python"); driver="$prefix/bin/python"
    fi
    if [ "$stage" != 1 ] && ! has_flag --stage2-python; then
      prefix="$(conda_env_prefix "$conda" "$SAM3DGS_ENV_SAM3D")" || die "conda env '$SAM3DGS_ENV_SAM3D' does not exist. Create it with: bash envs/setup.sh sam3d" 3
      extra+=(--stage2-python "$prefix/bin/python"); driver="${driver:-$prefix/bin/python}"
    fi
    if [ "$stage" != 2 ] && ! has_flag --vllm-command && ! has_flag --vlm-url && vllm="$(vllm_command_from_conda)"; then
      extra+=(--vllm-command "$vllm")
    fi
  fi
  if [ "$(flag_value --engine)" = ray ]; then
    # Ray lives in the light venv only (never in the model envs), installed on the first --engine ray.
    ensure_venv "$SAM3DGS_ROOT/envs/requirements-ray.txt"
    driver="$SAM3DGS_VENV/bin/python"
  elif [ -z "$driver" ]; then
    resolve_stage_python any
    driver="${STAGE_PY[0]}"
  fi
  exec "$driver" -m pipeline batch "${PASS_ARGS[@]}" "${extra[@]}" --stage "$stage"
}

# A run folder both stages agree on, when the user gave no --out.
default_out() {
  local image stem
  image="$(flag_value --image)"
  stem="$(basename "${image:-image}")"; stem="${stem%.*}"
  stem="$(printf '%s' "$stem" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-60)"
  echo "${SAM3DGS_OUTPUTS:-$SAM3DGS_ROOT/outputs}/${stem:-image}-$(date +%Y%m%d-%H%M%S)"
}

print_script_help() {  # $1 = script usage text, $2 = pipeline subcommand
  echo "$1"
  echo
  echo "Script options:"
  echo "  --env-manager conda|venv|none|auto  how to find each stage's Python (env SAM3DGS_ENV_MANAGER; default auto:"
  echo "                                      the stage's conda env if it exists, else the project venv .venv/)"
  echo
  echo "Every other option is passed to 'python -m pipeline $2':"
  echo
  local py="${SAM3DGS_PYTHON:-python3}"
  if [ -x "$SAM3DGS_VENV/bin/python" ]; then py="$SAM3DGS_VENV/bin/python"; fi
  if ! "$py" -m pipeline "$2" --help 2>/dev/null | sed -n '/^options:/,$p' | grep .; then
    echo "  (listing them needs Python 3.10+: run '<python3.10+> -m pipeline $2 --help' in $SAM3DGS_ROOT)"
  fi
}
