"""A loader worker's fetch: DataLoader's batches, collated in the worker's own memory."""

from __future__ import annotations

import torch
import torch.utils.data._utils.worker as torch_worker
from torch.utils.data import default_collate

from torchqueue._fetch import Fetch, Job, _PrivateCollate


class Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.saw_worker_info: list[bool] = []

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.saw_worker_info.append(torch.utils.data.get_worker_info() is not None)
        return torch.full((3, 4), float(i)), i


def test_default_collate_stacks_in_private_memory_but_the_dataset_still_sees_its_worker():
    dataset = Pairs()
    batch = [dataset[i] for i in range(4)]
    fake = torch_worker.WorkerInfo(id=0, num_workers=1, seed=0, dataset=dataset)
    torch_worker._worker_info = fake
    try:
        in_shared = default_collate(batch)  # what DataLoader's worker does: a new shared-memory file
        private = _PrivateCollate()(batch)
        assert torch_worker._worker_info is fake  # restored
    finally:
        torch_worker._worker_info = None
    assert in_shared[0].is_shared() and not private[0].is_shared()
    assert torch.equal(private[0], in_shared[0]) and torch.equal(private[1], in_shared[1])


def test_fetch_uses_the_private_collate_only_for_default_collate():
    dataset = Pairs()
    fetch = Fetch(dataset, True, default_collate, False, None)
    images, labels = fetch(Job(base_seed=1, epoch=1, indices=[0, 1, 2]))[0]
    assert torch.equal(labels, torch.tensor([0, 1, 2])) and images.shape == (3, 3, 4)

    def custom(batch):
        return [label for _, label in batch]

    assert Fetch(dataset, True, custom, False, None)(Job(1, 1, [5, 6]))[0] == [5, 6]
