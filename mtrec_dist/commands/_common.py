"""Flags and steps several commands share: where the prepared data is, which Ray cluster to use, and the
run's config with those flags applied."""
from __future__ import annotations

import argparse

RAY_ADDRESS_HELP = "Ray cluster to use (default: ray_address, else a local one)"


def add_prepared_flag(p: argparse.ArgumentParser, what: str = "prepared dataset") -> None:
    """``--prepared DIR``; ``what`` says which dataset the command means."""
    p.add_argument("--prepared", default=None, metavar="DIR",
                   help=f"{what} (default: prepare.output, else <run_dir>/prepared)")


def add_ray_address_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None, help=RAY_ADDRESS_HELP)


def load_run_config(args):
    """The run's config (``--config`` with ``--set`` overrides) with ``--ray-address`` applied."""
    from mtrec_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.ray_address:
        cfg.ray_address = args.ray_address
    return cfg


def prepared_dir(args, cfg) -> str:
    """``--prepared``, else ``prepare.output``, else ``<run_dir>/prepared``."""
    from mtrec_dist.data.prepare import default_paths

    return args.prepared or default_paths(cfg)[1]
