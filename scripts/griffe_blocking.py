"""A Griffe extension for the docs: the generated blocking methods show the docstrings of
their async methods.

``asyncstage/blocking.py`` is written without method docstrings; at import time
``_blocking_runtime._register`` gives each method its async twin's. mkdocstrings reads
the source instead (nothing is imported), so this extension does the same there: for each
class of ``asyncstage.blocking`` with an ``_Async<Name>`` import, every method without a
docstring gets the docstring of the async class's member of that name.
"""

from __future__ import annotations

from typing import Any

import griffe

MODULE = "asyncstage.blocking"


class BlockingDocstrings(griffe.Extension):
    """Docstrings of the blocking twins' methods, taken from the async classes."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != MODULE.partition(".")[0]:
            return
        blocking = pkg.get_member(MODULE.partition(".")[2])
        for cls in blocking.classes.values():
            twin = blocking.members.get(f"_Async{cls.name}")
            if twin is None:
                continue
            source = twin.final_target if isinstance(twin, griffe.Alias) else twin
            for name, member in cls.members.items():
                if not member.is_function or member.docstring is not None:
                    continue
                doc = source.all_members[name].docstring
                if doc is not None:
                    member.docstring = griffe.Docstring(
                        doc.value,
                        lineno=doc.lineno,
                        endlineno=doc.endlineno,
                        parent=member,
                        parser=doc.parser,
                        parser_options=doc.parser_options,
                    )
