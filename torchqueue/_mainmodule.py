"""What is defined in ``__main__`` (a script, ``python -c``, a notebook) crossing to spawned workers.

Steps. Every worker gets its step pickled (``TravellingStep``), while its process starts:

- under spawn and forkserver, by reference, as multiprocessing itself would, when that works and
  ``__main__`` is a script or module the workers re-import (multiprocessing runs it again as
  ``__mp_main__`` in each): then a function of the script finds the script's globals there, a
  lock included, and the classes it returns are the script's own classes. Not what the script
  defines under ``if __name__ == "__main__":`` (the re-import skips that block: ``_defined_on_reimport``
  reads the script's source to tell);
- else by value with cloudpickle: lambdas, closures, and whatever a notebook or ``python -c``
  defined (a worker cannot import those). Workers of torchqueue's fork server (``"fork"``, see
  ``_forkserver``) re-import nothing, so there what ``__main__`` defines always goes by value, and
  what a forked child shares with its parent goes as ``_forkcopies`` rebuilds it: a lock as a new
  lock (not held: nobody holds it there), a ``numpy.memmap`` mapped again, a file open for reading
  opened again.

Tensors, semaphores and ``multiprocessing`` values inside a step go as multiprocessing sends them
to a process it starts: a CPU tensor's storage is moved to shared memory and its file descriptor
passed to that one worker.

Classes of outputs. A worker's class defined in ``__main__`` may not be the consumer's object of
that name (it came by value), or not exist in the worker's ``__main__`` at all (a notebook's).
Pickle's by-reference check would then refuse it. ``reduce_main_class`` sends such a class by
name, with its cloudpickled definition as a fallback: the receiver takes its own
``__main__.<name>`` when it has one (the consumer: your class, so ``isinstance`` holds), else
the definition (cloudpickle gives the same class object for the same definition every time).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import io
import os
import pickle
import sys
import threading
import types
import warnings
import weakref
from collections import ChainMap
from collections.abc import Iterator
from multiprocessing.context import get_spawning_popen, set_spawning_popen
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle

from torchqueue import _inherited
from torchqueue._forkcopies import AS_FORKED


def main_reimported() -> bool:
    """Whether spawned workers re-import ``__main__`` (a script file, or ``python -m``)."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and path.endswith(".py") and os.path.isfile(path)


def _defined_on_reimport(name: str) -> bool:
    """Whether re-importing ``__main__`` defines ``name``: its source binds it at the top level, outside
    ``if __name__ == "__main__":`` (``True`` where the source cannot be read: as multiprocessing assumes)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        names = _names_outside_guard(path, os.stat(path).st_mtime) if isinstance(path, str) else None
    except OSError:
        names = None
    return names is None or name in names


@functools.lru_cache(maxsize=4)
def _names_outside_guard(path: str, mtime: float) -> frozenset[str] | None:
    """The names a module's top level binds outside ``if __name__ == "__main__":`` blocks (``mtime``: a
    script edited since is read again); ``None`` if its source does not parse."""
    try:
        with open(path, "rb") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] = set()
    _bound(tree.body, names)
    return frozenset(names)


_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _bound(statements: list[ast.stmt], names: set[str]) -> None:
    for node in statements:
        if isinstance(node, ast.If) and _is_main_guard(node.test):
            _bound(node.orelse, names)
            continue
        # a definition binds its name, not what its body binds; other statements (assignments, if, try,
        # with, for) bind what they hold: more names, never fewer
        for child in [node] if isinstance(node, _DEFINITIONS) else ast.walk(node):
            if isinstance(child, _DEFINITIONS):
                names.add(child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).partition(".")[0] for alias in child.names)
            elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                names.add(child.id)


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"``, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    return {_operand(test.left), _operand(test.comparators[0])} == {"name __name__", "str __main__"}


def _operand(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return f"name {node.id}"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return f"str {node.value}"
    return ""


def step_bytes(step: Any, as_forked: bool) -> bytes:
    """``step`` pickled for a worker: by reference where the worker can import it, else by value.

    ``as_forked``: for a worker of the fork server, which imports no ``__main__``.
    """
    buffer = io.BytesIO()
    _StepPickler(buffer, as_forked).dump(step)
    return buffer.getvalue()


class _StepPickler(cloudpickle.Pickler):
    """cloudpickle, with multiprocessing's reductions (tensors through shared memory, semaphores),
    and what ``__main__`` defines at its top level by reference where workers re-import it."""

    def __init__(self, file: io.BytesIO, as_forked: bool) -> None:
        self._main_by_reference = not as_forked and main_reimported()
        tables = [ForkingPickler._extra_reducers, cloudpickle.Pickler.dispatch_table]  # type: ignore[attr-defined]
        self.dispatch_table = ChainMap(*([AS_FORKED] if as_forked else []), *tables)  # read by __init__
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)

    def reducer_override(self, obj: Any) -> Any:
        if (
            self._main_by_reference
            and isinstance(obj, (types.FunctionType, type))
            and obj.__module__ == "__main__"
            and _lookup(obj.__qualname__) is obj
            and _defined_on_reimport(obj.__qualname__.partition(".")[0])
        ):
            return NotImplemented  # pickle's own: by reference
        if isinstance(obj, types.ModuleType) and type(obj) is not types.ModuleType:
            # a module object of a class of its own, in sys.modules (torch.backends.cudnn): cloudpickle
            # takes modules of that exact type only, and a step using it did not pickle
            name = getattr(obj, "__name__", None)
            if isinstance(name, str) and sys.modules.get(name) is obj:
                return importlib.import_module, (name,)
        return super().reducer_override(obj)


class TravellingStep:
    """A step on its way to one worker: pickled while that worker's process starts.

    Its ``Process`` is pickled then, inside multiprocessing's start (``get_spawning_popen()`` is
    set), so what the step holds reaches this worker as multiprocessing allows at a start: each
    worker gets its own copy of a shared tensor's file descriptor (bytes pickled once for all
    workers would carry one, which only the first worker could take), and semaphores and
    ``Value``s may travel. The worker loads it in ``worker_main``, which reports a failure there
    as the worker's start-up failure. Start each worker inside ``starting()``.
    """

    def __init__(
        self,
        step: Any,
        name: str,
        method: str,
        as_forked: bool,
        data: bytes | None = None,
        settings: _inherited.Settings | None = None,
    ) -> None:
        self.step = step
        self.name = name
        self.method = method
        self.as_forked = as_forked
        self.data = data
        self.settings = settings  # the consumer's, for a worker of the fork server (``_inherited``)
        self._duplicates: list[int] = []

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around one worker's ``Process.start()``: then the fds passed for the step are closed here."""
        try:
            yield
        finally:
            duplicates, self._duplicates = self._duplicates, []
            for fd in duplicates:
                os.close(fd)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        popen = get_spawning_popen()
        if popen is not None:  # the step's own pickle must not repeat an fd the Process's passes too
            set_spawning_popen(_FreshFds(popen, self._duplicates))
        try:
            data = step_bytes(self.step, self.as_forked)
        except Exception as exc:
            raise TypeError(self._unpicklable(exc)) from exc
        finally:
            set_spawning_popen(popen)
        settings = _inherited.capture() if self.as_forked else None  # what a fork would have kept
        return TravellingStep, (None, self.name, self.method, self.as_forked, data, settings)

    def _unpicklable(self, exc: Exception) -> str:
        """Why the step could not go to its worker, and what to change: a step's function says what it
        stands for in ``travels_as`` (a loader's fetch: the dataset, collate_fn and worker_init_fn)."""
        what = getattr(getattr(self.step, "fn", None), "travels_as", None)
        if what is None:
            subject, it, advice = f"step {self.name!r}", "it", "Make its function and what it refers to picklable"
        else:
            subject, it = what, "them"
            advice = "Make them picklable (open connections and files lazily: in __getitem__, or in worker_init_fn)"
        text = (
            f"{subject} cannot be pickled for the {self.method!r} start method: {exc}. {advice}, and create the "
            "multiprocessing objects they hold with multiprocessing.get_context('spawn')"
        )
        if self.as_forked:
            others = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
            text += (
                f". Under 'fork' too: while other threads run in this process ({others}), workers start from "
                f'torchqueue\'s fork server, and get {it} pickled (docs/concepts.md, "How workers start")'
            )
        return text

    def load(self) -> Any:
        """In the worker: the step (first the consumer's settings, for a worker of the fork server)."""
        if self.data is None:  # forked from the consumer's process: the step itself came along
            return self.step
        if self.settings is None:
            return cloudpickle.loads(self.data)
        self.settings.apply()
        with warnings.catch_warnings():  # a forked worker imports nothing: no warning of the step's imports
            warnings.simplefilter("ignore")
            step = cloudpickle.loads(self.data)
        self.settings.apply_warnings()
        return step


class _FreshFds:
    """The starting process's popen as a step's pickle sees it: every fd it passes is a new duplicate
    (spawn refuses an fd passed twice, and the step's pickle cannot see what the Process's passes)."""

    def __init__(self, popen: Any, duplicates: list[int]) -> None:
        self._popen = popen
        self._duplicates = duplicates
        self.DupFd = popen.DupFd

    def duplicate_for_child(self, fd: int) -> Any:
        duplicate = os.dup(fd)
        self._duplicates.append(duplicate)
        return self._popen.duplicate_for_child(duplicate)


def _lookup(qualname: str) -> Any:
    found: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


_definitions: weakref.WeakKeyDictionary[type, tuple[bytes, str]] = weakref.WeakKeyDictionary()  # and digests
_loaded: dict[bytes, type] = {}  # a receiver's classes built from definitions
_read: dict[str, type] = {}  # ... from the files that hold them
_written: set[str] = set()  # the definitions' files this process wrote (or found written)
_in_worker = False


def in_worker_process() -> None:
    """Mark this process as a worker's: its classes of ``__main__`` go by reference where it has them."""
    global _in_worker
    _in_worker = True


def reduce_main_class(cls: type, directory: str | None = None) -> tuple[Any, tuple[str, Any]] | None:
    """A reduction for a class of ``__main__`` that its receiver may not find by reference, else ``None``.

    A worker finds its own classes by reference in every process it sends to (the consumer, workers
    started as it was). Your process cannot tell: a worker of the fork server, or a spawned worker of a
    notebook, has no ``__main__.<name>`` of yours, so your elements' classes go by name with their
    definition (a namedtuple of chunk descriptors your script defines, as a forked worker would have it).
    The receiver takes its own ``__main__.<name>`` where it has one. With a pipeline's ``directory``
    the definition is written there once, and each message names its file: a definition takes what the
    class's methods refer to with it (a large table of your script's), too much to send with every
    element. One whose definition cannot be pickled goes by reference."""
    if cls.__module__ != "__main__" or "<locals>" in cls.__qualname__:
        return None
    if _in_worker and _lookup(cls.__qualname__) is cls:
        return None
    known = _definitions.get(cls)
    if known is None:
        try:
            definition = cloudpickle.dumps(cls)
        except Exception:  # noqa: BLE001 (cloudpickle raises many kinds): as pickle would send it
            return None
        known = _definitions[cls] = definition, hashlib.sha1(definition).hexdigest()
    if directory is not None:
        with contextlib.suppress(OSError):  # no room for it: it goes with the message
            return _main_class_in_file, (cls.__qualname__, _stored(directory, *known))
    return _main_class, (cls.__qualname__, known[0])


def _stored(directory: str, definition: bytes, digest: str) -> str:
    """The file in ``directory`` that holds ``definition`` (written by the first sender; the same
    definition is the same file)."""
    path = os.path.join(directory, f"class-{digest}")
    if path not in _written:
        if not os.path.exists(path):
            partial = f"{path}.{os.getpid()}.{threading.get_ident()}"
            with open(partial, "wb") as file:
                file.write(definition)
            os.replace(partial, path)  # whole or not there: another sender may write it too
        _written.add(path)
    return path


class MainClassPickler(pickle.Pickler):
    """A pickler that sends the classes of ``__main__`` as ``reduce_main_class`` says (outputs, exceptions)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type):
            return reduce_main_class(obj) or NotImplemented
        return NotImplemented


def _main_class(qualname: str, definition: bytes) -> type:
    return _own_class(qualname) or _built(definition)


def _main_class_in_file(qualname: str, path: str) -> type:
    own = _own_class(qualname)
    if own is not None:
        return own
    cls = _read.get(path)
    if cls is None:
        with open(path, "rb") as file:
            cls = _read[path] = _built(file.read())
    return cls


def _own_class(qualname: str) -> type | None:
    """The receiver's own ``__main__.<qualname>``, if it has that class."""
    found = _lookup(qualname)
    return found if isinstance(found, type) else None


def _built(definition: bytes) -> type:
    """The class a definition gives (built once per receiver)."""
    cls = _loaded.get(definition)
    if cls is None:
        cls = _loaded[definition] = cloudpickle.loads(definition)
    return cls
