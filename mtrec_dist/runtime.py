"""Process-level runtime helpers: device/backend selection and attaching to a Ray cluster.

Sits beside config at the bottom of the layering: data, training and CLI code may import it.
"""
from __future__ import annotations

import ctypes
import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit systems


def retain_freed_memory(trim_threshold_mb: int) -> bool:
    """Keep memory this process frees for its own reuse (``train.malloc_trim_mb``; 0 leaves glibc's defaults).

    At glibc's defaults a training step's tensors of a few hundred KiB to a few MiB go back to the OS when freed
    (unmapped, or trimmed off the top of the heap), so every step page-faults its working set in again: a CPU
    SASRec step (batch 256) inside a Ray Train worker took 4,500-7,700 page faults and 25-29 ms, against 0-340
    faults and 22-23 ms with allocations up to 32 MiB served from the heap and up to ``trim_threshold_mb`` of
    free heap kept (bench/RESULTS.md, session 13).  Peak memory is unchanged (the same tensors are live); only
    memory already freed is not handed back.  Process-wide; a no-op (``False``) outside glibc or when
    ``trim_threshold_mb`` is 0."""
    if trim_threshold_mb <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # both, in this order: setting either one alone turns off glibc's adaptive threshold and faults more
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_mb) << 20))


TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def set_controller_poll(seconds: float) -> None:
    """How often the controller of the next Ray Train run this driver starts polls its workers
    (``train.controller_poll_s``): Ray Train hands this variable from the driver to the controller it launches,
    on a local cluster and a remote one alike."""
    os.environ[TRAIN_POLL_ENV] = repr(float(seconds))


# Ray Data 2.60's Parquet reader starts a pool of 32 footer-reading actors (each a new process, each asking for
# a CPU) every time a dataset's execution lists its files.  On one machine reading local files one reader does
# the job, and the first batch of every streamed epoch, scoring or evaluation comes 1.1 s sooner (2.4 -> 1.2 s
# of listing on the peer's 73,871 rows; bench/RESULTS.md, session 16).  Ray Data reads the variable where
# ``read_parquet`` is called, in the driver, and the plan carries the value to the cluster.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
LOCAL_FOOTER_ACTORS = "1"


def set_local_cluster_env(environ) -> None:
    """What the driver of a local cluster runs with (its processes inherit it too); a value already set wins."""
    environ.setdefault(FOOTER_ACTORS_ENV, LOCAL_FOOTER_ACTORS)


def init_ray(address: str = "", num_cpus: Optional[int] = None, log_to_driver: bool = False, **kwargs) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), or start a local cluster; no-op if already attached.

    By default Ray's own output stays in the session's log files (:func:`ray_log_dir`), not the console: what
    workers and actors print (FBGEMM/TorchRec set-up dumps, Ray Train's controller, Ray Data's split
    coordinators) and Ray Data's INFO lines (execution plans, "Data sink finished").  Errors stay loud: a
    failed task or training run raises on the driver, and warnings still print.  ``log_to_driver=True``
    (``mtrec pipeline --verbose``) streams all of it to the console as Ray does by default."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    # Quiet the progress bars' per-operator noise but keep the global one.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not log_to_driver:
        kwargs.setdefault("logging_level", logging.WARNING)  # the driver's "ray" logger ("Started a local Ray...")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, **kwargs)
    else:
        set_local_cluster_env(os.environ)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, **kwargs)
    if not log_to_driver:
        # CRITICAL, not ERROR: a failed read task (a corrupt Parquet page) makes Ray Data log a 150-line
        # traceback before the driver re-raises the task's own error, which the command then prints in one
        # line naming the file.  The traceback stays in the session's ray-data log (and --verbose shows it).
        _ray_data_console_level(logging.CRITICAL)


def _ray_data_console_level(level: int) -> None:
    """Ray Data logs to the session's ``ray-data`` log file and to the console; raise only the console's level."""
    import ray.data  # noqa: F401  (importing it configures the "ray.data" logger)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)


def ray_log_dir() -> Optional[str]:
    """The Ray session's log folder on this machine (``None`` if Ray is not initialised)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
    return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` (at least 1) torch threads, and give the process its count back after:
    scoring, ranking and ablation units in the driver must not leave it changed."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
