"""Bytes on the wire: how a message is pickled for another process.

``ForkingPickler`` carries torch's reductions, so tensors travel through
shared memory rather than inside the pickle.
"""

from __future__ import annotations

import io
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions)


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def loads(data: bytes | bytearray | memoryview) -> Any:
    return pickle.loads(data)
