"""Resuming a QueueFlowLoader over a QueueFlowDataset: exactly the batches an uninterrupted run still
yields, and no step runs again on what the consumed batches were made of (API.md, section 4)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import torchqueue as tq
from torchqueue import QueueFlowLoader
from torchqueue.sources import H5Chunks, read_h5_chunk

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_leaks")]


def read_logged(log: Path, chunk: tuple[str, int, int]) -> list[torch.Tensor]:
    """The chunk's events, one tensor each; the chunk's start is written to ``log`` (one line per call)."""
    with open(log, "a") as f:
        f.write(f"{chunk[1]}\n")
    energy = read_h5_chunk(chunk, keys=["energy"])["energy"]
    return [torch.tensor([value]) for value in energy]


def collate(events: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(events)


def reads(log: Path) -> list[int]:
    """The chunk starts read since the last call (the log is emptied)."""
    if not log.exists():
        return []
    starts = sorted(int(line) for line in log.read_text().split())
    log.unlink()
    return starts


@pytest.fixture
def events(tmp_path: Path) -> str:
    path = tmp_path / "events.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("energy", data=np.arange(100, dtype=np.float32))
    return str(path)


def seed_shape(path: str, log: Path, **kwargs) -> QueueFlowLoader:
    """The seed's shape over one file: chunks of 16 events, read in 2 processes, batches of 10."""
    chunks = H5Chunks([path], length_key="energy", chunk_size=16, shuffle=False)
    steps = [tq.ProcessStep(functools.partial(read_logged, log), 2), tq.RepackStep(10), tq.ProcessStep(collate)]
    return QueueFlowLoader(tq.QueueFlowDataset(chunks, steps, **kwargs))


def taken(loader: QueueFlowLoader, n: int) -> tuple[list[torch.Tensor], dict]:
    """The first ``n`` batches of an epoch and the checkpoint after them; the loader is closed."""
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(n)]
    state = loader.state_dict()
    del iterator
    loader.close()
    return batches, state


@pytest.mark.parametrize("cut", [1, 3, 5, 9])
def test_a_resumed_loader_reads_again_only_the_chunk_the_last_batch_ended_in(events, tmp_path, cut):
    log = tmp_path / "reads.log"
    whole = seed_shape(events, log)
    full = list(whole)
    whole.close()
    assert reads(log) == list(range(0, 100, 16))
    head, state = taken(seed_shape(events, log), cut)
    assert torch.equal(torch.cat(head), torch.cat(full[:cut]))
    reads(log)
    resumed = seed_shape(events, log)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert torch.equal(torch.cat(rest), torch.cat(full[cut:])) and len(rest) == len(full) - cut
    # batch ``cut`` ends at event 10 * cut: the chunk holding event 10 * cut is read again (the one after it,
    # where the batch ends with a chunk), and none before it
    first = 10 * cut // 16 * 16
    assert reads(log) == list(range(first, 100, 16))
    assert torch.equal(torch.cat(list(resumed)), torch.cat(full))  # the next epoch is whole
    resumed.close()


def test_a_resumed_loader_checkpoints_again_and_resumes_again(events, tmp_path):
    log = tmp_path / "reads.log"
    whole = seed_shape(events, log)
    full = torch.cat(list(whole))
    whole.close()
    _, state = taken(seed_shape(events, log), 2)
    again = seed_shape(events, log)
    again.load_state_dict(state)
    middle, state = taken(again, 3)
    reads(log)
    last = seed_shape(events, log)
    last.load_state_dict(state)
    rest = list(last)
    last.close()
    assert torch.equal(torch.cat(middle + rest), full[20:])
    assert reads(log) == list(range(48, 100, 16))  # batch 5 ends at event 50, in the chunk from 48


def test_the_loaders_own_batches_of_outputs_resume_after_their_last_output(tmp_path):
    def make():
        steps = [tq.ProcessStep(functools.partial(list_logged, tmp_path / "calls.log"), 2), tq.UnpackStep()]
        return QueueFlowLoader(tq.QueueFlowDataset(list(range(8)), steps), batch_size=3)

    whole = make()
    full = [b.tolist() for b in whole]
    whole.close()
    head, state = taken(make(), 4)  # 12 outputs: element 2 (outputs 10-14) was used in part
    reads(tmp_path / "calls.log")
    resumed = make()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in head] + [b.tolist() for b in resumed] == full
    resumed.close()
    assert reads(tmp_path / "calls.log") == list(range(2, 8))


def list_logged(log: Path, i: int) -> list[int]:
    """Five numbers of element ``i``; ``i`` is written to ``log``."""
    with open(log, "a") as f:
        f.write(f"{i}\n")
    return [i * 5 + j for j in range(5)]


def test_a_rank_with_a_length_resumes_with_exactly_its_remaining_batches(tmp_path):
    def make():
        steps = [tq.ProcessStep(functools.partial(list_logged, tmp_path / "calls.log"), 2), tq.RepackStep(4)]
        dataset = tq.QueueFlowDataset(list(range(8)), steps, length=7)  # 4 chunks, 20 items: 5 lists; padded to 7
        return QueueFlowLoader(dataset, rank=0, world_size=2)

    with pytest.warns(UserWarning, match="read again from the start"):
        whole = make()
        full = list(whole)
    whole.close()
    assert len(full) == 7
    with pytest.warns(UserWarning, match="read again from the start"):
        head, state = taken(make(), 3)
        reads(tmp_path / "calls.log")
        resumed = make()
        resumed.load_state_dict(state)
        rest = list(resumed)
    resumed.close()
    assert head + rest == full
    # this rank's chunks are 0, 2, 4, 6 (20 items): 3 lists end inside chunk 4, where the rest of the first pass
    # begins; the pass that pads reads from chunk 0 again (computing the epoch's start again would read it twice)
    calls = reads(tmp_path / "calls.log")
    assert calls.count(0) == calls.count(2) == 1 and calls.count(4) >= 1


class OwnRepack(tq.RepackStep):
    """A RepackStep of the user's, with its own ``stream``: where its lists leave the input is not known."""

    def stream(self, elements):
        yield from super().stream(elements)


@pytest.mark.parametrize("kwargs", [{"ordered": False}, {"own": True}])
def test_where_the_origin_is_not_known_the_epoch_is_computed_again_and_the_rest_is_exact(tmp_path, kwargs):
    def make():
        repack = OwnRepack(4) if kwargs.get("own") else tq.RepackStep(4)
        steps = [tq.ProcessStep(functools.partial(list_logged, tmp_path / "calls.log"), 1), repack]
        return QueueFlowLoader(tq.QueueFlowDataset(list(range(6)), steps, ordered=kwargs.get("ordered", True)))

    whole = make()
    full = sorted(map(sorted, whole))
    whole.close()
    head, state = taken(make(), 2)
    assert state["stream_origin"] is None and state["stream_yielded"] == 2
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    resumed.close()
    assert len(head) + len(rest) == len(full)
    if kwargs.get("own"):  # in order: exactly the rest
        assert sorted(map(sorted, head + rest)) == full


def test_a_checkpoint_at_a_ranks_short_last_batch_resumes_with_nothing_left(tmp_path):
    # a reviewer's find: the outputs given were counted as batches times the batch size (6 for 2 + 2 + 1),
    # past the rank's length of 5, and the resumed loader padded for ever
    def make():
        steps = [tq.ProcessStep(functools.partial(list_logged, tmp_path / "calls.log"), 1), tq.UnpackStep()]
        dataset = tq.QueueFlowDataset(list(range(2)), steps, length=5)  # this rank: element 0, 5 outputs
        return QueueFlowLoader(dataset, batch_size=2, rank=0, world_size=2)

    loader = make()
    for _ in loader:
        state = loader.state_dict()  # taken in the loop: the last one at the short batch
    loader.close()
    assert state["stream_yielded"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    assert list(resumed) == []
    resumed.close()


class LengthRaises(list):
    """A list whose ``len()`` raises, as some lazy containers' do."""

    def __len__(self):
        raise TypeError("length not known")


def items_in_a_length_raising_list(i: int) -> LengthRaises:
    return LengthRaises([10 * i, 10 * i + 1, 10 * i + 2])


def test_elements_whose_length_raises_are_repacked_and_resumed():
    # a reviewer's find: the stream steps' cursors asked len() of every element that has a __len__
    def make():
        steps = [tq.ProcessStep(items_in_a_length_raising_list, 1), tq.RepackStep(2)]
        return QueueFlowLoader(tq.QueueFlowDataset(list(range(3)), steps))

    whole = make()
    full = list(whole)
    whole.close()
    assert full == [[0, 1], [2, 10], [11, 12], [20, 21], [22]]
    head, state = taken(make(), 3)
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    resumed.close()


@pytest.mark.parametrize("ordered", [True, False])
def test_a_checkpoint_saved_again_before_the_first_batch_keeps_its_place(tmp_path, ordered):
    # a reviewer's find (older than the origins): saved again between load_state_dict and iter(), the
    # checkpoint had no place in the epoch, and its resume began the epoch again
    def make():
        steps = [tq.ProcessStep(functools.partial(list_logged, tmp_path / "calls.log"), 1), tq.RepackStep(2)]
        return QueueFlowLoader(tq.QueueFlowDataset(list(range(2)), steps, ordered=ordered))

    _, state = taken(make(), 2)
    loaded = make()
    loaded.load_state_dict(state)
    before_iter = loaded.state_dict()
    iterator = iter(loaded)
    before_next = loaded.state_dict()
    del iterator
    loaded.close()
    for saved in (before_iter, before_next):
        assert saved["stream_yielded"] == 2
        resumed = make()
        resumed.load_state_dict(saved)
        assert len(list(resumed)) == 3  # 10 items in lists of 2: the 3 not yielded
        resumed.close()


def seven_skipped(i: int) -> int:
    if i % 7 == 3:
        raise ValueError(i)
    return i


@pytest.mark.filterwarnings("ignore:step 'seven_skipped' raised:RuntimeWarning")
def test_in_a_bundle_whose_first_element_was_skipped_each_value_has_its_own_origin():
    # a reviewer's find: the message's origin (its first element's) was given to its first value
    with tq.Sequence(tq.Queue(1024), tq.ProcessStep(seven_skipped, 1), tq.Queue(1024), on_error="skip") as seq:
        epoch = seq._resumable(range(500))
        origins = {}
        while True:
            try:
                value, origin = epoch._next_with_origin()
            except StopIteration:
                break
            origins[value] = origin
    assert len(origins) == 500 - 71 and all(origin == (value + 1, ()) for value, origin in origins.items())


def five_late(i: int) -> list[int]:
    if i == 0:
        time.sleep(0.5)  # element 0 comes late: another one reaches the consumer first
    return [i * 10 + j for j in range(5)]


def test_out_of_order_a_last_unpack_steps_items_have_no_origin_and_resume_computes_the_epoch_again():
    # a reviewer's find: the first element that came had an origin as if it were the epoch's first
    def make():
        return QueueFlowLoader(
            tq.QueueFlowDataset(list(range(6)), [tq.ProcessStep(five_late, 2), tq.UnpackStep()], ordered=False)
        )

    head, state = taken(make(), 2)
    assert state["stream_origin"] is None
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    resumed.close()
    assert sorted(head + rest) == sorted(i * 10 + j for i in range(6) for j in range(5))


def test_a_loader_copied_mid_epoch_keeps_where_its_epoch_stands(events, tmp_path):
    # the batches' origins are told by the pass that made them, which does not pickle: a copy keeps the origin
    import copy
    import pickle

    loader = seed_shape(events, tmp_path / "reads.log")
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    for copied in (copy.deepcopy(loader), pickle.loads(pickle.dumps(loader))):
        assert copied.state_dict()["stream_origin"] == state["stream_origin"] == [1, [[1, 4]]]
    del iterator
    loader.close()
