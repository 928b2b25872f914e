#!/usr/bin/env bash
# Installs mtrec-dist into the Python of a cluster node (the rayproject/ray:2.60.0-py311-* image's), in the
# same order and with the same pins as scripts/bootstrap.sh (plus exact versions of pyarrow, pyyaml,
# matplotlib and tensorboard, below): torch, then fbgemm (CUDA build on GPU nodes,
# CPU build elsewhere), then the project's dependencies, then torchrec with --no-deps (its declared
# dependency on the CUDA fbgemm-gpu would otherwise replace the CPU build), then the project itself.
#
#   bash cluster/setup_node.sh            # accelerator detected with nvidia-smi
#   MTREC_ACCEL=cuda bash cluster/setup_node.sh   # force (docker build has no GPU to detect)
#
# Used by cluster/aws.yaml and cluster/gcp.yaml (setup_commands) and cluster/Dockerfile.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
RAY_VERSION="2.60.0"
TORCH_VERSION="2.13.0"
FBGEMM_VERSION="1.8.0"
TORCHREC_VERSION="1.8.0"
# The versions of the tested environment (.venv: `pip show pyarrow pyyaml matplotlib tensorboard`), so a
# node never resolves a newer release than the one the tests ran with (Parquet files, configs, plots).
PYARROW_VERSION="26.0.1"
PYYAML_VERSION="6.0.4"
MATPLOTLIB_VERSION="3.11.2"
TENSORBOARD_VERSION="2.21.0"

have="$("$PY" -c 'import ray; print(ray.__version__)' 2>/dev/null || echo none)"
if [[ "$have" != "$RAY_VERSION" ]]; then
  echo "[setup_node] expected Ray $RAY_VERSION in $("$PY" -c 'import sys; print(sys.executable)'), found $have;" \
       "use the rayproject/ray:$RAY_VERSION-py311-* images" >&2
  exit 1
fi
accel="${MTREC_ACCEL:-auto}"
if [[ "$accel" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then accel=cuda; else accel=cpu; fi
fi
pip=("$PY" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
echo "[setup_node] installing mtrec-dist for $accel from $ROOT" >&2
if [[ "$accel" == cuda ]]; then
  "${pip[@]}" "torch==$TORCH_VERSION"            # PyPI's default torch build is the CUDA one
  FBGEMM="fbgemm-gpu==$FBGEMM_VERSION"
else
  "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
  FBGEMM="fbgemm-gpu-cpu==$FBGEMM_VERSION"
fi
"${pip[@]}" "$FBGEMM" "ray[default,train,data]==$RAY_VERSION" "pyarrow==$PYARROW_VERSION" tensordict \
  "torchmetrics==1.0.3" tqdm pyre-extensions "pyyaml==$PYYAML_VERSION" "matplotlib==$MATPLOTLIB_VERSION" \
  "tensorboard==$TENSORBOARD_VERSION"
"${pip[@]}" --no-deps "torchrec==$TORCHREC_VERSION"
"${pip[@]}" --no-deps -e "$ROOT"
"$PY" -c "import torch, torchrec, fbgemm_gpu, ray, mtrec_dist; print('[setup_node] torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torchrec', torchrec.__version__, 'ray', ray.__version__)" >&2
