"""Ctrl-C in a notebook: a real SIGINT while a Sequence is iterated cancels the epoch, and the next call works.

Each test runs a script in its own process, so that the SIGINT lands in that process's main thread
(where Python raises ``KeyboardInterrupt``, as a notebook's interrupt button does in its kernel),
and checks what the script reports: the outputs of the epoch after the interrupt, and that no
worker process and no shared-memory segment is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(120)

PRELUDE = """
import glob, json, os, signal, threading
import psutil
import torch
import torchqueue as tq


def stuck_on_three(x):
    if x == 3:
        threading.Event().wait(60)  # a long step: the consumer waits in a read when Ctrl-C comes
    return torch.tensor([2 * x])  # through shared memory


def workers():
    helpers = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torchqueue._forkserver")
    me = psutil.Process()
    skip = {c.pid for c in me.children() if any(h in " ".join(c.cmdline()) for h in helpers)}
    return [p.pid for p in me.children(recursive=True) if p.pid not in skip and p.status() != psutil.STATUS_ZOMBIE]


def gone(pids):
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    return not alive


def ctrl_c_after(event):
    '''Ctrl-C to the main thread once ``event`` is set (SIGINT cuts a blocking read short there).'''
    def interrupt():
        if event.wait(30):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()


def first_epoch(outputs, pids):
    '''Iterate ``outputs`` until Ctrl-C; returns what came (elements 0-2: element 3 does not come back).'''
    reached, got = threading.Event(), []
    ctrl_c_after(reached)
    try:
        for x in outputs:
            got.append(int(x))
            pids.extend(workers())
            if len(got) == 3:
                reached.set()
    except KeyboardInterrupt:
        return got
    raise AssertionError("no KeyboardInterrupt")


def shm():
    return sorted(glob.glob(f"/dev/shm/torchqueue-{os.getpid()}-*"))
"""


def run(body: str) -> dict:
    """Run PRELUDE + ``body`` in a new process; its last stdout line is JSON."""
    script = PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=100
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ctrl_c_cancels_the_epoch_and_the_next_call_works_with_fresh_workers():
    report = run("""
        seq = tq.Sequence(tq.ProcessStep(stuck_on_three, 2))
        old = []
        got = first_epoch(seq(range(8)), old)
        again = [int(x) for x in seq(range(4, 8))]  # seq(...) after Ctrl-C
        seq.queue_iterable(range(2))
        queued = [int(x) for x in seq]  # queue_iterable, then iter(seq)
        seq.close()
        print(json.dumps({"got": got, "again": again, "queued": queued, "old_gone": gone(old),
                          "left": workers(), "shm": shm()}))
    """)
    assert report == {
        "got": [0, 2, 4],
        "again": [8, 10, 12, 14],
        "queued": [0, 2],
        "old_gone": True,
        "left": [],
        "shm": [],
    }


def test_ctrl_c_in_a_queueflowloader_over_a_queueflowdataset_leaves_it_usable():
    report = run("""
        ds = tq.QueueFlowDataset(lambda epoch: range(8) if epoch == 0 else range(4, 8),
                                 [tq.ProcessStep(stuck_on_three, 2)])
        loader = tq.QueueFlowLoader(ds)
        old = []
        got = first_epoch(loader, old)
        loader.set_epoch(1)
        again = [int(x) for x in loader]
        ds.close()
        loader.close()
        print(json.dumps({"got": got, "again": again, "old_gone": gone(old), "left": workers(), "shm": shm()}))
    """)
    assert report == {"got": [0, 2, 4], "again": [8, 10, 12, 14], "old_gone": True, "left": [], "shm": []}


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_ctrl_c_in_a_pipeline_with_a_stream_step_between_leaves_it_usable(backend):
    # before: the stream step's new worker waited for epoch 0 while the restarted Sequence fed it
    # epoch 1: the next epoch never came (a TimeoutError that blamed the input, or a hang without timeout=)
    report = run(f"""
        def pair(x):
            if x == 3:
                threading.Event().wait(60)
            return [x, x]

        seq = tq.Sequence(tq.ProcessStep(pair, 1, backend={backend!r}), tq.RepackStep(3), tq.ProcessStep(sum, 1),
                          timeout=20)
        reached, got = threading.Event(), []
        ctrl_c_after(reached)
        try:
            for total in seq(range(8)):
                got.append(total)
                reached.set()
        except KeyboardInterrupt:
            pass
        again = list(seq(range(4, 6)))
        seq.close()
        print(json.dumps({{"got": got[:1], "again": again, "left": workers(), "shm": shm()}}))
    """)
    assert report == {"got": [1], "again": [13, 5], "left": [], "shm": []}


_SERVER_CTRL_C = """
import os, signal, threading, time
import psutil
import torch
import torchqueue as tq

threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # another thread: the fork server starts workers


def ctrl_c_while_the_server_imports_torch():
    while True:  # polls the server's memory map: torch's library mapped means its import is under way
        for child in psutil.Process().children():
            try:
                if "torchqueue._forkserver" in " ".join(child.cmdline()) and "libtorch" in open(
                    f"/proc/{child.pid}/maps"
                ).read():
                    os.killpg(0, signal.SIGINT)  # as a terminal's Ctrl-C or a notebook's interrupt: the group
                    return
            except (OSError, psutil.Error):
                pass


threading.Thread(target=ctrl_c_while_the_server_imports_torch, daemon=True).start()
loader = tq.QueueFlowLoader([torch.full((2,), float(i)) for i in range(16)], batch_size=4, num_workers=2)
try:
    list(loader)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
print("again", len(list(loader)))
loader.close()
"""


def test_ctrl_c_to_the_process_group_while_the_fork_server_starts_is_the_consumers_alone():
    # before: the fork server died of it inside `import torch`, its traceback printed beside your
    # KeyboardInterrupt, and it stayed a zombie until the next pipeline started
    done = subprocess.run(
        [sys.executable, "-c", _SERVER_CTRL_C],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=100,
        start_new_session=True,  # its own process group, which it interrupts
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["interrupted", "again", "4"]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
