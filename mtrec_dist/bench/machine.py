"""What a benchmark ran on: load average, cores, library versions, commit.

Ratios measured on a shared machine mean little without the load beside them, so every run records
the load average before and after (``os.getloadavg``) next to the versions that produced it.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional


def load_average() -> Dict[str, float]:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), rounded for reports."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def git_commit(root: Optional[Path] = None) -> Optional[str]:
    """The checkout's short commit (with ``+dirty`` when files changed), or ``None`` outside a git checkout."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def machine_info() -> Dict[str, object]:
    """Cores, Python / torch / Ray versions, GPU, commit: enough to tell two runs' machines apart."""
    import ray
    import torch

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "commit": git_commit(),
    }
