"""A message that does not unpickle on arrival: the step's error in the element's place.

A value can pickle and yet fail to rebuild (a ``__reduce__`` whose function raises, a class
the receiver cannot import). Such a message is not lost, nor does it kill the worker that
reads it: an envelope pickles its position first (``Envelope.__reduce__``), so the position
is read from the pickle's opcodes, without running any of its code, and the exception travels
in the element's place (in each element's place, for a bundle), naming the step and where it
happened, as an exception of the step function would.
"""

from __future__ import annotations

import pickletools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torchqueue._messages import Bundle, Envelope, Failure, Skipped
from torchqueue._origins import UNTRACKED
from torchqueue._serialize import pickle_part

_INTS = frozenset({"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"})


def position(data: bytes | bytearray) -> tuple[int, int, int, int, int] | None:
    """``(epoch, seq, part, nparts, bundled)`` of a message's envelope, read from its pickle's
    opcodes (``None`` if it holds no envelope)."""
    try:
        ops = pickletools.genops(bytes(pickle_part(data)))
        names = []
        for opcode, arg, _ in ops:  # the reducing function's global, up to its arguments' MARK
            if opcode.name == "MARK":
                break
            names.append(arg)
        if "_envelope" not in names:
            return None
        ints = []
        for opcode, arg, _ in ops:
            if opcode.name not in _INTS:
                return None
            ints.append(arg)
            if len(ints) == 5:
                return ints[0], ints[1], ints[2], ints[3], ints[4]
    except Exception:  # a truncated or foreign pickle: no position to tell
        return None
    return None


def in_place(
    data: bytes | bytearray, exc: Exception, fail: Callable[[Exception], Failure | Skipped], where: str
) -> Envelope | None:
    """The envelope of ``data``, which did not unpickle (``exc``), with ``fail(exc)`` as its payload
    (as each item of a bundle); a ``Failure`` also says ``where`` it happened and which element.
    ``None`` when ``data`` holds no readable position."""
    found = position(data)
    if found is None:
        return None
    epoch, seq, part, nparts, bundled = found
    elements = f"elements {seq}-{seq + bundled - 1}" if bundled else f"element {seq}"
    payload: Any = fail(exc)
    if isinstance(payload, Failure):
        message = f"{payload.message} (raised {where}: {elements} of epoch {epoch}){_main_hint(exc)}"
        payload = replace(payload, message=message)
    if bundled:
        payload = Bundle([payload] * bundled)
    return Envelope(epoch, seq, part, nparts, payload, UNTRACKED)  # its origin is not readable either


def _main_hint(exc: Exception) -> str:
    """What to do when a class of your script's ``__main__`` did not reach the worker: it goes by value
    (``_mainmodule.reduce_main_class``) unless cloudpickle cannot pickle its definition."""
    if not (isinstance(exc, AttributeError) and "on <module '__main__'" in str(exc)):
        return ""
    return (
        ". This worker has no __main__ of your script (torchqueue's fork server, or a notebook's spawned "
        "worker), and the class could not be sent by value (cloudpickle could not pickle its definition: "
        "a lock or an open file among its class attributes?): define it in a module of its own that your "
        "script imports"
    )
