"""The ``asyncstage`` command line: :mod:`~asyncstage.cli.parser` (the parser and the
dispatch), :mod:`~asyncstage.cli.commands`, :mod:`~asyncstage.cli.common` (a command's
manager and names) and :mod:`~asyncstage.cli.daemon` (the local cloud's daemon)."""

from asyncstage.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
