"""MkDocs hook: the docstrings use reST roles (:class:`Server`); show them as plain code.

mkdocstrings renders a docstring's ``:class:`~pkg.Server``` as the text ``:class:``
followed by the code ``~pkg.Server``; this drops the role prefix and the tilde.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj|const|term):<code>~?")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("<code>", html)
