"""Process-level runtime helpers: device/backend selection and attaching to a Ray cluster.

Sits beside config at the bottom of the layering: data, training and CLI code may import it.
"""
from __future__ import annotations

import os
from typing import Optional


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # torch without CUDA runtime
        return False


def resolve_use_gpu(setting: str) -> bool:
    """``"auto"`` -> whether this machine has a CUDA GPU; ``"true"``/``"false"`` force it."""
    if setting == "auto":
        return gpu_available()
    return setting == "true"


def dist_backend(use_gpu: bool) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"


def init_ray(address: str = "", num_cpus: Optional[int] = None, log_to_driver: bool = True, **kwargs) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), or start a local cluster; no-op if already attached.

    ``log_to_driver=False`` keeps worker output (FBGEMM/TorchRec set-up dumps, per-report lines) in the
    session's log files (``/tmp/ray/session_latest/logs``) instead of the console."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    # Quiet the progress bars' per-operator noise but keep the global one.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, **kwargs)
