"""Faults that used to hang, lose data or mislead (issue 16): a stuck step, two consumer threads,
values that do not unpickle, a full /dev/shm."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import Unrebuildable, assert_no_workers, identity, random_sleep, stuck_on_five, unrebuildable_on_three

import torchqueue as tq
from torchqueue._semnames import semaphore_names

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


# -- 1. a stuck step -------------------------------------------------------------------------------


def test_a_timeout_names_the_stuck_step_and_the_oldest_element():
    seq = tq.Sequence(tq.ProcessStep(identity, name="fast"), tq.ProcessStep(stuck_on_five, 2, name="slow"), timeout=1)
    got = []
    with pytest.raises(TimeoutError) as info:
        for value in seq(range(20)):
            got.append(value)
            last = time.monotonic()  # the wait for the next output starts (the workers' start is before)
    waited = time.monotonic() - last
    assert got == [0, 1, 2, 3, 4]
    assert 1.0 <= waited < 3.0
    message = str(info.value)
    assert "within 1 seconds" in message and "'slow'" in message and "'fast'" not in message
    assert "in its function" in message and "oldest is element 5 of epoch 0, in step 'slow'" in message
    # the figures after it say the same (before: "no step is busy more than half the time ...: the input limits")
    assert seq.stats().hint().startswith("slow held element 5 of epoch 0 as the pipeline closed: worker ")
    with pytest.raises(tq.PipelineError, match="TimeoutError"):  # closed, as after any error
        list(seq(range(3)))
    assert_no_workers()


def _own_pid(_: object) -> int:
    return os.getpid()


def test_a_timeout_names_a_stopped_worker_and_not_what_its_row_last_said():
    # before: "'w' (worker 0, pid 7: waiting for room downstream for 1.0 s, ...)" for a process that
    # was stopped and waited for nothing
    with tq.Sequence(tq.ProcessStep(_own_pid, 1, name="w")) as seq:
        iterator = seq(range(50))
        pid = next(iterator)
        seq.timeout = 1  # from the first output: a loaded machine may take longer to start the worker
        os.kill(pid, signal.SIGSTOP)
        try:
            asked = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                list(iterator)
            # the stopped worker is killed at once (it cannot take SIGTERM): before, close() waited
            # for it to leave, then for SIGTERM to act, 1.25 s more
            assert time.monotonic() - asked < 2.0
        finally:
            with contextlib.suppress(ProcessLookupError):  # the timeout closed the pipeline: gone
                os.kill(pid, signal.SIGCONT)
    message = str(info.value)
    assert f"Workers stopped (SIGSTOP, Ctrl-Z or a debugger): 'w' (worker 0, pid {pid}); SIGCONT" in message
    assert "waiting for room downstream" not in message and "waits for its input" not in message


def _sum(values: list[int]) -> int:
    return sum(values)


def test_a_timeout_names_a_stopped_fused_process_once_and_it_before_the_steps_waiting_on_it():
    # before: "The oldest is element 5 of epoch 0, in step 'pool'" (a worker waiting for room, named first
    # as the longest by microseconds), and the one stopped process listed twice, once per step it runs
    steps = (tq.PoolStep(identity, nworkers=2, name="pool"), tq.RepackStep(4), tq.ProcessStep(_sum, 1, name="sum"))
    with tq.Sequence(*steps, tq.Queue(1)) as seq:
        iterator = seq([[i, i + 1] for i in range(0, 4000, 2)])
        assert next(iterator) == 6
        (pid,) = {pid for step, _, pid in seq._runtime._owners() if step == "sum"}
        seq.timeout = 1
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError) as info:
                list(iterator)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    message = str(info.value)
    assert (
        f"Workers stopped (SIGSTOP, Ctrl-Z or a debugger): 'RepackStep(4)' and 'sum' (worker 0, pid {pid});" in message
    )
    holding = message.partition("Steps holding elements: ")[2].partition(". The oldest is ")[0]
    if "'sum'" in holding or "'RepackStep(4)'" in holding:  # the stopped process held an element (else it
        # was between two, and a pool worker waiting for room may be the only holder): it is named first
        assert "in step 'pool'" not in message.split("The oldest is ")[1]
    assert message.count(f"pid {pid})") == 1


def test_a_timeout_with_nothing_held_says_the_input_is_waited_for():
    def slow_input():
        yield 1
        threading.Event().wait(30)

    with tq.Sequence(tq.ProcessStep(identity)) as seq:
        iterator = seq(slow_input())
        assert next(iterator) == 1
        seq.timeout = 0.5
        with pytest.raises(TimeoutError, match="no step holds an element: the pipeline waits for its input"):
            next(iterator)


def test_a_timeout_while_the_workers_start_says_so():
    # before: "no step holds an element: the pipeline waits for its input (the iterable's next() has not
    # returned)", for a range, while the spawned worker was still importing torch (a second and more)
    with tq.Sequence(tq.ProcessStep(identity, 2), timeout=0.05, context="spawn") as seq:
        with pytest.raises(TimeoutError, match=r"the workers are still starting \(\d of 2 ready"):
            list(seq(range(3)))


def test_the_timeout_message_with_nothing_held_tells_start_up_from_input():
    from torchqueue._stuck import timed_out

    assert "still starting (1 of 3 ready" in str(timed_out(2.0, [], (1, 3)))
    assert "waits for its input" in str(timed_out(2.0, [], (3, 3)))


def test_a_worker_passing_on_an_epochs_end_holds_no_element():
    # before: a worker killed while it passed on epoch 0's end, every output of that epoch delivered,
    # died "while sending element 9 of epoch 0" (the last element it had taken)
    from torchqueue._meter import Meter
    from torchqueue._stuck import holders
    from torchqueue.stats import NFIELDS, Field

    rows = [0.0] * (2 * NFIELDS)
    sending, passing_end = Meter(rows, 0, "work"), Meter(rows, 1, "work")
    for meter in (sending, passing_end):
        meter.took(0, 9)
        meter.set(Field.OUT_SINCE, 1.0)
    passing_end.holds_none()
    (held,) = holders([("work", 0, 11), ("work", 1, 12)], rows, now=3.0)
    assert (held.worker, held.seq, held.doing) == (0, 9, "waiting for room downstream")


class BlockingInput:
    """Yields 0, 1, ... ``blocks_at - 1``, then blocks in ``next()`` until released; then yields
    ``late`` (or raises, with ``then_raise``), and ends."""

    def __init__(self, blocks_at: int, release: threading.Event, late=99, then_raise: bool = False):
        self.count, self.blocks_at, self.release, self.late, self.then_raise = 0, blocks_at, release, late, then_raise
        self.blocked = threading.Event()  # next() waits for the release
        self.returned = threading.Event()  # next() returned (or raised) after the release

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.count <= self.blocks_at:
            return self.count - 1
        if self.count > self.blocks_at + 1:
            raise StopIteration
        self.blocked.set()
        self.release.wait(30)
        self.returned.set()
        if self.then_raise:
            raise OSError("connection reset")
        return self.late


@pytest.mark.parametrize("then_raise", [False, True])
@pytest.mark.parametrize("backend", ["process", "thread"])
def test_an_input_blocked_in_an_epoch_you_left_holds_back_only_that_epoch(backend, then_raise):
    # before: the next epoch waited for the left epoch's next() to return (for good without a timeout;
    # with one, a TimeoutError naming that input)
    release = threading.Event()
    blocking = [BlockingInput(2, release, then_raise=then_raise), BlockingInput(1, release, late=98)]
    try:
        with tq.Sequence(tq.ProcessStep(identity, 2, backend=backend), timeout=10) as seq:
            retired = []  # the feeder threads blocked in the inputs
            for epoch in blocking:
                assert next(seq(epoch)) == 0  # the second epoch is left while blocked too
                assert epoch.blocked.wait(10)
                retired.append(seq._runtime._feeder)
            assert list(seq(range(3))) == [0, 1, 2]
            assert len({*retired, seq._runtime._feeder}) == 3  # a new thread at each epoch left blocked
            release.set()  # the retired threads get 99 and 98 (or the error): dropped, not delivered
            for thread in retired:
                thread.join(10)
                assert not thread.is_alive()
            assert all(b.returned.is_set() for b in blocking)
            assert list(seq(range(10, 14))) == [10, 11, 12, 13]
    finally:
        release.set()


@pytest.mark.parametrize("pack", [False, True])
def test_an_iterator_read_in_pieces_goes_on_after_the_element_the_left_epoch_was_waiting_for(pack):
    # the next epoch reads the same iterator: it waits until the retired thread left it (before this,
    # "generator already executing"), and with a first PackStep the retired thread reads no more of it
    items, waiting = queue.Queue(), threading.Event()

    def stream():
        while True:
            if items.empty():
                waiting.set()
            item = items.get(timeout=30)
            if item is None:
                return
            yield item

    for item in range(4):
        items.put(item)
    iterator = stream()
    steps = [tq.PackStep(2), tq.ProcessStep(identity)] if pack else [tq.ProcessStep(identity)]
    with tq.Sequence(*steps, timeout=10) as seq:
        assert next(seq(iterator)) == ([0, 1] if pack else 0)
        assert waiting.wait(10)  # the feeder read 0-3 and waits for 4
        second = seq(iterator)
        for item in (4, 5, 6, None):
            items.put(item)
        assert list(second) == ([[5, 6]] if pack else [5, 6])  # 4 went to the epoch left


def test_a_blocked_input_of_an_epoch_you_left_does_not_hold_back_a_first_packstep():
    # the feeder runs a first PackStep itself: the new thread ends the left epoch's lists
    release = threading.Event()
    try:
        with tq.Sequence(tq.PackStep(2), tq.ProcessStep(len), timeout=10) as seq:
            blocking = BlockingInput(3, release)
            assert next(seq(blocking)) == 2
            assert blocking.blocked.wait(10)
            assert list(seq(range(5))) == [2, 2, 1]
    finally:
        release.set()


def test_the_named_semaphores_are_unlinked_once_every_worker_started_while_a_stuck_input_still_holds_them():
    # before close(), and whatever still holds the objects (here the feeder thread, inside stuck_input)
    release = threading.Event()

    def stuck_input():
        yield 1
        release.wait(30)

    def present(names: set[str]) -> set[str]:  # only this pipeline's: other processes may make their own
        return {name for name in names if os.path.exists(f"/dev/shm/sem.{name.lstrip('/')}")}

    try:
        with tq.Sequence(tq.ProcessStep(identity), timeout=5, context="spawn") as seq:
            iterator = seq(stuck_input())
            runtime = seq._runtime
            ours = semaphore_names(runtime._edges, runtime._events, runtime._stop, runtime._credits)
            assert ours  # spawn's context names its semaphores
            assert next(iterator) == 1
            runtime._unlinker.join(30)  # it unlinks them once the worker runs
            assert not present(ours)
            with pytest.raises(TimeoutError):
                next(iterator)
        assert not present(ours)
    finally:
        release.set()


def test_starting_the_next_epoch_behind_a_stuck_element_times_out_too():
    seq = tq.Sequence(tq.ProcessStep(stuck_on_five))
    iterator = seq(range(20))
    assert [next(iterator) for _ in range(5)] == [0, 1, 2, 3, 4]
    seq.timeout = 0.5  # from here: the workers' start (seconds on a loaded machine) counts in a timeout
    deadline = time.monotonic() + 20
    while seq.stats()["stuck_on_five"].busy_s < 0.1:  # element 5 is in the step (not merely queued)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    seq.queue_iterable(range(3))
    with pytest.raises(TimeoutError, match="'stuck_on_five'"):  # cancelling the rest waits for element 5
        iter(seq)
    assert_no_workers()


def test_no_timeout_by_default_and_a_bad_timeout_is_refused_at_the_call():
    with tq.Sequence(tq.ProcessStep(random_sleep, 2)) as seq:
        assert seq.timeout is None
        assert list(seq(range(50))) == list(range(50))
    for bad, error in [(0, ValueError), (-1, ValueError), ("5", TypeError), (True, TypeError)]:
        with pytest.raises(error, match="timeout"):
            tq.Sequence(tq.ProcessStep(identity), timeout=bad)


def test_a_step_inside_its_function_counts_as_busy_while_it_runs_and_is_the_bottleneck():
    with tq.Sequence(tq.ProcessStep(identity, name="fast"), tq.ProcessStep(stuck_on_five, name="slow")) as seq:
        iterator = seq(range(20))
        assert [next(iterator) for _ in range(5)] == [0, 1, 2, 3, 4]
        deadline = time.monotonic() + 20
        while seq.stats()["slow"].busy_s < 2.0:  # element 5 is in its function, not returned yet (the figures
            # count from before the workers start, which may take a second under fork: the fork server starts)
            assert time.monotonic() < deadline, seq.stats()
            time.sleep(0.05)
        stats = seq.stats()
        assert stats.bottleneck == "slow" and stats["slow"].utilization > 0.3
    closed = seq.stats()["slow"].busy_s
    assert seq.stats()["slow"].busy_s == closed  # a closed pipeline's figures stay as they were


def test_a_queueflow_dataset_takes_a_timeout_and_a_loader_passes_its_own():
    # the timeouts count the workers' start: 2 s leave room for a loaded machine
    dataset = tq.QueueFlowDataset(range(20), [tq.ProcessStep(stuck_on_five, name="slow")], timeout=2)
    with pytest.raises(TimeoutError, match="'slow'"):
        list(dataset)
    dataset.close()
    dataset = tq.QueueFlowDataset(range(20), [tq.ProcessStep(stuck_on_five, name="slow")])
    loader = tq.QueueFlowLoader(dataset, timeout=2)
    with pytest.raises(RuntimeError, match="DataLoader timed out after 2 seconds") as info:
        list(loader)
    assert isinstance(info.value.__cause__, TimeoutError) and "'slow'" in str(info.value.__cause__)
    dataset.close()


# -- 2. one Sequence, several threads --------------------------------------------------------------


def _join(threads: list[threading.Thread], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a consumer thread is still blocked"


def test_a_second_thread_starting_an_epoch_gets_an_error_at_once_and_the_first_goes_on():
    seq = tq.Sequence(tq.ProcessStep(random_sleep, 2))
    first_started, second_done = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def first():
        iterator = seq(range(2000))
        values = [next(iterator)]
        first_started.set()
        second_done.wait(30)
        results["first"] = values + list(iterator)

    def second():
        first_started.wait(30)
        start = time.monotonic()
        try:
            results["second"] = list(seq(range(2000)))
        except RuntimeError as exc:
            results["second"] = exc
        results["second_s"] = time.monotonic() - start
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    _join(threads, 20)
    assert results["first"] == list(range(2000))
    assert isinstance(results["second"], RuntimeError) and "one consumer at a time" in str(results["second"])
    assert results["second_s"] < 1.0
    assert list(seq(range(5))) == list(range(5))  # nothing of the refused call was queued
    seq.close()


def test_threads_sharing_one_iterator_get_every_output_once_and_all_end():
    with tq.Sequence(tq.ProcessStep(random_sleep, 2)) as seq:
        iterator = seq(range(2000))
        got: list[list[int]] = [[], [], []]

        def take(mine: list[int]) -> None:
            mine.extend(iterator)

        threads = [threading.Thread(target=take, args=(mine,)) for mine in got]
        for thread in threads:
            thread.start()
        _join(threads, 20)
        assert sorted(sum(got, [])) == list(range(2000))
        assert all(mine == sorted(mine) for mine in got)  # each thread sees them in order


@pytest.mark.parametrize("trial", range(5))
def test_a_thread_blocked_on_a_sequence_closed_by_another_gets_the_public_error(trial):
    seq = tq.Sequence(tq.ProcessStep(stuck_on_five, 2), tq.ProcessStep(identity))
    errors: list[BaseException] = []

    def consume():
        try:
            list(seq(range(20)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 20
    while seq.stats()["stuck_on_five"].busy_s <= 0.05 * trial:  # the thread waits for element 5
        assert time.monotonic() < deadline
        time.sleep(0.01)
    seq.close()
    _join([thread], 20)
    assert len(errors) == 1 and type(errors[0]) is RuntimeError, errors
    assert "closed while it was being iterated" in str(errors[0])


# -- 3. values that do not unpickle ----------------------------------------------------------------


def test_an_input_that_does_not_unpickle_in_a_worker_is_that_steps_error():
    def elements():  # a generator: elements travel one by one
        yield from [0, 1, Unrebuildable(), 3]

    with tq.Sequence(tq.ProcessStep(identity, name="first"), tq.ProcessStep(identity, name="second")) as seq:
        got = []
        with pytest.raises(ValueError) as info:
            for value in seq(elements()):
                got.append(value)
    assert got == [0, 1]
    message = str(info.value)
    assert "in step 'first'" in message and "cannot rebuild" in message
    assert "raised unpickling its input: element 2 of epoch 0" in message and "_cannot_rebuild" in message
    assert not isinstance(info.value, tq.WorkerDiedError)


def test_a_bundle_that_does_not_unpickle_fails_in_the_place_of_its_elements():
    got = []
    with tq.Sequence(tq.ProcessStep(identity, name="first"), tq.Queue(512)) as seq:
        with pytest.raises(ValueError) as info:
            for value in seq([*range(10_000), Unrebuildable(), *range(1000)]):  # a list: small elements go bundled
                got.append(value)
    found = re.search(r"in step 'first'.*raised unpickling its input: elements (\d+)-(\d+) of epoch 0", str(info.value))
    assert found, info.value
    first, last = int(found[1]), int(found[2])
    assert first <= 10_000 <= last and got == list(range(first))


def test_with_on_error_skip_the_worker_goes_on_past_an_input_that_does_not_unpickle():
    def elements():
        yield from [0, 1, Unrebuildable(), 3, 4]

    with tq.Sequence(tq.ProcessStep(identity, name="first"), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="step 'first' raised ValueError: cannot rebuild"):
            assert list(seq(elements())) == [0, 1, 3, 4]
        assert list(seq(range(5))) == list(range(5))  # the same worker, alive
        assert seq.stats()["first"].skipped == 1


def test_an_output_that_does_not_unpickle_in_the_consumer_is_the_last_steps_error():
    with tq.Sequence(tq.ProcessStep(unrebuildable_on_three, name="maker")) as seq:
        got = []
        with pytest.raises(ValueError) as info:
            for value in seq(iter(range(10))):
                got.append(value)
    assert got == [0, 1, 2]
    message = str(info.value)
    assert "in step 'maker'" in message and "cannot rebuild" in message
    assert "raised unpickling its output in the consumer: element 3 of epoch 0" in message


def test_an_output_that_does_not_unpickle_in_the_next_step_is_the_next_steps_error():
    steps = [tq.ProcessStep(unrebuildable_on_three, name="maker"), tq.ProcessStep(identity, name="taker")]
    with tq.Sequence(*steps) as seq:
        with pytest.raises(ValueError, match=r"in step 'taker'.*raised unpickling its input: element 3 of epoch 0"):
            list(seq(iter(range(10))))


# -- 5. a full /dev/shm ----------------------------------------------------------------------------

_FULL_SHM = textwrap.dedent(
    """
    import errno, json, sys
    import torch
    import torchqueue as tq

    def big(x):
        return torch.ones(4 << 20)  # 16 MiB

    out = {}
    for name, steps, inputs in [
        ("step", [tq.ProcessStep(big, name="big")], range(3)),
        ("input", [tq.ProcessStep(len, name="size")], [torch.ones(4 << 20)]),
    ]:
        try:
            with tq.Sequence(*steps) as seq:
                list(seq(inputs))
            out[name] = None
        except Exception as exc:
            out[name] = [type(exc).__name__, exc.errno if isinstance(exc, OSError) else None, str(exc)]
    print(json.dumps(out))
    """
)


def _small_shm_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _small_shm_available(), reason="needs unshare -m and mount (root) for a small /dev/shm")
def test_a_full_dev_shm_raises_oserror_enospc_saying_what_did_not_fit_and_what_to_do():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    script = f"mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {sys.executable} -c '{_FULL_SHM}'"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name, where in [("step", "in step 'big'"), ("input", "in the input iterable")]:
        kind, code, message = out[name]
        assert kind == "OSError" and code == 28, out[name]
        assert where in message and "16.0 MiB did not fit" in message and "MiB free of 8.0 MiB" in message
        assert "--shm-size" in message and "tq.Queue(n)" in message


def _broken_receive(self):
    raise ValueError("a failure in torchqueue's own loop")


def test_a_worker_that_fails_outside_its_step_says_so_with_its_traceback_in_its_death(monkeypatch):
    # before: "died: exited with code 1", the cause only on the worker's stderr (a select() of an fd over
    # 1024 was one: nothing in the error said what to change)
    from torchqueue import _loop

    monkeypatch.setattr(_loop.Loop, "receive", _broken_receive)  # the fork's workers inherit it
    with tq.Sequence(tq.ProcessStep(identity, name="w"), context="fork") as seq:
        with pytest.raises(tq.WorkerDiedError) as info:
            list(seq([1, 2]))
    message = str(info.value)
    assert "worker 0 of step 'w'" in message and "exited with code 1" in message
    assert "raising outside your function" in message
    assert message.rstrip().endswith("ValueError: a failure in torchqueue's own loop")


def test_a_loader_worker_that_fails_outside_the_dataset_says_so_in_its_death(monkeypatch):
    from torchqueue import _loop

    monkeypatch.setattr(_loop.Loop, "receive", _broken_receive)
    loader = tq.QueueFlowLoader(list(range(8)), batch_size=2, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(tq.WorkerDiedError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith("loader worker 0 (pid ") and "raising outside your function" in message
    assert message.rstrip().endswith("ValueError: a failure in torchqueue's own loop")
