"""The ``asyncstage`` command shows its own warnings only, not its dependencies'.

asyncssh, for one, warns on import that the cryptography package deprecates DSA
(``CryptographyDeprecationWarning``), which a user of the command can do nothing about.
The package imports asyncssh before any code of :mod:`asyncstage.cli` runs, so the
filter is put in place when the package is imported as the command (the console script
``asyncstage`` or ``python -m asyncstage.cli``), and only then: a program that imports
the library keeps every warning, and ``-W`` or ``PYTHONWARNINGS`` still win.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

__all__ = ["hide_dependency_warnings", "is_command_line"]


def is_command_line() -> bool:
    """Whether this process runs the ``asyncstage`` command (as far as its argv tells)."""
    if Path(sys.argv[0] if sys.argv else "").name == "asyncstage":
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return ("-m", "asyncstage.cli") in itertools.pairwise(argv)


def hide_dependency_warnings() -> None:
    """Ignore warnings raised outside asyncstage, unless ``-W``/``PYTHONWARNINGS`` say."""
    if sys.warnoptions:
        return
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"asyncstage(\.|$)")
