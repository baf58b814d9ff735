#!/usr/bin/env bash
# Creates (once) the test env .venv-sam3/ that runs upstream's real SAM3 code (PyPI sam3==0.1.4)
# on CPU, from envs/requirements-sam3-test.txt, and links this checkout into it. Re-installs only
# when that file changes (a hash stamp, as ensure_venv does for .venv).
#   envs/sam3-test-env.sh               prints the env's python
#   envs/sam3-test-env.sh --run-tests   runs the upstream SAM3 tests there (-m sam3_upstream)
#   SAM3DGS_SAM3_TEST_VENV   where the env lives (default <project>/.venv-sam3)
#   SAM3DGS_SAM3_UPSTREAM_TESTS=0   --run-tests does nothing (no env, no tests)
#   SAM3DGS_PYTHON           which python3 creates it
set -o pipefail
if [ "${1:-}" = --run-tests ] && [ "${SAM3DGS_SAM3_UPSTREAM_TESTS:-1}" = 0 ]; then
  echo "SAM3DGS_SAM3_UPSTREAM_TESTS=0: upstream SAM3 tests not run" >&2
  exit 0
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SAM3DGS_SAM3_TEST_VENV:-$root/.venv-sam3}"
req="$root/envs/requirements-sam3-test.txt"
stamp="$venv/.sam3d-gs-requirements"
hash="$(sha256sum "$req" | cut -c1-16)"
if ! { [ -x "$venv/bin/python" ] && grep -qx "$hash" "$stamp" 2>/dev/null; }; then
  py="${SAM3DGS_PYTHON:-$(command -v python3 || command -v python)}"
  log="$root/outputs/.setup-sam3-test.log"
  mkdir -p "$root/outputs"
  echo "setting up the SAM3 test env in $venv (once, a few minutes: torch is a large wheel; log: $log) ..." >&2
  { [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"; } >"$log" 2>&1 \
    || { echo "error: could not create the venv $venv (python3-venv missing? see $log)." >&2; exit 3; }
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --disable-pip-version-check ${SAM3DGS_PIP_ARGS:-} -r "$req" >>"$log" 2>&1 \
    || { echo "error: installing the SAM3 test env failed: see $log (last line: $(tail -n 1 "$log"))." >&2; exit 3; }
  echo "$hash" >"$stamp"
fi
# `import pipeline` from any folder: a .pth naming this checkout (as link_project_into_venv does).
"$venv/bin/python" - "$root" <<'PY' || { echo "error: could not link the project into $venv." >&2; exit 3; }
import pathlib, sys, sysconfig
pth = pathlib.Path(sysconfig.get_paths()["purelib"]) / "sam3d_gs.pth"
if not pth.exists() or pth.read_text().strip() != sys.argv[1]:
    pth.write_text(sys.argv[1] + "\n")
PY
if [ "${1:-}" = --run-tests ]; then
  echo "upstream SAM3 on the CPU (tests/test_sam3_upstream.py, env $venv; a few minutes) ..." >&2
  cd "$root" && exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -m sam3_upstream tests/test_sam3_upstream.py
fi
echo "$venv/bin/python"
