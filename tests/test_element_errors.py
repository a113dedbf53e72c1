"""Errors name the element that failed, and a loader goes on after a batch that raised, as DataLoader does."""

from __future__ import annotations

import math
import os
import sys
import threading

import pytest
import torch
from conftest import double, fail_on_seven, failing_source, identity
from torch.utils.data import DataLoader, Dataset

import torchqueue as tq
from torchqueue import QueueFlowLoader

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def fail_on_thirteen(x):
    if x == 13:
        raise ValueError("thirteen is bad")
    return x


@pytest.mark.parametrize("ordered", [True, False])
def test_a_step_error_names_the_element_position_in_its_epoch(ordered):
    with tq.Sequence(tq.ProcessStep(fail_on_thirteen, 2, name="f"), ordered=ordered) as seq:
        list(seq(range(5)))  # epoch 0 goes through
        with pytest.raises(ValueError) as info:
            list(seq(range(20)))
    first = str(info.value).splitlines()[0]
    assert first.startswith("ValueError in step 'f' (worker pid ")
    assert first.endswith(" at element 13 of epoch 1: thirteen is bad")


@pytest.mark.parametrize(
    "steps",
    [[tq.UnpackStep()], [tq.PoolStep(identity, 2)], [tq.ProcessStep(fail_on_thirteen, 2, backend="thread", name="f")]],
)
def test_an_error_of_a_step_run_in_your_process_does_not_call_it_a_worker(steps):
    # before: "(worker pid <your own pid>)" for the UnpackStep your process runs, the PoolStep's split
    # of each element, and a thread step
    with tq.Sequence(*steps) as seq:
        with pytest.raises((TypeError, ValueError)) as info:
            list(seq(range(20)))
    first = str(info.value).splitlines()[0]
    assert f"(in your process, pid {os.getpid()})" in first and "worker pid" not in first


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    "steps",
    [
        [tq.PoolStep(fail_on_seven, 2, name="f")],
        [tq.PoolStep(fail_on_seven, 2, backend="thread", name="f")],
        [tq.ProcessStep(identity, 2), tq.PoolStep(fail_on_seven, 2, name="f")],  # the read in the pool's workers
    ],
)
def test_a_pool_error_shows_the_item_it_failed_on(steps):
    # before: "at element 1 of epoch 0" only, for an element of thousands of items
    with tq.Sequence(*steps) as seq:
        with pytest.raises(ValueError) as info:
            list(seq([[1, 2], [5, 6, 7, 8]]))
    assert " at element 1 of epoch 0, on its item 7: " in str(info.value).splitlines()[0]


@pytest.mark.parametrize(
    ("item", "shown"),
    [
        ("x" * 500, "'xxxxxxxx"),
        (_BadRepr(), "<_BadRepr instance at"),
        (list(range(1000)), "[0, 1, 2, 3, ...]"),
        (torch.arange(100_000.0), "tensor([0.0000e+00,"),  # its repr breaks rows: before, a line of its own
    ],
)
def test_a_pool_error_shows_an_item_shortened(item, shown):
    with tq.Sequence(tq.PoolStep(raise_bad_item, 2, name="f")) as seq:
        with pytest.raises(ValueError) as info:
            list(seq([[item]]))
    first = str(info.value).splitlines()[0]
    assert f"on its item {shown}" in first and first.endswith(": bad item") and len(first) < 200


def raise_bad_item(item):
    raise ValueError("bad item")


def test_bundled_elements_name_their_own_position():
    # a range is read from memory, so small elements travel bundled: each keeps its position
    with tq.Sequence(tq.ProcessStep(identity), tq.ProcessStep(fail_on_thirteen, name="g")) as seq:
        with pytest.raises(ValueError, match="at element 13 of epoch 0"):
            list(seq(range(100)))


def test_a_step_after_a_stream_step_names_the_position_in_its_own_input():
    steps = (tq.PackStep(4), tq.ProcessStep(max), tq.ProcessStep(fail_on_seven, name="after"))
    with tq.Sequence(*steps) as seq:
        with pytest.raises(ValueError, match="'after'.* at element 1 of epoch 0"):
            list(seq(range(12)))  # max of each pack of 4: 3, 7 (the second pack's), 11


def raise_at_the_third_item(items):
    for index, item in enumerate(items):
        if index == 2:
            raise KeyError("third")
        yield item


class _FailingStream(tq.UnpackStep):
    def stream(self, elements):
        return raise_at_the_third_item(elements)


def test_a_stream_step_error_names_the_position_of_the_input_element_it_took_last():
    with tq.Sequence(tq.ProcessStep(double), _FailingStream(name="s")) as seq:
        with pytest.raises(KeyError, match="step 's' .* at element 2 of epoch 0"):
            list(seq([[1], [2], [3], [4]]))


def test_a_repack_refusal_names_the_element_position():
    with tq.Sequence(tq.RepackStep(2)) as seq:
        with pytest.raises(TypeError, match="at element 1 of epoch 0.*PackStep"):
            list(seq([[1, 2], torch.zeros(3)]))


def test_an_input_error_says_it_came_from_the_input_in_the_consumers_process():
    with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
        with pytest.raises(OSError) as info:
            list(seq(failing_source(5)))
    message = str(info.value)
    first = message.splitlines()[0]
    assert first == (
        "OSError in the input iterable (read in the consumer's own process) at element 5 of epoch 0: the source broke"
    )
    assert "worker pid" not in message and str(os.getpid()) not in first
    assert "Input traceback" in message and "failing_source" in message


class Unsendable:
    def __reduce__(self):
        raise RuntimeError("this object does not pickle")


def test_an_input_element_that_does_not_pickle_is_named_as_the_inputs():
    with tq.Sequence(tq.ProcessStep(double, name="f")) as seq:
        with pytest.raises(TypeError) as info:
            list(seq([1, Unsendable(), 3]))
    first = str(info.value).splitlines()[0]
    assert first == (
        "TypeError in the input iterable (read in the consumer's own process) at element 1 of epoch 0: "
        "the element cannot be sent to step 'f' in another process: this object does not pickle"
    )
    assert "Input traceback" in str(info.value) and "produced" not in str(info.value)


def unsendable_every_500th(x):
    return Unsendable() if x % 500 == 499 else x


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_outputs_that_do_not_pickle_are_skipped_with_on_error_skip_in_their_places(backend):
    """Small elements travel bundled: each one that does not pickle is dropped alone, its neighbours kept."""
    steps = (tq.ProcessStep(unsendable_every_500th, backend=backend, name="make"), tq.ProcessStep(identity))
    with tq.Sequence(*steps, on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="step 'make' produced a value that cannot be sent"):
            assert list(seq(range(2000))) == [x for x in range(2000) if x % 500 != 499]
        assert seq.stats()["make"].skipped == 4
        assert list(seq([1, 2])) == [1, 2]


def lock_for_three(x):
    return threading.Lock() if x == 3 else 10 * x


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_pool_items_value_that_does_not_pickle_is_dropped_as_an_item_that_raised(backend):
    # before: "TypeError: 'Skipped' object is not iterable" in the join: the whole part was skipped
    steps = (tq.PackStep(4), tq.PoolStep(lock_for_three, 2, name="fp", backend=backend), tq.ProcessStep(identity))
    with tq.Sequence(*steps, on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="step 'fp' produced a value that cannot be sent"):
            assert list(seq(range(8))) == [[0, 10, 20], [40, 50, 60, 70]]
        assert seq.stats()["fp"].skipped == 1
    with tq.Sequence(*steps) as seq:
        with pytest.raises(TypeError, match="step 'fp' .*at element 0 of epoch 0: step 'fp' produced a value"):
            list(seq(range(8)))


def test_an_unpicklable_element_among_many_small_ones_is_named_by_its_own_position():
    with tq.Sequence(tq.ProcessStep(identity, name="f")) as seq:
        with pytest.raises(TypeError, match="at element 1500 of epoch 0: the element cannot be sent to step 'f'"):
            list(seq([Unsendable() if i == 1500 else i for i in range(2000)]))
    with tq.Sequence(tq.ProcessStep(unsendable_every_500th, name="make"), tq.ProcessStep(identity)) as seq:
        with pytest.raises(TypeError, match="step 'make' .* at element 499 of epoch 0: step 'make' produced"):
            list(seq(range(2000)))


def test_a_thread_steps_value_that_does_not_pickle_shows_a_traceback_of_your_process():
    steps = (tq.ProcessStep(lambda x: Unsendable(), backend="thread", name="make"), tq.ProcessStep(identity))
    with tq.Sequence(*steps) as seq:
        with pytest.raises(TypeError) as info:
            list(seq([1]))
    message = str(info.value)
    assert message.startswith(f"TypeError in step 'make' (in your process, pid {os.getpid()}) at element 0 of epoch 0")
    assert "Your process's traceback" in message and "Worker traceback" not in message


def open_missing(x):
    with open(f"/nonexistent/{x}"):
        pass


def test_an_os_error_keeps_its_errno_and_says_its_errno_once():
    with tq.Sequence(tq.ProcessStep(open_missing)) as seq:
        with pytest.raises(FileNotFoundError) as info:
            list(seq([7]))
    first = str(info.value).splitlines()[0]
    assert first.startswith("FileNotFoundError in step 'open_missing'") and first.count("[Errno 2]") == 1
    assert info.value.errno == 2 and info.value.__cause__.filename == "/nonexistent/7"


class KeyErrorAt(Dataset):
    """Raises ``KeyError`` for the indices in ``bad``."""

    def __init__(self, size, bad):
        self.size, self.bad = size, set(bad)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index in self.bad:
            raise KeyError(index)
        return index


class _Items(KeyErrorAt):
    def __getitems__(self, indices):
        return [self[index] for index in indices]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_map_style_dataset_error_names_the_dataset_index(num_workers):
    loader = QueueFlowLoader(KeyErrorAt(40, [13]), batch_size=4, num_workers=num_workers)
    with pytest.raises(KeyError) as info:
        list(loader)
    if num_workers:
        first = str(info.value).splitlines()[0]
        assert first.startswith("KeyError in __getitem__(13) of batch 3 (loader worker 1, pid ")
    else:  # raised as it is, as by DataLoader, with a note where Python has them
        assert info.value.args == (13,)
        if sys.version_info >= (3, 11):
            assert info.value.__notes__ == ["raised in __getitem__(13) of batch 3"]


def test_a_dataset_with_getitems_names_the_batch_call_and_a_collate_error_names_collate_fn():
    with pytest.raises(KeyError, match=r"KeyError in __getitems__\(\[12, 13, 14, 15\]\) of batch 3"):
        list(QueueFlowLoader(_Items(40, [13]), batch_size=4, num_workers=1))

    def bad_collate(batch):
        raise ValueError("cannot collate")

    with pytest.raises(ValueError, match="ValueError in collate_fn of batch 0"):
        list(QueueFlowLoader(KeyErrorAt(8, []), batch_size=4, num_workers=1, collate_fn=bad_collate))


def _catch_and_skip(loader):
    """Every batch of one epoch, ``None`` where next() raised (a catch-and-skip loop)."""
    out = []
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return out
        except KeyError:
            out.append(None)
            continue
        out.append(batch.tolist())


@pytest.mark.parametrize(
    "num_workers, persistent, in_order",
    [(0, False, True), (2, False, True), (2, True, True), (2, False, False)],
)
def test_a_catch_and_skip_loop_gets_every_other_batch_in_order_as_with_dataloader(num_workers, persistent, in_order):
    def loader(cls):
        generator = torch.Generator().manual_seed(0)
        dataset = KeyErrorAt(41, [3, 17, 18, 40])
        return cls(
            dataset,
            batch_size=4,
            shuffle=True,
            num_workers=num_workers,
            generator=generator,
            persistent_workers=persistent,
            in_order=in_order,
        )

    ours, theirs = loader(QueueFlowLoader), loader(DataLoader)
    for _ in range(2):  # and the next epoch runs as usual
        got, expected = _catch_and_skip(ours), _catch_and_skip(theirs)
        if not in_order:  # as they are ready: the same batches
            got, expected = sorted(got, key=str), sorted(expected, key=str)
        assert got == expected
        assert len(got) == math.ceil(41 / 4) and got.count(None) == sum(b is None for b in expected) >= 3
    ours.close()


def test_the_failed_batch_counts_as_consumed_in_a_checkpoint():
    loader = QueueFlowLoader(KeyErrorAt(16, [1]), batch_size=4, num_workers=2)
    iterator = iter(loader)
    with pytest.raises(KeyError):
        next(iterator)
    state = loader.state_dict()
    del iterator
    resumed = QueueFlowLoader(KeyErrorAt(16, [1]), batch_size=4, num_workers=2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
