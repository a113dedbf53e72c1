"""torchqueue: staged multi-process data pipelines for PyTorch.

Module map (see ``torchqueue/README.md`` for the life of one element):

- ``steps``: declarations (ProcessStep, PoolStep, PackStep, UnpackStep, RepackStep, Queue);
- ``sequence``: ``Sequence``, epochs in and outputs out;
- ``stats``: ``Stats`` and ``StepStats``;
- ``errors``: ``PipelineError``, ``WorkerDiedError``, ``TooManyWorkersWarning``;
- ``worker_info``: ``get_worker_info()`` inside a worker (step name, worker id, count);
- ``dataset``, ``loader``: ``QueueFlowDataset`` and ``QueueFlowLoader`` (the DataLoader drop-in;
  private helpers ``_fetch``: a worker's seeded fetch, ``_lookahead``: the next epoch guessed ahead);
- ``sources``: ``H5Chunks`` and ``read_h5_chunk`` (HDF5 epoch chunk plans);
- private: ``_plan`` (elements -> stages and bounds), ``_runtime`` (processes, feeder,
  shutdown), ``_worker`` (worker loops), ``_channel`` (bounded pipes), ``_collect``
  (reorder and join), ``_messages`` (envelope and control messages), ``_serialize`` (the wire),
  ``_segments`` (shared-memory files and their reuse), ``_mainmodule`` (``__main__`` across processes),
  ``_generators`` (pack / unpack / repack).
"""

import logging

from torchqueue import sources as sources  # tq.sources.H5Chunks after ``import torchqueue as tq``; h5py loads when used
from torchqueue.dataset import QueueFlowDataset
from torchqueue.errors import PipelineError, TooManyWorkersWarning, WorkerDiedError
from torchqueue.loader import QueueFlowLoader
from torchqueue.sequence import Sequence
from torchqueue.stats import Stats, StepStats
from torchqueue.steps import PackStep, PoolStep, ProcessStep, Queue, RepackStep, UnpackStep
from torchqueue.worker_info import WorkerInfo, get_worker_info

__version__ = "0.1.0"

# The library logs to the "torchqueue" logger and prints nothing itself; configure logging to see it.
logging.getLogger("torchqueue").addHandler(logging.NullHandler())

__all__ = [
    "PackStep",
    "PipelineError",
    "PoolStep",
    "ProcessStep",
    "Queue",
    "QueueFlowDataset",
    "QueueFlowLoader",
    "RepackStep",
    "Sequence",
    "Stats",
    "StepStats",
    "TooManyWorkersWarning",
    "UnpackStep",
    "WorkerDiedError",
    "WorkerInfo",
    "get_worker_info",
]
