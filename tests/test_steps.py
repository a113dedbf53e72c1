"""Step declarations validate their arguments at the call, saying what to change."""

import dataclasses
import queue

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import assert_no_workers, double

import torchqueue as tq

pytestmark = pytest.mark.timeout(60)  # a few tests build Sequences


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: tq.ProcessStep(42, 1), TypeError, "callable"),
        (lambda: tq.ProcessStep(double, 0), ValueError, ">= 1"),
        (lambda: tq.ProcessStep(double, 1.5), TypeError, "int"),
        (lambda: tq.ProcessStep(double, True), TypeError, "int"),
        (lambda: tq.PoolStep("f", nworkers=2), TypeError, "callable"),
        (lambda: tq.PoolStep(double, nworkers=-1), ValueError, ">= 1"),
        (lambda: tq.PoolStep(double), TypeError, "nworkers"),  # API.md: PoolStep(fn, nworkers); before: 1
        (lambda: tq.RepackStep(0), ValueError, "batch_size"),
        (lambda: tq.RepackStep(2, drop_last="yes"), TypeError, "drop_last"),
        (lambda: tq.PackStep(0), ValueError, "PackStep"),
        (lambda: tq.Queue(0), ValueError, "capacity"),
        (lambda: tq.Queue("3"), TypeError, "capacity"),
        (lambda: tq.ProcessStep(double, 1, name=""), TypeError, "name"),
        (lambda: tq.ProcessStep(double, 2, round_robin=1), TypeError, "round_robin"),
    ],
)
def test_bad_step_arguments_raise_at_the_call(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_counts_may_be_numpy_integers_as_from_a_config_and_are_kept_as_ints():
    import numpy as np

    steps = [tq.ProcessStep(double, np.int64(2)), tq.PoolStep(double, nworkers=np.int32(3)), tq.RepackStep(np.int64(4))]
    assert [
        type(v) for v in (steps[0].nworkers, steps[1].nworkers, steps[2].batch_size, tq.Queue(np.int8(5)).capacity)
    ] == [int] * 4
    with tq.Sequence(steps[0], tq.Queue(np.int64(2))) as seq:
        assert list(seq(range(3))) == [0, 2, 4]


@pytest.mark.parametrize("element", [torch.zeros(3, 4, 4), np.zeros((2, 5)), torch.tensor(1.0), np.array(2)])
def test_repack_refuses_a_bare_tensor_or_array_pointing_to_packstep(element):
    with pytest.raises(TypeError, match=r"RepackStep\(64\) got a bare .*use PackStep\(64\)"):
        tq.RepackStep(64).check(element)
    for fine in ([torch.zeros(2)], (np.zeros(2), np.ones(2)), 5, "text", {"x": torch.zeros(2)}):
        tq.RepackStep(64).check(fine)  # lists and tuples of tensors, single items: as before


def make_image(i):
    return torch.full((3, 4, 4), float(i))


def test_repack_over_image_tensors_raises_in_the_consumer_and_skip_drops_them():
    with tq.Sequence(tq.ProcessStep(make_image), tq.RepackStep(2)) as seq:
        with pytest.raises(TypeError, match="PackStep"):
            list(seq(range(3)))
    with tq.Sequence(tq.ProcessStep(make_image), tq.RepackStep(2), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="PackStep"):
            assert list(seq(range(3))) == []  # every element refused, none batched channel by channel
        assert seq.stats()["RepackStep(2)"].skipped == 3
    with tq.Sequence(tq.ProcessStep(make_image), tq.PackStep(2)) as seq:
        assert [len(batch) for batch in seq(range(3))] == [2, 1]  # what it points to: whole images


def test_steps_are_frozen_declarations():
    step = tq.ProcessStep(double, 2, name="d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.nworkers = 3  # type: ignore[misc]
    assert step == tq.ProcessStep(double, 2, name="d")


@pytest.mark.parametrize(
    "elements, error, words",
    [
        ((), ValueError, "at least one step"),
        ((tq.Queue(2),), ValueError, "at least one step"),
        ((tq.ProcessStep(double), 42), TypeError, "element 1 is an int: expected a step"),
        (([tq.ProcessStep(double)],), TypeError, r"element 0 is a list: .*tq\.Sequence\(\*steps\)"),
        ((tq.ProcessStep(double), queue.Queue(2)), TypeError, r"is a queue\.Queue: .*joins threads, not processes"),
        ((tq.ProcessStep(double), queue.SimpleQueue()), TypeError, r"queue\.SimpleQueue: .*joins threads"),
        ((tq.ProcessStep,), TypeError, r"element 0 is the class ProcessStep, not one: .*ProcessStep\(my_function, 2\)"),
        ((tq.ProcessStep(double), tq.Queue), TypeError, r"element 1 is the class Queue, .* e\.g\. Queue\(4\)"),
        ((tq.ProcessStep(double), tq.Queue(1), tq.Queue(2)), ValueError, "two queues"),
        ((tq.ProcessStep(double, name="a"), tq.ProcessStep(double, name="a")), ValueError, "unique"),
        ((tq.ProcessStep(double), mp.Queue()), ValueError, "unbounded"),
    ],
)
def test_bad_sequences_raise_at_construction(elements, error, words):
    with pytest.raises(error, match=words):
        tq.Sequence(*elements)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"ordered": "yes"}, TypeError),
        ({"on_error": "ignore"}, ValueError),
        ({"context": "thread"}, ValueError),
        ({"context": 3}, TypeError),
    ],
)
def test_bad_sequence_options_raise_at_construction(kwargs, error):
    with pytest.raises(error):
        tq.Sequence(tq.ProcessStep(double), **kwargs)


def test_a_non_iterable_input_raises_in_the_caller():
    with tq.Sequence(tq.ProcessStep(double)) as seq:
        with pytest.raises(TypeError, match="iterable"):
            seq.queue_iterable(42)

        def events():
            yield 1

        with pytest.raises(TypeError, match=r"got function: call it, seq\(events\(\.\.\.\)\)"):
            seq(events)  # the generator function, not called


@pytest.mark.parametrize("context", ["spawn"])
def test_an_unpicklable_function_raises_when_its_pipeline_starts(context):
    # steps are pickled for each worker as it starts (under fork only when the fork server is used)
    generator = (x for x in range(3))
    with tq.Sequence(tq.ProcessStep(double), tq.ProcessStep(lambda x: (generator, x)), context=context) as seq:
        with pytest.raises(TypeError, match=f"step 'lambda' cannot be pickled for the '{context}' start method"):
            seq.queue_iterable(range(3))
    assert_no_workers()
