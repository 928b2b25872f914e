"""The `mtrec` subcommands, one module each (listed in :data:`mtrec_dist.cli.COMMANDS`, order = ``--help``).

A command module defines ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status); the module's
name with ``_`` as ``-`` is the subcommand, and its docstring is the help (first paragraph: the summary in
``mtrec --help`` and the description in ``mtrec <command> --help``; the rest: shown after the options), so it
is written for users.  :mod:`mtrec_dist.cli` adds the common ``--config``/``--set`` and imports each module
only to build its parser, so a command imports its heavy dependencies inside ``run``.
Commands are thin: each calls one library function (``prepare_dataset``, ``train_recommender``,
``run_pipeline``, ...) and prints its result.
"""
