"""How a list of elements becomes stages, edges and bounds."""

import functools

import torch.multiprocessing as mp
from conftest import double, square

import torchqueue as tq
from torchqueue._plan import JoinStep, make_plan


def test_capacity_one_queues_are_inserted_between_steps_and_after_the_last():
    plan = make_plan((tq.ProcessStep(double), tq.ProcessStep(square)))
    assert plan.capacities == (1, 1, 1)


def test_given_queues_set_capacities_and_a_multiprocessing_queue_means_its_size():
    plan = make_plan((tq.Queue(3), tq.ProcessStep(double), mp.Queue(5), tq.ProcessStep(square), tq.Queue(7)))
    assert plan.capacities == (3, 5, 7)


def test_default_names_are_unique_and_readable():
    plan = make_plan((tq.ProcessStep(double), tq.ProcessStep(double), tq.RepackStep(64), tq.ProcessStep(lambda x: x)))
    assert [s.name for s in plan.stages] == ["double", "double#2", "RepackStep(64)", "lambda"]


def read_h5_events(chunk, keys):
    return chunk


def test_a_partial_step_is_named_after_its_function():
    read = functools.partial(read_h5_events, keys=["ECAL"])
    plan = make_plan((tq.ProcessStep(read), tq.PoolStep(functools.partial(double), nworkers=2), tq.ProcessStep(read)))
    assert [s.name for s in plan.stages] == ["read_h5_events", "double", "double:join", "read_h5_events#2"]


def test_a_process_step_after_a_pool_step_reads_through_a_join_stage():
    plan = make_plan((tq.PoolStep(double, nworkers=2, name="p"), tq.ProcessStep(square, 2)))
    assert [type(s.step) for s in plan.stages] == [tq.PoolStep, JoinStep, tq.ProcessStep]
    assert plan.stages[1].name == "p:join"


def test_a_round_robin_step_reads_one_channel_per_worker_and_its_input_in_order():
    plan = make_plan((tq.ProcessStep(double, 3), tq.Queue(4), tq.ProcessStep(square, 2, round_robin=True)))
    assert [type(s.step) for s in plan.stages] == [tq.ProcessStep, JoinStep, tq.ProcessStep]  # 3 workers: reorder
    assert plan.stages[2].inboxes() == 2 and plan.channel_capacity(2) == 2  # its Queue(4), shared by 2
    assert not plan.can_bundle(1)  # each element its own message, so that element k reaches worker k % 2
    single = make_plan((tq.ProcessStep(double, 1), tq.ProcessStep(square, 2, round_robin=True)))
    assert [type(s.step) for s in single.stages] == [tq.ProcessStep, tq.ProcessStep]


def test_pool_edges_hold_parts_and_credits_bound_each_segment():
    plan = make_plan((tq.ProcessStep(double, 3), tq.Queue(2), tq.PoolStep(square, nworkers=4), tq.RepackStep(8)))
    # edge 1 feeds the pool: 2 elements of up to 2 * 4 parts
    assert plan.message_capacity(1) == 16
    # feeder -> repack: edges 0..2 (1 + 2 + 1) and 3 + 4 workers
    assert plan.credits(-1) == 1 + 2 + 1 + 3 + 4
    # repack -> consumer: one edge of 1
    assert plan.credits(2) == 1
    assert plan.splits_into(0) and not plan.splits_into(1) and not plan.splits_into(-1)
