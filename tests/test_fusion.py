"""Stage boundaries that cost nothing: a one-worker step fused into the stream stage before it, and
pool parts sized by the pool's cost. Both keep the contract: outputs, order, epochs, errors, stats,
random streams and worker info are those of the pipeline as declared."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from conftest import square

import torchqueue as tq
from torchqueue._plan import JoinStep, make_plan
from torchqueue._transport import PartSizer
from torchqueue.stats import NFIELDS, Field

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


def where(batch):
    """The step and process that ran this function, with the batch's sum."""
    info = tq.get_worker_info()
    return info.step, os.getpid(), sum(batch)


def draw(batch):
    return torch.rand(1).item()


def spin_sum(batch):
    """``sum(batch)`` after 20 ms on a CPU (this thread's clock: preemption does not shorten it)."""
    end = time.thread_time() + 0.02
    while time.thread_time() < end:
        pass
    return sum(batch)


def fails_on_third(batch):
    if batch[0] == 8:
        raise ValueError("bad batch")
    return sum(batch)


# -- the plan ------------------------------------------------------------------------------------


def test_a_one_worker_step_right_after_a_stream_step_is_fused_into_it():
    plan = make_plan((tq.ProcessStep(abs, 2), tq.RepackStep(4), tq.ProcessStep(sum, 1), tq.Queue(3)))
    assert plan.fused == {2}
    assert plan.fused_into(1) is plan.stages[2] and plan.output_edge(1) == 3
    assert plan.credits(1) == 3  # the consumer's Queue(3); no edge and no worker of its own for the fused step


@pytest.mark.parametrize(
    "elements",
    [
        (tq.RepackStep(4), tq.Queue(2), tq.ProcessStep(sum, 1)),  # a declared queue keeps them apart
        (tq.RepackStep(4), tq.ProcessStep(sum, 2)),  # two workers: a process of their own
        (tq.ProcessStep(abs, 1), tq.ProcessStep(abs, 1)),  # not after a stream step
    ],
)
def test_no_fusion_where_the_user_asked_for_a_queue_or_for_workers(elements):
    assert make_plan(elements).fused == frozenset()


def test_a_pool_then_a_one_worker_step_fuses_the_step_into_the_join_which_takes_the_declared_queue():
    plan = make_plan((tq.PoolStep(abs, 2), tq.Queue(5), tq.ProcessStep(sum, 1)))
    assert [type(s.step) for s in plan.stages] == [tq.PoolStep, JoinStep, tq.ProcessStep]
    assert plan.fused == {2}
    assert plan.capacities[1] == 5  # the queue is before the join


# -- running -------------------------------------------------------------------------------------


def test_the_fused_step_runs_in_the_stream_stages_process_and_sees_its_own_worker_info(start_method):
    with tq.Sequence(tq.ProcessStep(abs, 1), tq.RepackStep(4), tq.ProcessStep(where, 1), context=start_method) as seq:
        for _ in range(2):  # epochs
            out = list(seq(range(10)))
            assert [s for _, _, s in out] == [6, 22, 17]  # the last batch is partial
        assert len(seq._runtime.workers) == 2  # abs and the repack (with where in it)
        repack_pid = [p.pid for name, _, p in seq._runtime.workers if name == "RepackStep(4)"]
    assert {(name, pid) for name, pid, _ in out} == {("where", repack_pid[0])}


def test_the_seed_shape_with_a_fused_collate_matches_the_steps_run_in_order(start_method):
    data = [list(range(i, i + 7)) for i in range(0, 70, 7)]
    with tq.Sequence(
        tq.PoolStep(square, nworkers=2), tq.RepackStep(16), tq.ProcessStep(sum, 1), tq.Queue(2), context=start_method
    ) as seq:
        flat = [x * x for chunk in data for x in chunk]
        expected = [sum(flat[i : i + 16]) for i in range(0, len(flat), 16)]
        assert list(seq(data)) == expected
        assert list(seq(data)) == expected


def test_a_failure_in_the_fused_step_names_it_and_the_element():
    with tq.Sequence(tq.RepackStep(4), tq.ProcessStep(fails_on_third, 1)) as seq:
        it = seq(range(20))
        assert [next(it), next(it)] == [6, 22]
        with pytest.raises(ValueError, match="'fails_on_third'.* at element 2 of epoch 0: bad batch"):
            next(it)


def test_on_error_skip_in_the_fused_step_drops_the_batch_and_counts_it_on_that_step():
    with tq.Sequence(tq.RepackStep(4), tq.ProcessStep(fails_on_third, 1), on_error="skip") as seq:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert list(seq(range(20))) == [6, 22, 54, 70]
        stats = seq.stats()
    assert any("'fails_on_third'" in str(w.message) for w in caught)
    assert stats["fails_on_third"].skipped == 1 and stats["RepackStep(4)"].skipped == 0


def test_the_fused_step_keeps_its_stats_row():
    with tq.Sequence(tq.ProcessStep(abs, 1), tq.RepackStep(4), tq.ProcessStep(sum, 1)) as seq:
        assert list(seq(range(10))) == [6, 22, 17]
        stats = seq.stats()
    assert list(stats) == ["abs", "RepackStep(4)", "sum"]
    assert (stats["sum"].elements_in, stats["sum"].elements_out, stats["sum"].nworkers) == (3, 3, 1)
    assert (stats["RepackStep(4)"].elements_in, stats["RepackStep(4)"].elements_out) == (10, 3)


def test_the_fused_steps_cpu_time_is_its_own_and_not_its_hosts():
    # before: the fused step's cpu_s was 0 (its host's row counted it), and the hint said of a fused
    # collate busy on a CPU that it was "waiting on files, the network or a sleep"
    with tq.Sequence(tq.RepackStep(4), tq.ProcessStep(spin_sum, 1)) as seq:
        assert list(seq(range(100))) == [sum(range(i, i + 4)) for i in range(0, 100, 4)]
        stats = seq.stats()
    fused, host = stats["spin_sum"], stats["RepackStep(4)"]
    assert 25 * 0.02 * 0.9 < fused.cpu_s < 1.5 * fused.busy_s + 0.1, (fused.cpu_s, fused.busy_s)
    assert host.cpu_s < 0.5 * fused.cpu_s, (host.cpu_s, fused.cpu_s)
    assert "waiting on files" not in stats.hint(), stats.hint()


def test_the_fused_step_draws_the_random_numbers_it_would_draw_in_a_process_of_its_own(start_method):
    def run(*between):
        torch.manual_seed(7)
        with tq.Sequence(tq.RepackStep(2), *between, tq.ProcessStep(draw, 1), context=start_method) as seq:
            assert seq._plan.fused == (frozenset({1}) if not between else frozenset())
            return [list(seq(range(6))) for _ in range(2)]

    fused, apart = run(), run(tq.Queue(1))
    assert fused == apart
    assert fused[0] != fused[1]  # a new stream each epoch


# -- pool parts ----------------------------------------------------------------------------------


class _Rows(list):
    """A stand-in for the stats array: ``rows`` workers' rows."""

    def __init__(self, rows, busy=0.0, items=0.0):
        super().__init__([0.0] * (NFIELDS * rows))
        for row in range(rows):
            self[row * NFIELDS + Field.BUSY] = busy / rows
            self[row * NFIELDS + Field.IN] = items / rows


def test_pool_parts_follow_the_pools_cost_per_item():
    assert PartSizer(_Rows(4), 0, 4).parts(100) == 8  # nothing measured yet: 2 per worker
    assert PartSizer(_Rows(4, busy=0.004, items=40), 0, 4).parts(100) == 1  # 0.1 ms items: one part
    assert PartSizer(_Rows(4, busy=0.4, items=40), 0, 4).parts(100) == 8  # 10 ms items: all parts
    assert PartSizer(_Rows(4, busy=0.04, items=40), 0, 4).parts(100) == 5  # 1 ms: 20 ms a part
    assert PartSizer(_Rows(4, busy=4.0, items=40), 0, 4).parts(3) == 3  # never more parts than items
    assert PartSizer(_Rows(4, busy=0.4, items=40), 0, 4).parts(3) == 2  # 30 ms of work: two parts


def test_cheap_items_go_to_the_pool_in_few_parts_and_come_back_complete(start_method):
    data = [list(range(i, i + 100)) for i in range(0, 5000, 100)]
    with tq.Sequence(tq.PoolStep(square, nworkers=2), context=start_method) as seq:
        assert list(seq(data)) == [[x * x for x in chunk] for chunk in data]
        messages = seq.stats()["square"].messages_in
    assert messages < 2 * 2 * len(data) / 2  # 4 parts for the first elements only, one after


# -- a first PackStep in the feeder, a last UnpackStep in the consumer ---------------------------


def three(_):
    return 3


def failing_source(n):
    yield from range(n)
    raise OSError("the source broke")


def test_a_first_pack_step_and_a_last_unpack_step_run_at_the_ends():
    plan = make_plan((tq.PackStep(4), tq.PoolStep(square, nworkers=2), tq.UnpackStep()))
    assert plan.feeder_runs_first and plan.consumer_runs_last
    assert [stage.name for stage in plan.stages if not plan.runs_elsewhere(stage.index)] == ["square"]
    assert not make_plan((tq.PackStep(4), tq.ProcessStep(sum, 1))).fused  # no user function in the feeder

    class Mine(tq.UnpackStep):  # a step of the user's own streams as it likes: a process of its own
        pass

    assert not make_plan((tq.ProcessStep(abs, 1), Mine())).consumer_runs_last


def test_packed_tiny_elements_cross_as_lists_and_come_out_one_by_one_in_order(start_method):
    with tq.Sequence(
        tq.PackStep(16), tq.PoolStep(square, nworkers=2), tq.UnpackStep(), tq.Queue(4), context=start_method
    ) as seq:
        for _ in range(2):
            assert list(seq(range(1000))) == [x * x for x in range(1000)]
        assert len(seq._runtime.workers) == 2  # the pool's only
        stats = seq.stats()
    assert (stats["PackStep(16)"].elements_in, stats["PackStep(16)"].elements_out) == (2000, 126)
    assert (stats["UnpackStep()"].elements_in, stats["UnpackStep()"].elements_out) == (126, 2000)
    assert stats["square"].messages_in <= 2 * 126  # lists, not elements (a few first ones in two parts)
    assert stats["PackStep(16)"].utilization == 0.0  # nothing of it is measured as a step's work


def test_a_pack_step_or_an_unpack_step_alone_needs_no_process():
    with tq.Sequence(tq.PackStep(3)) as seq:
        assert list(seq(range(7))) == [[0, 1, 2], [3, 4, 5], [6]]
        assert seq._runtime.workers == []
    with tq.Sequence(tq.UnpackStep()) as seq:
        assert list(seq([[1, 2], [], (3,)])) == [1, 2, 3]
        assert seq._runtime.workers == []


def test_an_input_error_behind_a_pack_step_names_the_inputs_element():
    with tq.Sequence(tq.PackStep(2), tq.ProcessStep(sum, 1)) as seq:
        with pytest.raises(OSError, match="the input iterable .* at element 5 of epoch 0: the source broke"):
            list(seq(failing_source(5)))


def test_the_consumers_unpack_refuses_what_is_not_iterable_as_its_step_would():
    with tq.Sequence(tq.ProcessStep(three, 1), tq.UnpackStep()) as seq:
        with pytest.raises(TypeError, match="'UnpackStep\\(\\)'.* at element 0 of epoch 0"):
            list(seq(range(3)))
    with tq.Sequence(tq.ProcessStep(three, 1), tq.UnpackStep(), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="'UnpackStep\\(\\)'") as caught:
            assert list(seq(range(3))) == []
        assert seq.stats()["UnpackStep()"].skipped == 3
    assert caught[0].filename == __file__  # the warning points at the user's loop


def test_a_skip_warning_from_a_worker_points_at_the_users_line():
    with tq.Sequence(tq.RepackStep(4), tq.ProcessStep(fails_on_third, 1), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="fails_on_third") as caught:
            list(seq(range(20)))
    assert caught[0].filename == __file__


# -- items routed, not decoded, by a stream step between two steps of workers ----------------------


def rows(n):
    """``n`` items with tensors of their own (a graph's worth)."""
    return [{"x": torch.full((2000,), float(n)), "i": torch.arange(3) + n} for _ in range(n)]


def sums(batch):
    return [float(item["x"].sum()) + int(item["i"].sum()) for item in batch]


class Logged:
    """An item that notes, in a file named by the step, every process that unpickles it."""

    def __init__(self, value, log):
        self.value, self.log = value, log

    def __reduce__(self):
        return _unpickled, (self.value, self.log)


def _unpickled(value, log):
    info = tq.get_worker_info()
    with open(f"{log}/{info.step if info else 'consumer'}", "a") as out:
        out.write(f"{value}\n")
    return Logged(value, log)


def logged(log):
    return lambda n: [Logged(n * 10 + i, log) for i in range(n)]


def values(batch):
    return [item.value for item in batch]


def test_a_stream_step_between_workers_routes_items_and_the_writers_send_them_item_by_item():
    plan = make_plan((tq.PoolStep(abs, 2), tq.RepackStep(4), tq.ProcessStep(sum, 2)))
    assert plan.routes_items(1) and plan.sends_items(0) and not plan.sends_items(1)
    fused = make_plan((tq.PoolStep(abs, 2), tq.RepackStep(4), tq.ProcessStep(sum, 1)))
    assert not fused.routes_items(1)  # it calls the function on its outputs: it decodes them

    class Mine(tq.RepackStep):  # a subclass may look at its items
        pass

    assert not make_plan((tq.ProcessStep(abs, 2), Mine(4), tq.ProcessStep(sum, 2))).routes_items(1)


def nest(x):
    return [[x, x + 1], [x + 2]]


def triple(x):
    return 3 * x


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize(
    "steps",
    [
        (tq.ProcessStep(nest), tq.UnpackStep(), tq.PoolStep(triple, 2)),
        (tq.ProcessStep(nest), tq.UnpackStep(), tq.Queue(3), tq.PoolStep(triple, 1)),
        (tq.ProcessStep(nest), tq.UnpackStep(), tq.PackStep(1), tq.UnpackStep(), tq.PoolStep(triple, 2)),
    ],
    ids=["unpack-pool", "unpack-queue-pool", "unpack-pack-unpack-pool"],
)
def test_an_unpack_step_feeding_a_pool_hands_it_lists_it_can_split(steps, skip):
    # before: "PoolStep needs iterable elements (lists, tuples, ...), got EncodedItem": the UnpackStep routed
    # its items undecoded, and each item, a pool's element, must be split into parts (with skip: all dropped)
    plan = make_plan(steps)
    last_unpack = max(i for i, stage in enumerate(plan.stages) if type(stage.step) is tq.UnpackStep)
    assert not plan.routes_items(last_unpack)
    with tq.Sequence(*steps, on_error="skip" if skip else "raise") as seq:
        assert list(seq([0, 10])) == [[0, 3], [6], [30, 33], [36]]
        stats = seq.stats()
        assert sum(stats[name].skipped for name in stats) == 0


def test_routed_items_are_unpickled_only_where_a_function_takes_them(tmp_path):
    with tq.Sequence(
        tq.ProcessStep(logged(str(tmp_path)), 2), tq.RepackStep(3), tq.ProcessStep(values, 2, name="take")
    ) as seq:
        assert list(seq([1, 2, 3])) == [[10, 20, 21], [30, 31, 32]]
    assert os.listdir(tmp_path) == ["take"]  # never in RepackStep(3)
    assert sorted(map(int, (tmp_path / "take").read_text().split())) == [10, 20, 21, 30, 31, 32]


def test_routed_items_arrive_intact_through_two_stream_steps_under_every_start_method(start_method):
    with tq.Sequence(
        tq.ProcessStep(rows, 2),
        tq.RepackStep(3),
        tq.UnpackStep(),
        tq.PackStep(2),
        tq.ProcessStep(sums, 2),
        tq.Queue(2),
        context=start_method,
    ) as seq:
        expected = [2000.0 * n + 3 * n + 3 for n in range(1, 6) for _ in range(n)]
        for _ in range(2):  # epochs
            out = [x for batch in seq(range(1, 6)) for x in batch]
            assert out == expected
        directory = seq._runtime._segment_dir
        assert not [name for name in os.listdir(directory) if name.count(".") and not name.endswith(".r")]


def test_an_epoch_left_early_with_routed_items_leaves_the_next_one_whole():
    with tq.Sequence(tq.ProcessStep(rows, 2), tq.RepackStep(4), tq.ProcessStep(sums, 2)) as seq:
        it = seq(range(1, 30))
        next(it)
        del it
        assert [x for batch in seq(range(1, 4)) for x in batch] == [2000.0 * n + 3 * n + 3 for n in (1, 2, 2, 3, 3, 3)]
