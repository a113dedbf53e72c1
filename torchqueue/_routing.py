"""Items a stream step routes without decoding them: the segments as an object store.

A RepackStep, UnpackStep or join only regroups the items of the elements it reads. So the steps
writing to one send each item of a list element as a pickle of its own, the tensors of all of
them in the message's one segment (``_serialize.dumps(..., items=True)``), and the stream step
reads the message without mapping the segment or unpickling an item: each item is an
``EncodedItem``, its pickle and the ``Source`` segment it refers to. When the stream step sends
its outputs on, an ``EncodedItem`` is pickled as a reference: the message lists the segments its
items come from, each under a name of its own (a hard link made for that message), and only the
step that calls a user function on the item (or the consumer) maps the segments and unpickles
it. The items' bytes are written once, by the step that made them, and read once.

Names and lifetimes. A segment is one file; each name of it is removed by exactly one process:

- the stream step holds its ``Source`` while any of its items is pending; once none is (all sent
  on, or dropped with an abandoned epoch), it gives the original name back to its sender, as a
  receiver does (renamed ``<name>.r`` for reuse; a small one removed), or removes the link it
  got the segment by;
- each message sent on carries links of its own (``<name>.<n>``), which its receiver removes as
  it maps them.

A sender reuses a segment only when nobody has it open or mapped (a write lease) and it has no
other name (``st_nlink == 1``, under the lease: while the lease is held nobody can open it, and
only a process that has it mapped makes links): so never while an item in it is on its way.
A pipeline's directory holds every name: closing it, or its workers' exit after the consumer
died, removes what is left.
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any

_links = itertools.count()


class Source:
    """A received segment a stream step holds items of, unmapped."""

    __slots__ = ("path", "size", "table", "__weakref__")

    def __init__(self, path: str, size: int, table: list[Any], link: bool, reuse_min: int) -> None:
        self.path = path
        self.size = size
        self.table = table
        weakref.finalize(self, _give_back, path, link or size < reuse_min)

    def link(self) -> str:
        """A new name of the segment, for one message that refers to it."""
        path = f"{self.path}.{os.getpid()}-{next(_links)}"
        os.link(self.path, path)
        return path


def _give_back(path: str, remove: bool) -> None:
    """The stream step holds no item of the segment any more: remove its name, or mark it received."""
    try:
        if remove:
            os.unlink(path)
        else:
            os.rename(path, path + ".r")
    except OSError:  # the pipeline closed: its directory is gone
        pass


class EncodedItem:
    """An item as its sender pickled it: ``blob`` refers to blocks of ``source``."""

    __slots__ = ("source", "blob")

    def __init__(self, source: Source, blob: bytes) -> None:
        self.source = source
        self.blob = blob

    def __repr__(self) -> str:
        return f"EncodedItem({len(self.blob)} bytes in {os.path.basename(self.source.path)})"
