"""The feeder thread: reads the queued iterables lazily and sends their elements.

It runs in the consumer's process (the input is an iterable there). Per
epoch it assigns positions 0, 1, ... to the elements, takes one credit per
message (this bounds what is in flight, see ``_plan``), sends single
elements or, when ``BundlePolicy`` says it pays, bundles of them, and ends
the epoch with ``EndOfEpoch``. Only in-memory inputs (lists, tuples, ranges,
other ``Sequence``s) are bundled: reading them never blocks, so an element
never waits in a half-filled bundle while the input waits for something
(perhaps for the consumer, which would then wait for that element). An exception raised by the input is sent in
its place, in order, and ends that epoch's input; its message says it came from the input. An epoch the consumer
abandoned stops being read at once.

An input that blocks in ``next()`` (a socket, a queue another thread fills) cannot be interrupted. If
the consumer abandons its epoch meanwhile, the thread is retired (``take_over``): a new thread ends
that epoch and feeds the next ones, and the old one, once ``next()`` returns, drops what it got and
exits. So a blocked input holds back its own epoch, never the next; unless the next epoch reads the
same iterator (a stream read in pieces), which is then read once the retired thread left it.

A first PackStep runs here (``packing``, see ``_plan``): the feeder sends the lists it makes, at
positions of their own, and counts the elements in and lists out on the step's stats row; an
error of the input names the element's position in the input.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from torchqueue._bundle import BundlePolicy
from torchqueue._channel import POLL_S, Stopped, wait_acquire
from torchqueue._messages import Bundle, EndOfEpoch, Envelope
from torchqueue._meter import Meter
from torchqueue._origins import Resumed
from torchqueue._transport import Emitter
from torchqueue.errors import capture_input
from torchqueue.stats import Field
from torchqueue.steps import StreamStep

_RECHECK_EVERY = 16
"""Messages between two looks at the downstream figures for the bundle policy."""


class Feeder:
    """Body of the feeder thread (``run``); ``Stopped`` from a blocking call ends it."""

    def __init__(
        self,
        epochs: queue.Queue[tuple[int, Iterator[Any], bool, Resumed | None] | None],
        emitter: Emitter,
        credits: Any,
        alive: Callable[[], bool],
        cancelled: Callable[[int], bool],
        downstream: Callable[[], tuple[float, float]] | None,
        max_bundle: int = 1,
        packing: tuple[StreamStep, Meter] | None = None,
    ) -> None:
        """``downstream()`` gives (step seconds per element, bytes per element out); ``None``: never bundle.

        ``credits`` holds one credit per element that may be in flight; a bundle takes one per element,
        and holds at most ``max_bundle`` of them, so that capacities count elements, bundled or not."""
        self._epochs = epochs
        self._emitter = emitter
        self._credits = credits
        self._max_bundle = max(1, max_bundle)
        self._alive = alive
        self._cancelled = cancelled
        self._downstream = downstream
        self._policy = BundlePolicy()
        self._sent = 0
        self._packing = packing
        self._resume: Resumed | None = None  # the restart of the epoch being fed
        self.input_s = 0.0  # seconds in the input's ``next`` (the packing's included)
        self.held_s = 0.0  # seconds waiting for a credit: as many elements in flight as the queues allow
        self.held_since: float | None = None  # when the wait for a credit going on began
        self._reading: tuple[int, Iterator[Any]] | None = None  # the epoch and input in next() (it may block)
        self._position = 0  # the next position of the epoch being fed
        self._turn = threading.Lock()  # the attributes above and below, between the threads
        self._generation = 0  # the thread that feeds: the others were retired while blocked in next()
        self._retired_in: dict[int, threading.Event] = {}  # id(input) -> set once its retired thread left it

    def take_over(self, abandoned: int) -> tuple[int, int] | None:
        """From the consumer, which abandoned epochs up to ``abandoned``: if the thread is blocked in the
        input's ``next()`` of one of them, retire it and return (that epoch, its next position), for a new
        thread's ``run`` to end; else ``None`` (the thread sees the cancel at its next element)."""
        with self._turn:
            if self._reading is None or self._reading[0] > abandoned:
                return None
            (epoch, source), self._reading = self._reading, None
            self._generation += 1
            self._retired_in[id(source)] = threading.Event()
            return epoch, self._position

    def run(self, left: tuple[int, int] | None = None) -> None:
        """Feed the queued epochs; ``left``: first end that epoch at that position (``take_over``)."""
        with self._turn:
            generation = self._generation
        if left is not None:
            self._take_credit()
            self._emitter.emit(left[0], left[1], EndOfEpoch(left[1]))
        try:
            self._run(generation)
        except _Retired:
            pass

    def _run(self, generation: int) -> None:
        idle = True
        while self._alive():
            try:
                queued = self._epochs.get(timeout=POLL_S)
            except queue.Empty:
                if not idle:  # an epoch was fed since the last look: free what it left for reuse
                    self._emitter.idle()
                    idle = True
                continue
            if queued is None:  # the pipeline is closing
                return
            self._feed(*queued, generation)
            idle = False

    def read_next(self, source: Iterator[Any], epoch: int, generation: int) -> Any:
        """The input's next element (``next``'s exception); ``_Retired`` if it was taken over meanwhile,
        ``StopIteration`` if the epoch was abandoned (looked at here, where ``take_over`` cannot miss it).
        An iterator a retired thread is still inside is read once it left (one thread in it at a time)."""
        while True:
            with self._turn:
                if self._cancelled(epoch):
                    raise StopIteration
                busy = self._retired_in.get(id(source))
                if busy is None:
                    self._reading = epoch, source
                    break
            if not self._alive():
                raise Stopped
            busy.wait(POLL_S)
        try:
            return next(source)
        finally:
            with self._turn:
                if self._generation != generation:  # what it returned or raised belongs to an abandoned epoch
                    self._retired_in.pop(id(source)).set()
                    raise _Retired  # noqa: B012 (the retired thread drops it)
                self._reading = None

    def _feed(
        self, epoch: int, iterator: Iterator[Any], in_memory: bool, resume: Resumed | None, generation: int
    ) -> None:
        """Feed one epoch; ``resume``: it restarts there, its first ``resume.start`` positions left out (read,
        and packed where the feeder packs, but not sent), and its first element carries it (``_origins``)."""
        iterator = _Input(self, iterator, epoch, generation)
        read = None  # packing: the input, counted (positions then number lists, not elements)
        if self._packing is not None:
            read = _Counted(iterator, self._packing[1])
            iterator = self._packing[0].stream(read)
        self._resume = resume
        if resume is not None and resume.start:
            iterator = itertools.islice(iterator, resume.start, None)
        seq = self._position = 0
        pending: list[Any] = []
        last = time.perf_counter()
        while not self._cancelled(epoch):
            try:
                element = next(iterator)
            except StopIteration:
                break
            except _Retired:
                raise
            except BaseException as exc:  # the user's input raised: deliver it in its place
                seq = self._send(epoch, seq, pending)
                pending = []
                seq = self._send(epoch, seq, [capture_input(exc, epoch, seq if read is None else read.count)])
                break
            now = time.perf_counter()
            self._policy.observe_input(now - last)
            self.input_s += now - last
            if self._packing is not None:
                self._packing[1].add(Field.OUT, 1)
            pending.append(element)
            if not in_memory or len(pending) >= min(self._policy.limit, self._max_bundle):
                seq = self._send(epoch, seq, pending)
                pending = []
                now = time.perf_counter()  # sending is not the input's time
            last = now
        seq = self._send(epoch, seq, pending)
        self._take_credit()
        self._emitter.emit(epoch, seq, EndOfEpoch(seq))

    def _take_credit(self) -> None:
        start = self.held_since = time.perf_counter()
        try:
            wait_acquire(self._credits, self._alive)
        finally:
            self.held_since = None
            self.held_s += time.perf_counter() - start

    def held(self, now: float) -> float:
        """``held_s`` with a wait going on counted up to ``now``."""
        since = self.held_since
        return self.held_s + (now - since if since is not None else 0.0)

    def _send(self, epoch: int, seq: int, elements: list[Any]) -> int:
        """Send ``elements`` from position ``seq`` as one message; return the next position."""
        if not elements:
            return seq
        for _ in elements:
            self._take_credit()
        origin = self._resume if seq == 0 else None  # a resumed epoch's first element says so
        if len(elements) == 1:
            nbytes = self._emitter.emit(epoch, seq, elements[0], origin)
        else:
            nbytes = self._emitter.send(Envelope(epoch, seq, 0, 1, Bundle(elements), origin))
        self._policy.observe_message(nbytes, len(elements))
        with self._turn:
            self._position = seq + len(elements)
        self._sent += 1
        if self._downstream is not None and self._sent % _RECHECK_EVERY == 0:
            self._policy.observe_downstream(*self._downstream())
        return seq + len(elements)


class _Retired(Exception):
    """Ends a feeder thread whose work a new one took over (``Feeder.take_over``)."""


class _Input(Iterator[Any]):
    """One epoch's input as a feeder thread reads it (``Feeder.read_next``): below a first PackStep too, so
    that a retired thread reads no element more of an input the next epoch may read on."""

    def __init__(self, feeder: Feeder, source: Iterator[Any], epoch: int, generation: int) -> None:
        self._feeder, self._source, self._epoch, self._generation = feeder, source, epoch, generation

    def __next__(self) -> Any:
        return self._feeder.read_next(self._source, self._epoch, self._generation)


class _Counted(Iterator[Any]):
    """The input of a first PackStep, counting the elements read (on ``meter``'s ``IN`` too): the position
    of the element an error of the input stands for."""

    def __init__(self, iterator: Iterator[Any], meter: Meter) -> None:
        self._iterator = iterator
        self._meter = meter
        self.count = 0

    def __next__(self) -> Any:
        element = next(self._iterator)
        self.count += 1
        self._meter.add(Field.IN, 1)
        return element
