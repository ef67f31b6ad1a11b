"""``python -m asyncstage.cli``: the ``asyncstage`` command."""

import sys

from asyncstage.cli.parser import main

sys.exit(main())
