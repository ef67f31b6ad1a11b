"""Fault for blockcopy: the receiver flips a bit of every record it writes."""

import __main__ as _copier

_put = _copier.Writer.put


def _flipped(self, off, data):
    _put(self, off, bytes([data[0] ^ 1]) + data[1:])


_copier.Writer.put = _flipped
