"""The ``tide`` command line.

Each subcommand lives in its own module of this package with a ``register(subparsers)``
function that adds its parser and sets ``func``. ``func(args)`` returns the process exit
code. Commands that compute figures accept ``--json`` and then print one JSON object as
the last line of standard output (``tide.cli.common.emit``).
"""
