"""What is defined in ``__main__`` (a script, ``python -c``, a notebook) crossing to spawned workers.

Steps. Under spawn and forkserver, a worker gets its step pickled (``step_bytes``):

- by reference, as multiprocessing itself would, when that works and ``__main__`` is a script
  or module the workers re-import (multiprocessing runs it again as ``__mp_main__`` in each):
  then a function of the script finds the script's globals there, a lock included, and the
  classes it returns are the script's own classes;
- else by value with cloudpickle: lambdas, closures, and whatever a notebook or ``python -c``
  defined (a worker cannot import those).

Classes of outputs. A worker's class defined in ``__main__`` may not be the consumer's object of
that name (it came by value), or not exist in the worker's ``__main__`` at all (a notebook's).
Pickle's by-reference check would then refuse it. ``reduce_main_class`` sends such a class by
name, with its cloudpickled definition as a fallback: the receiver takes its own
``__main__.<name>`` when it has one (the consumer: your class, so ``isinstance`` holds), else
the definition (cloudpickle gives the same class object for the same definition every time).
"""

from __future__ import annotations

import os
import pickle
import sys
import weakref
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle


def _main_reimported() -> bool:
    """Whether spawned workers re-import ``__main__`` (a script file, or ``python -m``)."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and path.endswith(".py") and os.path.isfile(path)


def step_bytes(step: Any) -> bytes:
    """``step`` pickled for a spawned worker: by reference where the worker can import it, else by value."""
    if _main_reimported():
        try:
            return bytes(ForkingPickler.dumps(step, pickle.HIGHEST_PROTOCOL))
        except Exception:  # a lambda, a closure, a local class: by value
            pass
    return cloudpickle.dumps(step)


def _lookup(qualname: str) -> Any:
    found: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


_definitions: weakref.WeakKeyDictionary[type, bytes] = weakref.WeakKeyDictionary()


def reduce_main_class(cls: type) -> tuple[Any, tuple[str, bytes]] | None:
    """A reduction for a class of ``__main__`` that pickle cannot send by reference, else ``None``."""
    if cls.__module__ != "__main__" or "<locals>" in cls.__qualname__ or _lookup(cls.__qualname__) is cls:
        return None
    definition = _definitions.get(cls)
    if definition is None:
        definition = _definitions[cls] = cloudpickle.dumps(cls)
    return _main_class, (cls.__qualname__, definition)


class MainClassPickler(pickle.Pickler):
    """A pickler that sends the classes of ``__main__`` as ``reduce_main_class`` says (outputs, exceptions)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type):
            return reduce_main_class(obj) or NotImplemented
        return NotImplemented


def _main_class(qualname: str, definition: bytes) -> type:
    found = _lookup(qualname)
    if isinstance(found, type):
        return found
    return cloudpickle.loads(definition)
