"""The ``mtrec`` command line: one subcommand per module in :mod:`mtrec_dist.commands`.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; its name (underscores as
hyphens) is the subcommand and its docstring the help: the first paragraph is the one-line summary in
``mtrec --help`` and the description in ``mtrec <command> --help``, the other paragraphs follow the options.
Common options (``--config``, ``--set``) are added here so every command reads config the same way.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mtrec_dist.config import ConfigError

# Order = order in --help.  Modules are imported lazily so `mtrec --help` stays fast.
COMMANDS = [
    "simulate", "prepare", "inspect", "train_reward", "score_rewards", "train_rec", "evaluate",
    "pipeline", "ablate", "retrain", "plan", "bench",
]


def _load(name: str):
    try:
        return importlib.import_module(f"mtrec_dist.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"mtrec_dist.commands.{name}":
            return None
        raise


def _help_texts(doc: str | None) -> tuple[str, str | None]:
    """A command module's docstring as (summary, details): its first paragraph and the rest, white space folded
    (``python -OO`` strips docstrings: then no help)."""
    summary, _, details = (doc or "").strip().partition("\n\n")
    return " ".join(summary.split()), " ".join(details.split()) or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtrec",
        description="mtrec-dist: learn users' mental reward from behaviour logs (QR-IQL) and train "
        "reward-guided recommenders, distributed on Ray + TorchRec.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        summary, details = _help_texts(mod.__doc__)
        # argparse %-formats help= (so a literal % is written %%) but not description= or epilog=
        p = sub.add_parser(name.replace("_", "-"), help=summary.replace("%", "%%"), description=summary,
                           epilog=details)
        p.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set reward.gamma=0.8 (repeatable)")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"mtrec {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        bare_path = isinstance(e, FileNotFoundError) and len(e.args) == 1  # FileNotFoundError(path) reads as the path
        print(f"mtrec {args.command}: error: {'no such file or directory: ' if bare_path else ''}{e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
