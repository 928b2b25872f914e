"""Shared entry point of the Ray Job scripts in ``jobs/`` (one thin file per ``mtrec`` subcommand).

    python jobs/<name>.py --storage-path PATH_OR_URI [--config FILE] [--set key=value ...] [more mtrec flags]

* ``--storage-path`` (required) is where the job writes: a local path that every node can reach (NFS, or
  the head's disk for a one-node cluster) or a cloud URI (``s3://``, ``gs://``).  For the pipeline
  commands it becomes ``--set run_dir=<storage-path>`` (so prepared data, checkpoints and reports all land
  under it); ``plan`` writes ``<storage-path>/plan.json``.
* Everything else is passed to ``mtrec <name>`` unchanged.
* Exit status: 0 on success; the command's own non-zero status on failure (2 = bad arguments or config,
  3 = does not fit, 1 = other errors), always with a ``[job <name>] FAILED`` line saying why.

Inside ``ray job submit --working-dir .`` the job runs in an unpacked copy of the checkout.  A relative
``--storage-path`` would point into that temporary copy and vanish with it, so it is refused there.  The
checkout's root goes first on ``sys.path`` so the uploaded ``mtrec_dist`` is the one that runs (Ray also
puts the working dir on ``PYTHONPATH`` for the job's workers).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

# How each command receives the storage path.
def _run_dir(storage: str) -> List[str]:
    return ["--set", f"run_dir={storage}"]


def _plan_output(storage: str) -> List[str]:
    return ["--output", storage.rstrip("/") + "/plan.json"]


STORAGE_ARGS: Dict[str, Callable[[str], List[str]]] = {"plan": _plan_output}


def in_ray_job() -> bool:
    """True inside the driver of a submitted Ray Job (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _split_storage(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    storage, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--storage-path":
            if i + 1 >= len(argv):
                raise ValueError("--storage-path needs a value")
            storage, i = argv[i + 1], i + 2
            continue
        if a.startswith("--storage-path="):
            storage, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    return storage, rest


def _normalise_storage(storage: str) -> str:
    if "://" in storage:
        return storage
    p = Path(storage).expanduser()
    if not p.is_absolute():
        if in_ray_job():
            raise ValueError(
                f"--storage-path {storage!r} is relative: inside a Ray job it would land in the job's temporary "
                "copy of the working dir and be lost. Pass an absolute path every node can reach, or a URI "
                "such as s3://bucket/mtrec/run1")
        p = Path.cwd() / p
    return str(p)


def _usage(command: str) -> str:
    return (f"usage: python jobs/{command.replace('-', '_')}.py --storage-path PATH_OR_URI [--config FILE] "
            f"[--set key=value ...] [mtrec {command} flags]\n"
            f"Runs `mtrec {command}` as a Ray Job entry point; see jobs/_entry.py and docs/cluster.md.")


def main(command: str, argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tag = f"[job {command}]"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    elif sys.path[0] != str(ROOT):
        sys.path.remove(str(ROOT))
        sys.path.insert(0, str(ROOT))
    if any(a in ("-h", "--help") for a in argv):
        print(_usage(command))
        print(f"\nFlags of `mtrec {command}`:\n")
        from mtrec_dist import cli

        try:
            return cli.main([command, "--help"])
        except SystemExit as e:
            return int(e.code or 0)
    module = command.replace("-", "_")
    if importlib.util.find_spec(f"mtrec_dist.commands.{module}") is None:
        print(f"{tag} FAILED: `mtrec {command}` is not available in this version of mtrec-dist "
              f"(no module mtrec_dist/commands/{module}.py)", file=sys.stderr)
        return 2
    try:
        storage, rest = _split_storage(argv)
        if storage is None:
            raise ValueError("--storage-path PATH_OR_URI is required (where the job writes its outputs)")
        storage = _normalise_storage(storage)
        extra = STORAGE_ARGS.get(command, _run_dir)(storage)
        if command not in STORAGE_ARGS and any(a.startswith("run_dir=") for a in rest):
            raise ValueError("pass the output location with --storage-path, not --set run_dir=...")
    except ValueError as e:
        print(f"{tag} FAILED: {e}\n{_usage(command)}", file=sys.stderr)
        return 2

    import mtrec_dist
    from mtrec_dist import cli

    mtrec_argv = [command, *rest, *extra]
    print(f"{tag} mtrec_dist from {Path(mtrec_dist.__file__).resolve().parent}", flush=True)
    print(f"{tag} storage: {storage}", flush=True)
    print(f"{tag} running: mtrec {' '.join(mtrec_argv)}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = cli.main(mtrec_argv)
    except SystemExit as e:  # argparse errors and explicit exits
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print(f"{tag} FAILED: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - report anything, with its traceback, then fail the job
        traceback.print_exc()
        print(f"{tag} FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    if rc == 0:
        print(f"{tag} SUCCEEDED in {dt:.1f} s; outputs under {storage}", flush=True)
    else:
        print(f"{tag} FAILED after {dt:.1f} s: `mtrec {command}` exited with status {rc} "
              "(see the messages above)", file=sys.stderr)
    return int(rc)


def run_job(command: str) -> None:
    """Entry of every ``jobs/<name>.py``: run ``mtrec <command>`` and exit with its status."""
    sys.exit(main(command))
