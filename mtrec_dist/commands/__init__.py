"""The `mtrec` subcommands, one module each (listed in :data:`mtrec_dist.cli.COMMANDS`, order = ``--help``).

A command module defines ``NAME`` (the subcommand), ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status); :mod:`mtrec_dist.cli` adds the common ``--config``/``--set`` and
imports each module only to build its parser, so a command imports its heavy dependencies inside ``run``.
Commands are thin: each calls one library function (``prepare_dataset``, ``train_recommender``,
``run_pipeline``, ...) and prints its result.
"""
