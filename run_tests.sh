#!/usr/bin/env bash
# Sets up the test dependencies (project venv .venv/, plus Chromium for the browser tests where
# apt-get can install it) and runs the whole test suite. Extra arguments go to pytest.
source "$(dirname "$0")/envs/common.sh"
ensure_venv "$SAM3DGS_ROOT/envs/requirements-test.txt" "$SAM3DGS_ROOT/envs/requirements-ray.txt"
if ! command -v chromium >/dev/null 2>&1 && [ "${SAM3DGS_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=skip; fi
  if [ "$sudo" != skip ]; then
    echo "installing chromium for the browser tests (log: outputs/.apt.log) ..." >&2
    mkdir -p "$SAM3DGS_ROOT/outputs"
    { $sudo apt-get update && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends chromium chromium-driver; } \
      >"$SAM3DGS_ROOT/outputs/.apt.log" 2>&1 || echo "warning: chromium could not be installed; browser tests will be skipped (see outputs/.apt.log)" >&2
  fi
fi
cd "$SAM3DGS_ROOT" || exit 2
bash "$SAM3DGS_ROOT/envs/sam3-test-env.sh" --run-tests; sam3_rc=$?  # upstream SAM3 in its own env (.venv-sam3)
"$SAM3DGS_VENV/bin/python" -m pytest "${@:--q}" && exit "$sam3_rc"
