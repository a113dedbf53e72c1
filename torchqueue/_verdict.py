"""What limits a pipeline, decided once from its ``Stats``: ``print(stats)``'s hint and ``stats.plot()``'s
title both say this verdict, so they cannot disagree.

The decision, in order:

1. A start-up that took most of the run leaves too little after it to tell: that is said first.
2. The busiest step is the one whose workers, once started, spent the largest share of their time in
   the step or on its messages (``occupied``). Start-up is left out: under spawn or forkserver a
   worker spends its first second or two importing, which is no step's work.
3. Below half of its workers' time, no step limits: your loop does where it worked longer than it
   waited for outputs; else the hops do, where the steps together spent more time encoding and
   decoding messages than working; else the input does (said so with its cores where your process
   kept half a core or more busy besides your loop and thread steps: your iterable, read by the
   feeder thread, is what waits for a core if one does; or its ``next()`` took half the run, a sleep or a
   read off a CPU: said before whether a core was free). A start-up that takes a large share of a run is said too.
4. A step that spends more time encoding and decoding messages than in its work is limited by the
   hops: more workers would not help; fewer, larger messages or fewer stages would. So are the steps
   together where the cores are full (6) and all of them spent more time on messages than working.
5. A Pack/Unpack/RepackStep has no ``nworkers``: the advice is about what it is given.
6. More workers only help while cores are free: the CPU time of the worker processes (each over its
   time once started) and of your process (your loop and the thread steps, over the run) is the cores
   in use. Busy time would count a worker sleeping, reading a file, waiting for the GIL or for a
   core. At about all of the machine's cores, or where the machine left under half a core idle
   (other programs count: ``Stats.idle_cores``), the advice is to make the step cheaper; but a step
   whose workers were mostly off a CPU while busy (sleeping, reading) is told to take more workers
   whatever the cores do. Where your process keeps a quarter of a core or more busy, the advice
   gives its share apart from the workers' (and names your loop where it worked longer than it waited).
7. Python runs one thread of a process at a time (the GIL). Where thread steps of at least two threads
   use most of your process's CPU and it stays at about one core while a core stays idle, the GIL
   limits them (ahead of 3 and 6 where the busiest step is a thread step or no step is busy half the
   time: a thread waiting for the GIL between calls counts as waiting for input). More threads would
   not help; the advice is processes, or work that releases the GIL. One thread alone cannot be told
   from one that releases the GIL and keeps a core busy: it is told to take more workers, and then
   this rule holds.
8. The queues bound what is in flight. Where the input waited for room half the run while the busiest
   step's workers waited for input a quarter of their time and your loop waited for outputs, elements
   are held back behind a slower one (outputs come in order): more workers would wait too; larger
   queues around the step, or ``ordered=False``, let them run ahead. Said after rule 1, before the rest.
9. A step run in a pool's workers (``StepStats.host``) whose calls wait off a CPU for a quarter of the
   pool's time or more holds the pool's workers with it: a declared queue between the two gives it
   processes of its own again, whose waits overlap the pool's work. Said after rule 1, before rule 8.
10. A call going on (the figures taken while the pipeline runs, ``Stats.oldest_call``) for half the
   run after the workers started, ``STUCK_MIN_S`` or more, and ``STUCK_TIMES`` its step's calls on
   average holds every element after it: that call is named, with its worker's pid for ``py-spy
   dump``. Said after rule 1, before the rest: a hang is what the figures are then asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchqueue._handles import STOPPED

if TYPE_CHECKING:
    from torchqueue.stats import Stats, StepStats

LIMITS = 0.5
"""The share of its workers' time a step must be occupied to be said to limit the pipeline."""

STARTUP_SHARE = 0.25
"""A start-up longer than this share of the run is worth saying."""


OFF_CPU_SHARE = 0.25
"""A step whose workers were on a CPU for less than this share of the core each could get (the cores over
the pipeline's processes, at most one) mostly waits (files, the network, sleep). Ten workers that compute
on two cores each get a fifth of one: against a whole core they looked asleep, and were told to take
more workers."""

GIL_CORES = (0.6, 1.4)
"""The cores your process keeps busy when its threads take turns holding the GIL: about one."""

GIL_SHARE = 0.5
"""The share of your process's CPU time the thread steps must take for the GIL to be said to hold them."""

OWN_SHARE = 0.25
"""Where your process keeps at least this many cores busy (your loop, thread steps), the advice on full
cores says so apart from the workers' share: a slow loop takes cores as a step does."""

HELD_STARVED = 0.25
"""The share of its workers' time the busiest step must wait for input, the input being held back by the
queues, for the queues to be said to limit (rule 8)."""

HOSTED_WAIT = 0.25
"""A step run in a pool's workers (``StepStats.host``) whose calls waited off a CPU for this share of the
pool's workers' time or more holds the pool back: the pool's workers wait with it."""

STUCK_MIN_S = 1.0
"""A call going on for half the run, at least this long and ``STUCK_TIMES`` a call of its step on average
is said to hold the pipeline (rule 10)."""

STUCK_TIMES = 4.0

HOPS_SHARE = 0.1
"""Below half busy, the hops are said to limit only where they took more than the steps' work and this
share of the run (a pipeline of cheap steps over small elements waits on anything else first)."""

BIG_ELEMENT = 1 << 20
"""Bytes per element sent from which the hops cost what their bytes cost (copies into shared memory), not
what their messages do."""


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, as DataLoader's check counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Verdict:
    """``busiest``: the step with the largest occupied share (``None``: no steps); ``title``: what
    limits, in a few words (the plot's title); ``advice``: what to do about it."""

    busiest: str | None
    title: str
    advice: str


def occupied(step: StepStats, elapsed_s: float, hosted_s: float = 0.0) -> float:
    """The share of ``step``'s workers' time once started spent in the step or on its messages;
    ``hosted_s``: the busy time of the steps its workers run too (``StepStats.host``)."""
    running = step.nworkers * elapsed_s - step.startup_s
    return (step.busy_s + step.encode_s + step.decode_s + hosted_s) / running if running > 0 else 0.0


def _busy(step: StepStats, stats: Stats) -> str:
    """``occupied``, in words: the share in its calls (the table's ``util``), on its messages, and in the
    calls of the steps its workers run too."""
    running = step.nworkers * stats.elapsed_s - step.startup_s
    if running <= 0:
        return "0% busy"
    parts = [f"{step.busy_s / running:.0%} busy"]
    messages = (step.encode_s + step.decode_s) / running
    if f"{messages:.0%}" != "0%":
        parts.append(f"{messages:.0%} on its messages")
    parts += [f"{s.busy_s / running:.0%} running {s.name}" for s in stats.values() if s.host == step.name]
    return ", ".join(parts)


def verdict(stats: Stats) -> Verdict:
    """What limits the pipeline ``stats`` describes, and what to do (see the module docstring)."""
    steps = list(stats.values())
    if not steps or stats.elapsed_s <= 0 or not any(s.elements_in or s.startup_s for s in steps):
        return Verdict(None, "no steps ran yet", "")
    hosted = {s.name: sum(h.busy_s for h in steps if h.host == s.name) for s in steps}
    shares = {s.name: occupied(s, stats.elapsed_s, hosted[s.name]) for s in steps}
    top = max(steps, key=lambda s: shares[s.name])
    share = shares[top.name]
    startup = _startup(stats)
    if startup > 2 * STARTUP_SHARE * stats.elapsed_s:
        return Verdict(
            top.name,
            "start-up took most of the run",
            f"the workers took {startup:.2f} s of the {stats.elapsed_s:.2f} s to start, too much for the figures "
            "after it to tell what limits: run longer (persistent workers start once for many epochs)",
        )
    call = stats.oldest_call
    if call is not None and call.doing.startswith(STOPPED):  # by a signal, or a debugger
        return Verdict(
            call.step,
            f"{call.step}'s worker {call.worker} is stopped",
            f"its process (pid {call.pid}) is {STOPPED}, holding element {call.seq} of epoch {call.epoch} for "
            f"{call.seconds:.1f} s: SIGCONT resumes it",
        )
    if call is not None and _stuck(stats, call):
        if call.pid is None:  # taken as the pipeline closed (after a timeout): its process is gone
            return Verdict(
                call.step,
                f"{call.step} held element {call.seq} of epoch {call.epoch} as the pipeline closed",
                f"worker {call.worker} had been in its function on it for {call.seconds:.1f} s, and the elements "
                "after it waited for it, to come out in order",
            )
        return Verdict(
            call.step,
            f"{call.step} holds element {call.seq} of epoch {call.epoch}",
            f"worker {call.worker} (pid {call.pid}) has been in its function on it for {call.seconds:.1f} s, and "
            "the elements after it wait for it, to come out in order: py-spy dump --pid "
            f"{call.pid} shows where it is (a timeout= raises a TimeoutError that names it)",
        )
    waiting = _waits_in_its_host(stats)
    if waiting is not None:
        host = waiting.host
        return Verdict(
            waiting.name,
            f"{waiting.name} waits in {host}'s workers",
            f"its calls took {waiting.busy_s:.2f} s of {host}'s workers' time but {waiting.cpu_s:.2f} s on a CPU "
            f"(waiting on files, the network or a sleep), and {host} does nothing meanwhile. Give {waiting.name} "
            f"more workers (now {waiting.nworkers}), so that more of its calls wait at once, and a tq.Queue(n) "
            f"between {waiting.name} and {host} gives {waiting.name} processes of its own again, whose waits overlap "
            f"{host}'s work (or backend='thread' for waits that release the GIL)",
        )
    if _held_back(stats, top):
        return Verdict(
            top.name,
            f"the queues limit ({top.name}: {_busy(top, stats)})",
            f"your input waited {stats.input_held_s:.2f} s for room, as many elements in flight as the queues "
            f"allow, while {top.name}'s workers waited {top.wait_in_s:.2f} s for input: the elements after a "
            f"slow one wait for it, to come out in order. Larger queues around {top.name} (a tq.Queue(n) before "
            "and after it; a larger prefetch_factor in a QueueFlowLoader) let its workers run ahead of a slow "
            "element; ordered=False (in_order=False) yields outputs as they are ready",
        )
    hops, work = sum(s.encode_s + s.decode_s for s in steps), sum(s.busy_s for s in steps)
    held = _held_by_the_gil(stats)
    if held is not None and (share < LIMITS or top.backend == "thread"):
        return _gil(stats, held, shares[held.name])
    if share < LIMITS:
        title = f"no step is busy more than half the time ({top.name}: {_busy(top, stats)})"
        consumer_limits = stats.consumer_work_s > stats.consumer_wait_s
        if hops > work and hops > HOPS_SHARE * stats.elapsed_s and not consumer_limits:
            return Verdict(top.name, f"the hops limit; {title}", _hops(stats, None, hops, work))
        return Verdict(top.name, title, _outside(stats))
    title = f"bottleneck: {top.name} ({_busy(top, stats)})"
    if top.encode_s + top.decode_s > top.busy_s:
        return Verdict(
            top.name,
            f"the hops limit: {top.name} ({_busy(top, stats)})",
            _hops(stats, top, top.encode_s + top.decode_s, top.busy_s),
        )
    if top.stream:
        return Verdict(
            top.name,
            title,
            "it runs in one process and takes no nworkers: give it fewer, larger elements (larger chunks "
            "from the step before it), or do per-element work in the steps around it",
        )
    cpus, used = available_cpus(), _cores(stats)
    if _mostly_off_cpu(stats, top):
        return Verdict(
            top.name,
            title,
            f"give it more workers (now {top.nworkers}): they spent {top.busy_s:.2f} s in it but {top.cpu_s:.2f} s "
            f"on a CPU (waiting on files, the network or a sleep), so more fit on the cores ({used:.1f} of {cpus} "
            "in use)",
        )
    if (used > cpus - LIMITS or _no_core_free(stats)) and hops > work and hops > HOPS_SHARE * stats.elapsed_s:
        # on full cores the hops' CPU is the work's: the steps' hops, not the busiest step's own, limit
        return Verdict(top.name, f"the hops limit; {title}", _hops(stats, None, hops, work))
    if used > cpus - LIMITS:
        return Verdict(top.name, title, _cores_full(stats, top, used, cpus))
    if _no_core_free(stats):
        return Verdict(
            top.name,
            title,
            f"the pipeline keeps {used:.1f} of the {cpus} cores busy and other programs the rest (no core was "
            f"free), so more workers would only share them: make {top.name} do less per element, or free "
            "the cores",
        )
    return Verdict(top.name, title, f"give it more workers (now {top.nworkers}; {used:.1f} of {cpus} cores in use)")


def _hops(stats: Stats, step: StepStats | None, hops: float, work: float) -> str:
    """The advice where the hops limit: ``step``'s (``None``: the steps' together). What they cost: the
    bytes, where elements of a megabyte or more are copied into shared memory; the items, pickled one by
    one for a Pack/Unpack/RepackStep to route; else the messages."""
    steps = list(stats.values())
    senders = [step] if step is not None else steps
    spent = (
        f"{'it' if step is not None else 'the steps'} spent {hops:.2f} s encoding and decoding messages and "
        f"{work:.2f} s in the steps' work"
    )
    sent, elements = sum(s.sent_bytes for s in senders), sum(s.elements_out for s in senders if s.sent_bytes)
    if elements and sent / elements >= BIG_ELEMENT:
        return (
            f"{spent}, copying {sent / elements / 2**20:.1f} MiB per element into shared memory: the bytes "
            'cost, not the messages. Thread steps (backend="thread") hand arrays and tensors to each other and '
            "to your loop without a copy; or send less (a smaller dtype, crop or reduce before sending)"
        )
    routing = [(s, after) for s, after in zip(steps, steps[1:]) if s in senders and after.stream and not s.stream]
    if routing:  # the sender whose encoding took most, where it took half the hops or more
        sender, after = max(routing, key=lambda pair: pair[0].encode_s)
        if sender.encode_s >= LIMITS * hops:
            return (
                f"{spent}: the items of {sender.name}'s outputs are pickled one by one, for {after.name} to route "
                f"them without decoding: give it fewer, larger items, or build the batches in {sender.name} itself"
            )
    fuse = ", or do two steps' work in one ProcessStep" if sum(not s.stream for s in steps) >= 2 else ""
    return f"{spent}: send fewer, larger messages (larger elements, a PackStep before a pool){fuse}"


def _stuck(stats: Stats, call: Any) -> bool:
    """Whether ``call`` (``Stats.oldest_call``) has gone on so long that it holds the pipeline (rule 10):
    half the run after the workers' start, ``STUCK_MIN_S``, and ``STUCK_TIMES`` the mean of its step's
    other calls, where there were others (a hang on the first element has none to compare with). A slow
    start does not hide a stuck call: a second spent starting is not a second the call could have run."""
    step = stats.get(call.step)
    others = (step.busy_s - call.seconds) / (step.elements_in - 1) if step is not None and step.elements_in > 1 else 0.0
    running = stats.elapsed_s - _startup(stats)
    return call.seconds >= max(STUCK_MIN_S, LIMITS * running, STUCK_TIMES * others)


def _cores_full(stats: Stats, top: StepStats, used: float, cpus: int) -> str:
    """The advice when the cores this process may use are all busy: whose they are (the workers', and
    your process's where it keeps a quarter of a core or more busy: your loop, or thread steps)."""
    own = stats.consumer_cpu_s / stats.elapsed_s if _has_cpu_times(stats) else 0.0
    if own < OWN_SHARE:
        busy = f"the workers keep {used:.1f} cores busy"
    else:
        busy = f"the workers keep {used - own:.1f} cores busy and your process {own:.1f}"
    loop = ", or your loop" if own >= OWN_SHARE and stats.consumer_work_s > stats.consumer_wait_s else ""
    return (
        f"{busy}; this process may use {cpus}, so more workers would only share them: make {top.name} "
        f"do less per element{loop}, or run on more cores"
    )


def _has_cpu_times(stats: Stats) -> bool:
    """Whether the figures carry CPU times (figures made by hand, or before a worker took an input, may not)."""
    return bool(stats.consumer_cpu_s or any(s.cpu_s for s in stats.values()))


def _no_core_free(stats: Stats) -> bool:
    """Whether the machine left under half a core idle over the run (unknown off Linux: no)."""
    return stats.idle_cores is not None and stats.idle_cores < LIMITS


def _waits_in_its_host(stats: Stats) -> StepStats | None:
    """A step run in a pool's workers whose calls wait off a CPU for ``HOSTED_WAIT`` of the pool's time or
    more: the pool's workers wait with it, where processes of its own would wait beside their work."""
    for step in stats.values():
        host = stats.get(step.host) if step.host else None
        if host is None:
            continue
        running = host.nworkers * stats.elapsed_s - host.startup_s
        if running > 0 and step.busy_s >= HOSTED_WAIT * running and _mostly_off_cpu(stats, step):
            return step
    return None


def _mostly_off_cpu(stats: Stats, step: StepStats) -> bool:
    """Whether ``step``'s workers spent most of their busy time off a CPU (``OFF_CPU_SHARE``): more of
    them help even where the cores are busy. Unknown (figures without CPU times): no."""
    processes = 1 + sum(s.nworkers for s in stats.values() if s.backend != "thread" and not s.host)  # and yours
    share = min(1.0, available_cpus() / processes)  # of a core, for each worker busy at once with all others
    return _has_cpu_times(stats) and step.cpu_s < OFF_CPU_SHARE * share * step.busy_s


def _held_by_the_gil(stats: Stats) -> StepStats | None:
    """The thread step (the one with the most CPU time) the GIL holds back, if it does (rule 7)."""
    threads = [s for s in stats.values() if s.backend == "thread"]
    own = stats.consumer_cpu_s / stats.elapsed_s
    if sum(s.nworkers for s in threads) < 2 or available_cpus() < 2 or not GIL_CORES[0] <= own <= GIL_CORES[1]:
        return None
    if _no_core_free(stats):
        return None  # no core was free: the threads may be waiting for one, not for the GIL
    if sum(s.cpu_s for s in threads) < GIL_SHARE * stats.consumer_cpu_s:
        return None  # your loop, or the input, takes most of it
    return max(threads, key=lambda s: s.cpu_s)


def _gil(stats: Stats, held: StepStats, share: float) -> Verdict:
    threads = ", ".join(s.name for s in stats.values() if s.backend == "thread")
    return Verdict(
        held.name,
        f"the GIL limits: {held.name} ({share:.0%} busy)",
        f"your process kept {stats.consumer_cpu_s / stats.elapsed_s:.1f} cores busy, and its thread steps "
        f"({threads}) most of that: Python runs one of its threads at a time, so more threads would not help: "
        'run them in processes (backend="process"), or make their work release the GIL (numpy, torch, I/O)',
    )


def _cores(stats: Stats) -> float:
    """The cores in use (rule 6); for figures made without CPU times, the workers' busy time, encoding
    and decoding over the elapsed time."""
    steps = list(stats.values())
    if not _has_cpu_times(stats):
        return sum(s.busy_s + s.encode_s + s.decode_s for s in steps) / stats.elapsed_s
    workers = 0.0  # a thread step's CPU time is in your process's
    for s in steps:
        per_worker = stats.elapsed_s - s.startup_s / s.nworkers if s.nworkers else 0.0
        if s.backend != "thread" and per_worker > 0:
            workers += s.cpu_s / per_worker
    return workers + stats.consumer_cpu_s / stats.elapsed_s


def _outside(stats: Stats) -> str:
    """Why no step limits: the consumer, the cores (other programs took them), the input, or a start-up
    that took much of a short run."""
    wait, work = stats.consumer_wait_s, stats.consumer_work_s
    feeding = _feeding(stats)
    if work > wait:
        advice = f"your loop limits: it worked {work:.2f} s and waited {wait:.2f} s for outputs"
    elif feeding >= LIMITS:
        advice = (
            f"the input limits: your process kept {feeding:.1f} cores busy besides your loop and thread steps "
            f"while your loop waited {wait:.2f} s for outputs: the iterable you pass (read by a thread of your "
            "process) is slow: speed it up, or move its work into a first step"
        )
    elif stats.input_s >= LIMITS * stats.elapsed_s:
        advice = (
            f"the input limits: the iterable you pass took {stats.input_s:.2f} s of the {stats.elapsed_s:.2f} s "
            "to give its elements (read by a thread of your process): speed it up, or move its work into a "
            "first step"
        )
    elif _no_core_free(stats):
        advice = (
            f"no core was free: the pipeline kept {_cores(stats):.1f} of the {available_cpus()} cores busy, and "
            "other programs the rest: its workers waited for a core"
        )
    elif wait > 0:
        advice = (
            f"the input limits: your loop waited {wait:.2f} s for outputs and worked {work:.2f} s; speed up "
            "the iterable you pass, or give the steps larger elements"
        )
    else:
        advice = "the input or the consumer limits"
    startup = _startup(stats)
    if startup > STARTUP_SHARE * stats.elapsed_s:
        advice += (
            f"; the workers took {startup:.2f} s of the {stats.elapsed_s:.2f} s to start "
            "(a longer run, or persistent workers, spreads it)"
        )
    return advice


def _held_back(stats: Stats, top: StepStats) -> bool:
    """Whether the queues' bound on what is in flight starved the busiest step (rule 8): the input waited
    for room half the run while the step's workers waited for input a quarter of their time, and your
    loop waited for outputs."""
    starved = top.wait_in_s >= HELD_STARVED * top.nworkers * stats.elapsed_s
    waiting = stats.consumer_wait_s > stats.consumer_work_s
    return stats.input_held_s >= LIMITS * stats.elapsed_s and starved and waiting


def _feeding(stats: Stats) -> float:
    """The cores your process kept busy besides your loop and its thread steps: reading the input
    (the feeder thread runs your iterable) and sending it, and receiving the outputs."""
    threads = sum(s.cpu_s for s in stats.values() if s.backend == "thread")
    rest = stats.consumer_cpu_s - threads - stats.consumer_work_s
    return rest / stats.elapsed_s if stats.elapsed_s > 0 else 0.0


def _startup(stats: Stats) -> float:
    """The longest a step's workers took to start, on average per worker."""
    return max((s.startup_s / s.nworkers for s in stats.values() if s.nworkers), default=0.0)
