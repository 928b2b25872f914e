#!/usr/bin/env bash
# Builds the project's own virtual environment (.venv) if it is missing or stale.
# The install order matters: torchrec declares a dependency on the CUDA fbgemm-gpu, which would
# overwrite fbgemm-gpu-cpu and break import, so fbgemm is installed first and torchrec with --no-deps.
# On a machine with an NVIDIA GPU the CUDA fbgemm-gpu is chosen instead of the CPU build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MTREC_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.mtrec-stamp"
# The stamp records what the venv was built from; a change to pyproject or this script rebuilds deps.
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "[bootstrap] building $VENV with $($PY --version 2>&1)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM="fbgemm-gpu==1.8.0"
  "${pip[@]}" "torch==2.13.0"
else
  FBGEMM="fbgemm-gpu-cpu==1.8.0"
  # The CPU wheel of torch 2.13.0 is found in the machine's local wheel folder; on plain PyPI the
  # same pin resolves to the CUDA build, so point pip at the PyTorch CPU index as a fallback.
  "${pip[@]}" "torch==2.13.0" 2>/dev/null || \
    "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
fi
"${pip[@]}" "$FBGEMM" "ray[default,train,data]==2.60.0" pyarrow pytest "hypothesis==6.170.17" tensordict "torchmetrics==1.0.3" \
  tqdm pyre-extensions pyyaml matplotlib tensorboard "polars==2.1.0"
"${pip[@]}" --no-deps "torchrec==1.8.0"
"${pip[@]}" --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, ray; print('[bootstrap] torch', torch.__version__, 'torchrec', torchrec.__version__, 'ray', ray.__version__)" >&2
echo "$want" > "$STAMP"
