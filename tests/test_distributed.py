"""Under a real torch.distributed process group (gloo, 2 ranks): disjoint shares, equal batch counts."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, SequentialSampler

from torchqueue import QueueFlowLoader

pytestmark = pytest.mark.timeout(180)


class Indices(Dataset):
    def __len__(self) -> int:
        return 21  # not a multiple of the world size: the last step must not hang

    def __getitem__(self, i: int) -> int:
        return i


def _rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loader = QueueFlowLoader(Indices(), batch_size=4, shuffle=True, num_workers=1)
        loader.set_epoch(1)
        batches = [batch.tolist() for batch in loader]
        loader.close()
        # a sampler of the user's is shared too (Lightning's DistributedSamplerWrapper)
        ordered = QueueFlowLoader(Indices(), batch_size=4, sampler=SequentialSampler(Indices()), num_workers=1)
        in_order = [batch.tolist() for batch in ordered]
        ordered.close()
        # every rank takes as many steps: an all_reduce per batch would hang otherwise
        steps = torch.tensor([len(batches)])
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"batches": batches, "max_steps": int(steps), "in_order": in_order}, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_get_disjoint_shares_and_the_same_number_of_batches(tmp_path):
    world_size = 2
    mp.start_processes(
        _rank,
        args=(world_size, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    shares = [[i for batch in r["batches"] for i in batch] for r in results]
    assert len(results[0]["batches"]) == len(results[1]["batches"]) == results[0]["max_steps"]
    assert set(shares[0]) | set(shares[1]) == set(range(21))
    assert len(shares[0]) == len(shares[1]) == 11  # padded like DistributedSampler
    assert len(set(shares[0]) & set(shares[1])) == 1  # only the padding repeats
    assert [r["in_order"] for r in results] == [
        [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18, 20]],
        [[1, 3, 5, 7], [9, 11, 13, 15], [17, 19, 0]],  # padded with the first index, as DistributedSampler
    ]
