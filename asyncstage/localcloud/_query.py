"""EC2's Query requests: list parameters as EC2 reads them, before moto sees them.

EC2 takes a list's members at any non-negative index, with gaps, in any order, and
reads them in the order of their indexes: ``ResourceId.0``, ``ResourceId.7`` and
``ResourceId.3`` are the list ``[.0, .3, .7]`` (a widely used client numbers from 0).
moto reads ``.1``, ``.2``, ... and stops at the first gap, so a list that starts at 0
or has a gap would be answered ``MissingParameter`` or lose members. :func:`renumber`
turns every list, nested ones too (``Filter.N.Value.M``, ``BlockDeviceMapping.N.Ebs``,
``TagSpecification.N.Tag.M.Key``), into moto's 1, 2, 3 ... in EC2's order.

EC2 also takes a filter's one value as ``Filter.N.Value`` (older clients, the Perl
VM::EC2 among them, send it so); it becomes ``Filter.N.Value.1``.

EC2 refuses a filter of more than 200 values (``FilterLimitExceeded``), which moto
takes: :func:`filter_values_refused`. (Whether EC2 counts the values of one filter or
of all a request's filters is not written down; what clients have hit is one filter of
ids, and the cloud counts per filter, refusing nothing EC2 may take.)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

_INDEX = re.compile(r"\d+")
_ONE_VALUE = re.compile(r"Filter\.\d+\.Value")
_FILTER_VALUE = re.compile(r"Filter\.(\d+)\.Value(?:\.\d+)?")
FILTER_VALUES = 200
"""The values EC2 takes in one filter."""


def filter_values_refused(params: Mapping[str, str]) -> tuple[str, str] | None:
    """EC2's (code, message) when a filter of the request names more than
    :data:`FILTER_VALUES` values (None: none does)."""
    counts = Counter(m[1] for k in params if (m := _FILTER_VALUE.fullmatch(k)))
    if all(n <= FILTER_VALUES for n in counts.values()):
        return None
    return (
        "FilterLimitExceeded",
        f"The maximum number of filter values specified on a single call is {FILTER_VALUES}",
    )


def renumber(params: Mapping[str, str]) -> dict[str, str]:
    """``params`` with every list numbered 1, 2, 3 ... in the order of its indexes.

    A parameter name's numeric parts are list indexes in EC2's Query protocol (EC2 has
    no maps in its requests): the members of one list are the names that agree up to
    that index, and they are sorted by its value (then by its text, so that ``1`` and
    ``01``, which EC2 would not both be sent, stay two members rather than one).
    """
    flat = {(f"{k}.1" if _ONE_VALUE.fullmatch(k) else k): v for k, v in params.items()}
    paths = {name: name.split(".") for name in flat}
    renamed = {name: list(parts) for name, parts in paths.items()}
    depth = max((len(parts) for parts in paths.values()), default=0)
    for level in range(depth):
        # members of one list: same (already renumbered) prefix, a number at this level
        lists: dict[tuple[str, ...], set[str]] = {}
        for parts in renamed.values():
            if level < len(parts) and _INDEX.fullmatch(parts[level]) and level > 0:
                lists.setdefault(tuple(parts[:level]), set()).add(parts[level])
        for prefix, indexes in lists.items():
            order = sorted(indexes, key=lambda i: (int(i), i))
            new = {old: str(n) for n, old in enumerate(order, start=1)}
            for parts in renamed.values():
                if tuple(parts[:level]) == prefix and level < len(parts) and parts[level] in new:
                    parts[level] = new[parts[level]]
    return {".".join(renamed[name]): value for name, value in flat.items()}
