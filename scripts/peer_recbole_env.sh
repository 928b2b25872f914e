#!/usr/bin/env bash
# Builds the separate virtual environment that runs RecBole 1.2.1 for `mtrec bench --peer recbole`.
# It is never part of the product's install: RecBole pins old numpy/pandas/scipy, so it lives in its
# own venv (default .venv-peer-recbole, ignored by git) and our side only calls its python.
# recbole is installed with --no-deps because its declared deps include ray (pulled in only for
# quick_start / ray.tune, which the peer runner does not use) and unpinned torch/numpy.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MTREC_PEER_VENV:-$ROOT/.venv-peer-recbole}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.peer-stamp"
want="$(sha256sum "$ROOT/scripts/peer_recbole_env.sh" | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "[peer-env] building $VENV with $($PY --version 2>&1)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# Same CPU torch wheel as scripts/bootstrap.sh (local wheel folder first, PyTorch CPU index fallback).
"${pip[@]}" "torch==2.13.0" 2>/dev/null || \
  "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
# Versions RecBole 1.2.1 still works with (it uses np.float / old pandas APIs removed later).
"${pip[@]}" "numpy<2" "pandas<2.3" "scipy<1.14" colorlog colorama texttable psutil scikit-learn \
  tensorboard tqdm pyyaml
"${pip[@]}" --no-deps "recbole==1.2.1"
"$VENV/bin/python" -c "import torch, recbole; from recbole.config import Config; from recbole.data import create_dataset, data_preparation; from recbole.utils import get_model, get_trainer; print('[peer-env] torch', torch.__version__, 'recbole', recbole.__version__)" >&2
echo "$want" > "$STAMP"
