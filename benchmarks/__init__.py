"""Side-by-side benchmarks: torchqueue against DataLoader, torchdata.nodes, SPDL and a serial loop.

Run ``python -m benchmarks [workload ...] [--quick] [--save]``. Every workload runs every
contender in the same process run, checks that they all produced the same items, and prints one
line per contender with its figure and its ratio to DataLoader.
"""

import os as _os

# One BLAS thread per process, for every contender alike: the workloads measure the pipelines,
# and forked workers of a parent whose BLAS already started threads can otherwise crawl.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_name, "1")
