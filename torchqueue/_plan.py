"""From the elements a user lists to the stages and edges the runtime starts.

``make_plan`` validates the list (steps and queues, in any valid order),
inserts the implicit capacity-1 queues, names every step uniquely, and
works out the two bounds the runtime enforces:

- an edge's message capacity: ``capacity`` elements; an edge into or out of a
  PoolStep carries elements in up to ``2 * nworkers`` parts, so it holds that
  many times more messages;
- a segment's credits: a segment runs from where positions are assigned (the
  feeder, or a stream step) to the next reader that reorders (a stream step,
  or the consumer). Its credits, one per element in flight, are the sum of
  its edges' capacities and its workers, which bounds every buffer in it.

A PoolStep directly followed by a ProcessStep gets a one-process join stage
between them, since a ProcessStep wants whole elements and its workers cannot
join parts among themselves. So does a ``round_robin`` ProcessStep after a
ProcessStep of several workers: it needs its input in order.

Ends. A first PackStep runs in the feeder thread, which reads the input in the consumer's process
anyway: grouping elements into lists is nothing next to reading them, and the elements then cross
to the workers as lists (one message per ``n``) rather than one message each. A last UnpackStep runs
in the consumer's thread, which then reads whole lists and hands out their items. The seed idea's
``PackStep(256) -> PoolStep(f, n) -> UnpackStep()`` over tiny elements so moves 1/256th of the messages.

A ``round_robin`` stage reads one channel per worker (element ``k`` goes to
channel ``k % nworkers``); its edge's capacity is shared among them.

Fusion. A one-worker ProcessStep right after a stream stage (a RepackStep, PackStep or
UnpackStep, or a join), with no queue declared between them, runs inside the stream stage's
process (``Plan.fused``): each output of the stream step goes through the function there, and
the hop between them (pickling a batch's worth of elements into shared memory, a process
switch, unpickling) is not paid. That is the seed's ``RepackStep(n) -> ProcessStep(collate, 1)``.
Nothing else changes: both steps keep their names, stats rows, errors, random streams and
``get_worker_info()``, and the outputs are the same. The edge between them and its credits
are gone; a declared ``Queue`` between them keeps the two processes apart.

Fusion into a pool. A ProcessStep of two or more workers (no more than the pool's) right before a
PoolStep, with no queue declared between them, runs in the pool's workers (``Plan.premapped``,
``_premap``): a pool worker takes the ProcessStep's input (a chunk's name), calls its function (reads
the chunk) and works on the items itself. The items then never cross a process: the seed's
``ProcessStep(read_chunk, 2) -> PoolStep(event_to_graph, n)`` had pickled every event into shared memory
and out again, and its read processes had been more processes on the cores. What the declaration says
holds:

- at most ``nworkers`` of the ProcessStep's calls run at once (slots): two readers stay two readers,
  each slot is one of the step's stats rows, and ``get_worker_info()`` in the step shows the slot;
- a worker holding items while others of its pool wait for input hands them its last parts through the
  pool's own channel (a few large elements still spread over the whole pool).

The step's calls draw random numbers from the streams of the pool's workers. A one-worker ProcessStep
is not fused so: it calls its function on the elements in order, with one random stream, and a function
may rely on both. What fusion gives up: a call that waits (a network read, a sleep) holds a pool
worker, where a process of its own would have waited beside the pool's work; a declared ``Queue``
between the two keeps them apart. The ProcessStep's input edge becomes the pool's; the edge between the
two is gone.
"""

from __future__ import annotations

import enum
import multiprocessing.queues
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torchqueue.stats import StageEntry
from torchqueue.steps import PackStep, PoolStep, ProcessStep, Queue, RepackStep, Step, StreamStep, UnpackStep


class Kind(enum.Enum):
    """What a stage does with its input, which decides the loop its workers run (``_runners``)."""

    MAP = "map"  # ProcessStep: one output per element
    POOL = "pool"  # PoolStep: one output per item of an element, items spread over the workers
    STREAM = "stream"  # Pack/Unpack/RepackStep, joins: re-chunks the epoch, in order, in one worker


MAP, POOL, STREAM = Kind.MAP, Kind.POOL, Kind.STREAM
PROCESS, THREAD = "process", "thread"


@dataclass(frozen=True)
class JoinStep(StreamStep):
    """Internal: re-joins a PoolStep's parts into whole elements for a following ProcessStep."""

    name: str | None = field(default=None, kw_only=True)

    def default_name(self) -> str:
        return "join"

    def stream(self, elements: Iterator[Any]) -> Iterator[Any]:
        return elements

    def tracked(self, elements: Iterator[tuple[int, Any]], skip: Callable[[], int]) -> Iterator[tuple[Any, Any]]:
        return ((element, (position, None)) for position, element in elements)


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    step: Step
    kind: Kind
    nworkers: int
    backend: str = "process"  # its workers: "process" or "thread" (a stream stage: as the stage before it)

    @property
    def internal(self) -> bool:
        """A stage the runtime added (a join): it has no row in ``stats()``."""
        return isinstance(self.step, JoinStep)

    def stats_entry(self) -> StageEntry:
        """What ``Stats.from_rows`` needs of this stage."""
        return StageEntry(self.name, self.nworkers, self.kind == STREAM, not self.internal, backend=self.backend)

    @property
    def round_robin(self) -> bool:
        return bool(getattr(self.step, "round_robin", False))

    def parts_per_element(self) -> int:
        return 2 * self.nworkers if self.kind == POOL else 1

    def inboxes(self) -> int:
        """Channels this stage reads: one per worker when it is round robin, else one shared."""
        return self.nworkers if self.round_robin else 1


@dataclass(frozen=True)
class Plan:
    """Stages in order; ``capacities[i]`` (elements) feeds stage ``i``, the last feeds the consumer."""

    stages: tuple[StagePlan, ...]
    capacities: tuple[int, ...]
    fused: frozenset[int] = frozenset()  # map stages run inside the stream stage before them
    premapped: frozenset[int] = frozenset()  # map stages run inside the pool after them
    feeder_runs_first: bool = False  # a first PackStep runs in the feeder thread
    consumer_runs_last: bool = False  # a last UnpackStep runs in the consumer's thread

    def runs_elsewhere(self, stage: int) -> bool:
        """Whether ``stage`` has no process of its own: fused, or run by the feeder or by the consumer."""
        return (
            stage in self.fused
            or stage in self.premapped
            or (stage == 0 and self.feeder_runs_first)
            or (stage == len(self.stages) - 1 and self.consumer_runs_last)
        )

    def in_this_process(self, stage: int) -> bool:
        """Whether ``stage`` (-1: the feeder; ``len(stages)``: the consumer) runs in the consumer's process:
        in threads, in the feeder or the consumer, or fused into a stage that does."""
        if stage in (-1, len(self.stages)) or (not self.hosted(stage) and self.runs_elsewhere(stage)):
            return True
        if stage in self.fused:
            stage -= 1
        elif stage in self.premapped:
            stage += 1
        return self.stages[stage].backend == THREAD

    @property
    def in_one_process(self) -> bool:
        """Whether every stage runs in the consumer's process (thread steps, and what follows them): the
        pipeline starts no process (``_local``)."""
        return all(self.in_this_process(stage.index) for stage in self.stages)

    def local_edge(self, edge: int) -> bool:
        """Whether edge ``edge`` joins two parties of the consumer's process (a ``_threads.LocalChannel``,
        messages passed as they are): its writer and its reader both run here."""
        writer = edge - 1
        reader = len(self.stages) if edge == self.consumer_edge else edge
        return self.in_this_process(writer) and self.in_this_process(reader)

    def hosted(self, stage: int) -> bool:
        """Whether ``stage`` runs in the workers of the stage next to it (fused, or premapped)."""
        return stage in self.fused or stage in self.premapped

    def premap_of(self, stage: int) -> StagePlan | None:
        """The map stage whose calls ``stage`` (a pool) runs before its own (``None``: none)."""
        return self.stages[stage - 1] if stage - 1 in self.premapped else None

    def input_edge(self, stage: int) -> int:
        """The edge ``stage``'s workers read: its own, or the premapped stage's before it."""
        return stage - 1 if stage - 1 in self.premapped else stage

    def has_edge(self, edge: int) -> bool:
        """Whether edge ``edge`` (into stage ``edge``; the last: into the consumer) is a channel: not
        the input of a fused stage or of a feeder-run first stage, nor the output of a consumer-run last one,
        nor the edge from a premapped stage into its pool (the pool reads the premapped stage's input)."""
        if edge in self.fused or edge - 1 in self.premapped or (edge == 0 and self.feeder_runs_first):
            return False
        return not (edge == len(self.stages) and self.consumer_runs_last)

    def routes_items(self, stage: int) -> bool:
        """Whether ``stage`` routes the items of the elements it reads without decoding them
        (``_routing``): a RepackStep, UnpackStep or join (exactly: a subclass may look at its items)
        in a process of its own that runs no fused function."""
        if not 0 <= stage < len(self.stages) or self.runs_elsewhere(stage) or self.fused_into(stage):
            return False
        if self.in_this_process(stage) or self.local_edge(self.output_edge(stage)):
            return False  # its input and output are objects, not pickles
        kind = type(self.stages[stage].step)
        if kind is UnpackStep and self.splits_into(stage):
            return False  # its outputs are a pool's elements, split into parts: it must see their items
        return kind in (RepackStep, UnpackStep, JoinStep)

    def sends_items(self, stage: int) -> bool:
        """Whether the writers at ``stage``'s output (-1: the feeder) send list elements item by item: their
        reader routes items, and they do not route items themselves (what they route goes by reference)."""
        return self.routes_items(self.output_edge(stage) if stage >= 0 else 0) and not self.routes_items(stage)

    @property
    def consumer_edge(self) -> int:
        """The edge the consumer reads."""
        return len(self.stages) - 1 if self.consumer_runs_last else len(self.stages)

    def fused_into(self, stage: int) -> StagePlan | None:
        """The stage that runs inside ``stage``'s process, after its stream step (``None``: none)."""
        return self.stages[stage + 1] if stage + 1 in self.fused else None

    def output_edge(self, stage: int) -> int:
        """The edge ``stage``'s workers write to: the next one, or the fused stage's (its input has no edge)."""
        return stage + 2 if stage + 1 in self.fused else stage + 1

    def message_capacity(self, edge: int) -> int:
        """Messages edge ``edge`` holds: its capacity times the parts per element of a pool it touches."""
        touching = [self.stages[i] for i in (edge - 1, edge) if 0 <= i < len(self.stages)]
        if edge in self.premapped:  # the pool reads it, and shares parts through it
            touching.append(self.stages[edge + 1])
        return self.capacities[edge] * max([s.parts_per_element() for s in touching], default=1)

    def assigns_seq(self, stage: int) -> bool:
        """Whether positions are (re)assigned at the output of ``stage`` (-1: the feeder)."""
        return stage == -1 or self.stages[stage].kind == STREAM

    def segment_end(self, stage: int) -> int:
        """The reader that closes the segment starting at ``stage``'s output (len(stages): consumer)."""
        for later in self.stages[stage + 1 :]:
            if later.kind == STREAM:
                return later.index
        return len(self.stages)

    def credits(self, stage: int) -> int:
        """Elements that may be in flight in the segment starting at ``stage``'s output."""
        end = self.segment_end(stage)
        between = [s for s in self.stages[stage + 1 : end] if not self.hosted(s.index)]
        edges = [
            self.capacities[edge]
            for edge in range(stage + 1, end + 1)
            if edge not in self.fused and edge - 1 not in self.premapped
        ]
        return sum(edges) + sum(s.nworkers for s in between)

    def channel_capacity(self, edge: int) -> int:
        """Messages each channel of edge ``edge`` holds (a round robin reader shares the edge's among its own)."""
        total = self.message_capacity(edge)
        if edge < len(self.stages):
            total = -(-total // self.stages[edge].inboxes())
        return total

    def can_bundle(self, stage: int) -> bool:
        """Whether the segment starting at ``stage``'s output has only map stages that any worker may take
        (bundles pass those; a round robin stage must see each element as its own message)."""
        return all(s.kind == MAP and not s.round_robin for s in self.stages[stage + 1 : self.segment_end(stage)])

    def splits_into(self, stage: int) -> bool:
        """Whether the writer at ``stage``'s output must split elements into pool parts."""
        nxt = stage + 1
        if nxt >= len(self.stages) or self.stages[nxt].kind != POOL:
            return False
        return stage == -1 or self.stages[stage].kind != POOL


def _kind(step: Step) -> Kind:
    if isinstance(step, PoolStep):
        return POOL
    if isinstance(step, ProcessStep):
        return MAP
    return STREAM


def _needs_join(previous: Step, step: ProcessStep) -> bool:
    if _kind(previous) == POOL:
        return True
    return step.round_robin and _kind(previous) == MAP and getattr(previous, "nworkers", 1) > 1


_EXAMPLES = {
    "ProcessStep": "ProcessStep(my_function, 2)",
    "PoolStep": "PoolStep(my_function, nworkers=4)",
    "PackStep": "PackStep(64)",
    "UnpackStep": "UnpackStep()",
    "RepackStep": "RepackStep(64)",
    "Queue": "Queue(4)",
}
"""What a step or queue class given where an instance belongs is told to write instead."""


def _as_queue(element: Any) -> Queue | None:
    if isinstance(element, Queue):
        return element
    if isinstance(element, multiprocessing.queues.Queue):
        return Queue.from_multiprocessing(element)
    return None


_THREAD_QUEUES = ("queue", "_queue")  # queue.SimpleQueue's module is _queue


def _article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _expected(element: Any) -> str:
    """What a Sequence takes, said for ``element``, which it does not take."""
    expected = "expected a step (ProcessStep, PoolStep, PackStep, UnpackStep, RepackStep) or a queue (tq.Queue(n))"
    if isinstance(element, (list, tuple)):
        return f"{expected}: pass the steps one by one, tq.Sequence(*steps)"
    if type(element).__module__ in _THREAD_QUEUES:  # queue.Queue, queue.SimpleQueue: between threads only
        return f"{expected}; it joins threads, not processes: tq.Queue(n), or torch.multiprocessing.Queue(n)"
    return expected


def make_plan(elements: tuple[Any, ...]) -> Plan:
    """Validate ``elements`` and lay out stages and edge capacities (see the module docstring)."""
    steps: list[Step] = []
    capacities: list[int] = []
    declared: list[bool] = []  # whether a queue was declared before each step
    pending: Queue | None = None
    for position, element in enumerate(elements):
        queue = _as_queue(element)
        if queue is not None:
            if pending is not None:
                raise ValueError(f"two queues in a row at position {position}: merge them into one Queue(n)")
            pending = queue
        elif isinstance(element, Step):
            capacities.append(pending.capacity if pending else 1)
            declared.append(pending is not None)
            pending = None
            steps.append(element)
        elif isinstance(element, type) and issubclass(element, (Step, Queue)):
            raise TypeError(
                f"Sequence element {position} is the class {element.__name__}, not one: create it, "
                f"e.g. {_EXAMPLES.get(element.__name__, element.__name__ + '()')}"
            )
        else:
            kind = type(element)
            name = f"queue.{kind.__name__}" if kind.__module__ in _THREAD_QUEUES else kind.__name__
            raise TypeError(f"Sequence element {position} is {_article(name)}: {_expected(element)}")
    if not steps:
        raise ValueError("a Sequence needs at least one step, e.g. tq.Sequence(tq.ProcessStep(fn, 2))")
    capacities.append(pending.capacity if pending else 1)

    # A ProcessStep right after a PoolStep reads through a join stage; so does a round robin
    # ProcessStep after several workers of a ProcessStep (they finish out of order).
    laid: list[tuple[Step, int, bool]] = []
    for step, capacity, given in zip(steps, capacities, declared):
        if laid and isinstance(step, ProcessStep) and _needs_join(laid[-1][0], step):
            if step.nworkers == 1:  # the step runs inside the join (fused): the queue goes before the join
                laid.append((JoinStep(), capacity, given))
                capacity, given = 1, False
            else:
                laid.append((JoinStep(), 1, False))
        laid.append((step, capacity, given))

    names = _unique_names([step for step, _, _ in laid])
    stages: list[StagePlan] = []
    for index, (step, _, _) in enumerate(laid):
        # a stream stage's worker is a thread where the stage before it runs in threads
        backend = getattr(step, "backend", stages[-1].backend if stages else PROCESS)
        stages.append(StagePlan(index, names[index], step, _kind(step), getattr(step, "nworkers", 1), backend))
    # exactly these steps (a subclass may stream otherwise: it keeps a process of its own)
    feeder_first = type(stages[0].step) is PackStep
    consumer_last = type(stages[-1].step) is UnpackStep and not (feeder_first and len(stages) == 1)
    fused = frozenset(
        stage.index
        for stage, (_, _, given) in zip(stages, laid)
        if stage.index
        and not given
        and not (stage.index == 1 and feeder_first)  # never a user's function in the feeder thread
        and _fusable(stages[stage.index - 1], stage)
    )
    premapped = frozenset(
        stage.index - 1
        for stage, (_, _, given) in zip(stages[1:], laid[1:])
        if not given and _premappable(stages[stage.index - 1], stage) and stage.index - 1 not in fused
    )
    return Plan(
        tuple(stages), tuple(c for _, c, _ in laid) + (capacities[-1],), fused, premapped, feeder_first, consumer_last
    )


def _fusable(previous: StagePlan, stage: StagePlan) -> bool:
    """Whether ``stage`` can run inside ``previous``'s process: a one-worker map after a stream stage, both
    in processes (between threads there is no hop to save)."""
    backends = previous.backend, stage.backend
    return previous.kind == STREAM and stage.kind == MAP and stage.nworkers == 1 and backends == (PROCESS, PROCESS)


def _premappable(stage: StagePlan, pool: StagePlan) -> bool:
    """Whether ``stage`` can run in the workers of ``pool``, the stage after it: a map of several workers
    (which take elements in any order), no more than the pool's (they could not all call at once), before
    a pool, both in processes (between threads there is no hop to save). A one-worker step keeps its
    process: it calls its function on the elements in order, with one random stream, and a function may
    rely on both (the draws an element gets are reproducible)."""
    if stage.kind != MAP or pool.kind != POOL or stage.round_robin or (stage.backend, pool.backend) != (PROCESS,) * 2:
        return False
    return 1 < stage.nworkers <= pool.nworkers


def _unique_names(steps: list[Step]) -> list[str]:
    """User names as given (they must be unique); default names get ``#2``, ``#3`` on repeats."""
    given = [step.name for step in steps if step.name is not None]
    duplicated = [name for name, count in Counter(given).items() if count > 1]
    if duplicated:
        raise ValueError(f"step names must be unique in a Sequence; {duplicated[0]!r} is used twice")
    taken = set(given)
    seen: Counter[str] = Counter()
    names = []
    for step in steps:
        if step.name is not None:
            names.append(step.name)
            continue
        base = f"{names[-1]}:join" if isinstance(step, JoinStep) else step.default_name()
        seen[base] += 1
        name = base if seen[base] == 1 else f"{base}#{seen[base]}"
        while name in taken:
            seen[base] += 1
            name = f"{base}#{seen[base]}"
        taken.add(name)
        names.append(name)
    return names
