#!/usr/bin/env bash
# One command from a fresh clone: virtual environment, torch, the project, detectron2 — then a job.
#   bash tools/bootstrap.sh          # set up only
#   bash tools/bootstrap.sh demo     # set up, then run the demo study (studies/demo.yaml)
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

# Free space (MiB) on the filesystem holding $1 (or its nearest existing parent).
free_mib() {
  local d=$1
  while [ ! -e "$d" ]; do d=$(dirname "$d"); done
  df -Pm "$d" | awk 'NR==2 {print $4}'
}

if [ ! -x "$PY" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}  # no second copy of every download on the disk

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
    need=5800  # torch 2.14.1 CUDA build + nvidia libraries + triton: ~5.9 GB; below this it can't fit
    have=$(free_mib "$VENV")
    if [ "$have" -lt "$need" ]; then
      echo "error: only $have MiB free for $VENV; torch's CUDA build needs about $need MiB:" \
        "free disk space or point MCL_DET_VENV at a larger disk" >&2
      exit 2
    fi
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
  demo) exec "$PY" tools/study.py run studies/demo.yaml "$@" ;;
  test)
    # the suite writes real checkpoints under the temp dir: ~0.85 GB at its peak
    tmp=${TMPDIR:-/tmp}
    have=$(free_mib "$tmp")
    echo "[bootstrap] $have MiB free in $tmp"
    if [ "$have" -lt 1200 ]; then
      echo "[bootstrap] warning: only $have MiB free in $tmp; the test suite needs about 900 MiB" \
        "for its checkpoints (a full disk fails them with 'could not write ...'): free disk" \
        "space or set TMPDIR to a larger disk" >&2
    fi
    exec "$PY" -m pytest -q "$@" ;;
  *) echo "error: unknown job '$job' (use: demo, test)" >&2; exit 2 ;;
esac
