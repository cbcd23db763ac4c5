#!/usr/bin/env bash
# One command from a fresh clone: virtual environment, torch, the project, detectron2 — then a job.
#   bash tools/bootstrap.sh          # set up only
#   bash tools/bootstrap.sh demo     # set up, then run the end-to-end demo (tools/demo.py)
#   bash tools/bootstrap.sh test     # set up, then run the test suite
# Idempotent: a second run skips every install step whose inputs did not change (a few seconds).
# MCL_DET_VENV overrides the environment's location (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${MCL_DET_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
start=$(date +%s)

if [ ! -x "$PY" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip, minus the "Location ... is ignored" lines that extra local indexes make on some machines.
pipq() {
  set +e
  "$PY" -m pip "$@" 2>&1 | grep -v "it is neither a file nor a directory"
  local rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

# The stamp records what was installed; an unchanged stamp means nothing to do.
stamp_in="$TORCH_PINS|$(cat setup.py tools/install_detectron2.py | sha256sum | cut -c1-16)"
stamp_file=$VENV/.mcl_det_stamp
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_in" ]; then
  if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[bootstrap] installing $TORCH_PINS"
    pipq install -q $TORCH_PINS
  fi
  echo "[bootstrap] installing mcl_det (editable) and its dependencies"
  # Constrain torch so no dependency can pull another build.
  tv=$("$PY" -c "import torch, torchvision; print(f'torch=={torch.__version__}\ntorchvision=={torchvision.__version__}')")
  printf '%s\n' "$tv" > "$VENV/.torch_constraints.txt"
  pipq install -q -c "$VENV/.torch_constraints.txt" -e ".[dev]"
  "$PY" tools/install_detectron2.py
  echo "$stamp_in" > "$stamp_file"
else
  echo "[bootstrap] environment up to date ($VENV)"
fi
echo "[bootstrap] setup took $(( $(date +%s) - start )) s"

job=${1:-}
shift || true
case "$job" in
  "") ;;
  demo) exec "$PY" tools/demo.py "$@" ;;
  test) exec "$PY" -m pytest -q "$@" ;;
  *) echo "error: unknown job '$job' (use: demo, test)" >&2; exit 2 ;;
esac
