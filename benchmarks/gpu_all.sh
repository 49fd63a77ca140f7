#!/usr/bin/env bash
# `make gpu`: set up offline, then run benchmarks/gpu_all.py (its docstring has the stages and files).
#
# Python: $PYTHON (default python3) as it is when torch imports there: on the GPU image python3 is
# itself a venv (/opt/torch/.venv) with torch, triton, pytest and pytest-xdist, and no registry, so
# no nested venv is made and nothing is downloaded. Without torch there (a CPU machine of this
# project), the project's .venv from `make setup`.
# The package: when `aimv2.kernels` does not already resolve to this checkout, an offline editable
# install (`pip install --no-deps --no-build-isolation --no-index --use-pep517 -e .`, setuptools of that
# python); if that fails, a link tree in a temp dir on PYTHONPATH with PYTHONSAFEPATH=1, so the
# checkout's aimv2/ (which has no kernels/ inside; setup.py maps aimv2.kernels to kernels/) is not
# found first from the working directory.
#
#   GPU_DEADLINE=480 OUT=/path GPU_ARGS="--dry" make gpu        (make gpu-more: GPU_CALL=more)
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s.%N)
PY=$(command -v "${PYTHON:-python3}") || { echo "[gpu setup] no ${PYTHON:-python3} on PATH"; exit 2; }
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
SETUP_LOG=$(mktemp "${TMPDIR:-/tmp}/aimv2-gpu-setup.XXXXXX")
log() { echo "[gpu setup] $*" | tee -a "$SETUP_LOG"; }

if "$PY" -c "import torch" 2>/dev/null; then
  log "python: $(command -v "$PY") ($("$PY" -c 'import sys, torch; print(sys.prefix, "torch", torch.__version__)')), used as it is"
else
  log "torch is not importable from $PY: using the project venv (make setup)"
  make -s setup PYTHON="$PY" || { log "make setup failed"; exit 2; }
  PY="$ROOT/.venv/bin/python"
fi

# does `import aimv2.kernels` (from outside the checkout) resolve to this checkout's kernels/?
resolves() {
  (cd / && "$PY" - "$ROOT" <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("aimv2.kernels")
ok = spec is not None and pathlib.Path(spec.origin).resolve().parent == pathlib.Path(sys.argv[1], "kernels").resolve()
sys.exit(0 if ok else 1)
EOF
  ) 2>/dev/null
}

if resolves; then
  log "aimv2 already installed from this checkout"
else
  # --use-pep517: without it pip (< 25) runs the legacy `setup.py develop`, which recent setuptools
  # turns into a nested `pip install -e .` with build isolation, i.e. a download
  log "installing aimv2 editable, offline: $PY -m pip install --no-deps --no-build-isolation --no-index --use-pep517 -e ."
  if [ -z "${AIMV2_GPU_NO_INSTALL:-}" ] && PIP_NO_INDEX=1 "$PY" -m pip install -q --no-deps \
       --no-build-isolation --no-index --use-pep517 -e . 2>&1 | tee -a "$SETUP_LOG" && resolves; then
    log "installed"
  else
    LINKS=$(mktemp -d "${TMPDIR:-/tmp}/aimv2-links.XXXXXX")
    mkdir "$LINKS/aimv2"
    ln -s "$ROOT"/aimv2/* "$LINKS/aimv2/"
    ln -s "$ROOT/kernels" "$LINKS/aimv2/kernels"
    export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    if resolves; then
      log "editable install failed: using a link tree on PYTHONPATH ($LINKS) with PYTHONSAFEPATH=1"
    else
      log "aimv2.kernels does not import from this checkout, even through $LINKS"; exit 2
    fi
  fi
fi

# wheels carried with the call (make gpu-wheels; benchmarks/gpu_wheels.txt), installed offline
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "no CUDA device: the carried wheels are not installed here (dry mode)"
elif [ -d .gpu-wheels ]; then
  if PIP_NO_INDEX=1 "$PY" -m pip install -q --no-deps --no-index --find-links .gpu-wheels \
       -r benchmarks/gpu_wheels.txt 2>&1 | tee -a "$SETUP_LOG"; then
    log "installed from .gpu-wheels: $(ls .gpu-wheels | tr '\n' ' ')"
  else
    log "could not install from .gpu-wheels (the stages that need them are skipped)"
  fi
else
  log "no .gpu-wheels/ (make gpu-wheels; carry it): stages needing benchmarks/gpu_wheels.txt are skipped"
fi

exec "$PY" benchmarks/gpu_all.py --call "${GPU_CALL:-gpu}" --started-at "$T0" --setup-log "$SETUP_LOG" ${GPU_ARGS:-}
