"""Errors reach the consumer with their type, step and traceback; dead workers never hang it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import (
    NeedsTwoArgs,
    assert_no_workers,
    double,
    exit_hard,
    fail_on_seven,
    failing_source,
    identity,
    kill_self,
    raise_two_args,
    raise_unrebuildable,
    random_sleep,
)

import torchqueue as tq

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


@pytest.mark.parametrize("ordered", [True, False])
def test_a_step_exception_is_raised_with_its_type_step_and_traceback(start_method, ordered):
    got = []
    seq = tq.Sequence(tq.ProcessStep(fail_on_seven, 2, name="checker"), ordered=ordered, context=start_method)
    with pytest.raises(ValueError) as info:
        for value in seq(range(20)):
            got.append(value)
    message = str(info.value)
    assert "element seven is bad" in message and "checker" in message
    assert "Traceback" in message and "fail_on_seven" in message
    if ordered:  # everything before the failing element was delivered, nothing after
        assert got == list(range(7))
    seq.close()
    assert_no_workers()


def test_regression_1_an_exception_does_not_end_the_epoch_as_if_it_finished():
    with tq.Sequence(tq.PoolStep(fail_on_seven, nworkers=2), tq.RepackStep(4)) as seq:
        with pytest.raises(ValueError, match="seven"):
            list(seq([list(range(5)), list(range(5, 10))]))


def test_an_exception_that_cannot_be_rebuilt_becomes_a_pipeline_error():
    with tq.Sequence(tq.ProcessStep(raise_unrebuildable, name="odd")) as seq:
        with pytest.raises(tq.PipelineError, match="Unpicklable in step 'odd'"):
            list(seq(range(3)))


def raise_with_a_lock(x):
    raise ValueError("corrupt record", threading.Lock())  # its arguments do not pickle


def test_an_exception_whose_arguments_do_not_pickle_keeps_its_type_as_in_dataloader():
    with tq.Sequence(tq.ProcessStep(raise_with_a_lock, name="reader")) as seq:
        with pytest.raises(ValueError, match="corrupt record") as info:
            list(seq(range(3)))
    assert not isinstance(info.value, tq.PipelineError) and "reader" in str(info.value)
    assert "Traceback" in str(info.value) and "raise_with_a_lock" in str(info.value)


def bad_json(x):
    json.loads("{not json")


def bad_command(x):
    raise subprocess.CalledProcessError(3, ["cmd"])


@pytest.mark.parametrize(
    ("fn", "kind", "in_text"),
    [
        (raise_two_args, NeedsTwoArgs, True),
        (bad_json, json.JSONDecodeError, True),
        (bad_command, subprocess.CalledProcessError, False),
    ],
)
def test_an_exception_whose_type_wants_more_than_a_message_keeps_its_type(fn, kind, in_text):
    with tq.Sequence(tq.ProcessStep(fn, name="parse")) as seq:
        with pytest.raises(kind) as info:
            list(seq(range(3)))
    error = info.value
    assert type(error) is kind
    shown = str(error) if in_text else "\n".join(getattr(error, "__notes__", []))  # a note where __str__ ignores args
    assert "in step 'parse'" in shown and "Worker traceback" in shown
    if kind is NeedsTwoArgs:
        assert error.b == "b"  # the worker's own object, attributes and all


def stop_at_three(x):
    if x == 3:
        raise StopIteration  # a step's bug: next() on an exhausted iterator
    return x


def test_a_stop_iteration_in_a_step_is_an_error_not_the_end_of_the_epoch():
    # before: raised in the consumer's next(), it ended the epoch there: [0, 1, 2] of 6, silently
    with tq.Sequence(tq.ProcessStep(stop_at_three, 2, name="s")) as seq:
        it = seq(range(6))
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        with pytest.raises(tq.PipelineError, match="StopIteration in step 's'.* at element 3 of epoch 0") as info:
            next(it)
    assert isinstance(info.value.__cause__, StopIteration)


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")


class WithCode(Exception):
    def __init__(self, message, code=0):
        super().__init__(message)
        self.code = code


def raise_unprintable(x):
    raise Unprintable(x)


def raise_with_code(x):
    raise WithCode(f"bad {x}", code=42)


def test_an_exception_whose_str_raises_keeps_its_type_and_place():
    # before: the worker died formatting it: WorkerDiedError, "exited with code 1", type and place lost
    with tq.Sequence(tq.ProcessStep(raise_unprintable, 1, name="s")) as seq:
        with pytest.raises(Unprintable) as info:
            list(seq(range(3)))
    assert "its str() raised" in "".join(getattr(info.value, "__notes__", [])) + repr(info.value.args)


def test_an_exception_keeps_its_own_attributes():
    # before: WithCode("bad 0", code=42) arrived with code 0 (rebuilt from its message alone)
    with tq.Sequence(tq.ProcessStep(raise_with_code, 1, name="s")) as seq:
        with pytest.raises(WithCode, match="WithCode in step 's'.*bad 0") as info:
            list(seq(range(3)))
    assert info.value.code == 42


def test_an_exception_of_the_input_iterable_is_raised_in_order():
    got = []
    with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
        with pytest.raises(OSError, match="the source broke") as info:
            for value in seq(failing_source(5)):
                got.append(value)
    assert got == [0, 2, 4, 6, 8] and "in the input iterable" in str(info.value)


def test_a_failed_sequence_refuses_further_use_with_a_clear_error():
    seq = tq.Sequence(tq.ProcessStep(fail_on_seven))
    with pytest.raises(ValueError):
        list(seq(range(10)))
    with pytest.raises(tq.PipelineError, match="earlier error") as info:
        seq.queue_iterable(range(3))
    # the earlier error in one line (before: its repr, the worker's traceback with \n escapes)
    assert "\\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert "earlier error (ValueError: ValueError in step 'fail_on_seven'" in str(info.value)
    seq.close()


def test_regression_2_a_failed_or_closed_sequence_does_not_affect_another():
    failed = tq.Sequence(tq.ProcessStep(fail_on_seven, 2))
    with pytest.raises(ValueError):
        list(failed(range(10)))
    closed = tq.Sequence(tq.ProcessStep(double, 2))
    list(closed(range(3)))
    closed.close()
    with tq.Sequence(tq.ProcessStep(double, 2)) as fresh:
        assert list(fresh(range(10))) == [2 * i for i in range(10)]
    failed.close()


@pytest.mark.parametrize(
    "steps, element, words",
    [
        ((tq.UnpackStep(),), 5, "UnpackStep"),
        ((tq.PoolStep(double, nworkers=2),), 5, "PoolStep"),
        ((tq.ProcessStep(identity), tq.PackStep(2), tq.UnpackStep(), tq.UnpackStep()), 5, "UnpackStep"),
    ],
)
def test_regression_4_an_error_in_a_stream_step_is_raised_not_hung(steps, element, words):
    with tq.Sequence(*steps) as seq:
        with pytest.raises(TypeError, match=words):
            list(seq([element]))


def test_on_error_skip_drops_failing_elements_warns_once_and_counts_them():
    with tq.Sequence(tq.ProcessStep(fail_on_seven, 2, name="checker"), on_error="skip") as seq:
        # the warning names where (before: "step 'checker' raised ValueError: ...", no element)
        with pytest.warns(RuntimeWarning, match="step 'checker' raised ValueError at element 7 of epoch 0") as warned:
            out = list(seq(list(range(20)) + [7, 7]))
        assert out == [x for x in range(20) if x != 7]
        assert len([w for w in warned if "checker" in str(w.message)]) == 1
        stats = seq.stats()
        assert stats["checker"].skipped == 3
    # the table says where the 3 of 22 went (before: in 22, out 19, and no column to tell)
    header, row = (line.split() for line in str(stats).splitlines()[:2])
    assert header[:5] == ["step", "workers", "in", "out", "skipped"] and row[:5] == ["checker", "2", "22", "19", "3"]


def test_on_error_skip_in_a_pool_drops_only_the_failing_items():
    with tq.Sequence(tq.PoolStep(fail_on_seven, nworkers=2, name="pool"), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="pool"):
            out = list(seq([list(range(5)), list(range(5, 10))]))
    assert out == [[0, 1, 2, 3, 4], [5, 6, 8, 9]]


def test_on_error_skip_drops_an_element_a_pool_cannot_split_as_stream_steps_drop_theirs():
    with tq.Sequence(tq.PoolStep(double, nworkers=2, name="pool"), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="pool.*PoolStep needs iterable elements"):
            out = list(seq([[1, 2], 5, [3]]))
        assert out == [[2, 4], [6]]
        assert seq.stats()["pool"].skipped == 1


def test_on_error_skip_in_a_stream_step_drops_bad_elements():
    with tq.Sequence(tq.UnpackStep(), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="UnpackStep"):
            assert list(seq([[1, 2], 3, [4]])) == [1, 2, 4]


@pytest.mark.parametrize("function, words", [(kill_self, "SIGKILL"), (exit_hard, "code 7")])
def test_regression_6_a_dead_worker_raises_worker_died_error_naming_step_and_cause(function, words):
    start = time.monotonic()
    with tq.Sequence(
        tq.ProcessStep(random_sleep, 2), tq.ProcessStep(function, 2, name="fragile"), tq.RepackStep(3)
    ) as seq:
        with pytest.raises(tq.WorkerDiedError, match=words) as info:
            list(seq(range(50)))
    assert "fragile" in str(info.value)
    assert "while working on element " in str(info.value)  # before: no position (the contract asks for it)
    assert time.monotonic() - start < 15


@pytest.fixture
def sigchld_ignored():
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGCHLD, previous)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_dead_worker_is_seen_where_sigchld_is_ignored(context, sigchld_ignored):
    # Daemons and servers ignore SIGCHLD: the kernel then reaps the children as they exit, waitpid
    # fails, and multiprocessing took a dead worker for a running one: the loop waited for ever.
    start = time.monotonic()
    with tq.Sequence(tq.ProcessStep(kill_self, 2, name="fragile"), context=context) as seq:
        with pytest.raises(tq.WorkerDiedError, match="fragile.*ignores SIGCHLD") as info:
            list(seq(range(50)))
    assert "the system reaped it" in str(info.value)
    assert time.monotonic() - start < 15
    with tq.Sequence(tq.ProcessStep(double, 2), context=context) as seq:  # workers that leave as asked: no error
        assert list(seq(range(20))) == [2 * x for x in range(20)]
        assert list(seq(range(5))) == [0, 2, 4, 6, 8]


def die_in_the_middle_of_sending(x):
    """Returns ``x``, and the worker is killed once half of the message carrying it is in the pipe
    (as the OOM killer might do while a large output is written)."""
    import signal

    import torchqueue._channel as channel

    write_all = channel._write_all

    def write_half_then_die(fd, buffers, alive):
        header, body = buffers
        write_all(fd, [header, memoryview(body)[: len(body) // 2]], alive)
        os.kill(os.getpid(), signal.SIGKILL)

    channel._write_all = write_half_then_die
    return x


def test_a_worker_killed_in_the_middle_of_a_message_raises_instead_of_hanging():
    # a large output that is not a tensor or array travels in the pipe itself
    with tq.Sequence(tq.ProcessStep(die_in_the_middle_of_sending, 1, name="sender"), context="fork") as seq:
        with pytest.raises(tq.WorkerDiedError, match="sender"):
            list(seq([b"x" * (4 << 20)]))


def test_a_worker_that_cannot_start_is_reported_with_its_traceback(tmp_path):
    module = tmp_path / "vanishing_module.py"
    module.write_text(
        textwrap.dedent("""
        def inc(x):
            return x + 1
    """)
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import vanishing_module

        seq = tq.Sequence(tq.ProcessStep(vanishing_module.inc, name="inc"), context="spawn")
        module.unlink()
        with pytest.raises(tq.PipelineError, match="could not start") as info:
            list(seq(range(3)))
        assert "vanishing_module" in str(info.value)
        seq.close()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("vanishing_module", None)


def raise_bare_stop(x):
    raise StopIteration


def test_an_exception_without_a_message_is_not_said_to_have_a_str_that_raised():
    # before: "StopIteration in step 's' ... of epoch 0: <StopIteration: its str() raised>" (its str() is "")
    with tq.Sequence(tq.ProcessStep(raise_bare_stop, 1, name="s")) as seq:
        with pytest.raises(tq.PipelineError) as info:
            list(seq(range(3)))
    first = str(info.value).splitlines()[0]
    assert first.endswith(" at element 0 of epoch 0")  # as Python prints it: "StopIteration", no ": "


def run_a_pipeline_of_processes(n):
    with tq.Sequence(tq.ProcessStep(double, 1)) as seq:
        return list(seq(range(n)))


def test_a_pipeline_of_processes_inside_a_worker_says_what_to_do_instead():
    # before: multiprocessing's bare "AssertionError: daemonic processes are not allowed to have children"
    with tq.Sequence(tq.ProcessStep(run_a_pipeline_of_processes, 1, name="outer")) as seq:
        with pytest.raises(RuntimeError, match="outer.*cannot start a worker process here.*backend='thread'"):
            list(seq([3]))
