"""Shutdown: every exit path leaves no worker and no shared memory; user signal handlers are kept."""

from __future__ import annotations

import gc
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import START_METHODS, assert_no_workers, double, identity, random_sleep, worker_children

import torchqueue as tq

pytestmark = [pytest.mark.timeout(120)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_script(tmp_path):
    """Starts Python scripts that use torchqueue (stdout: JSON lines); kills what is left at the end."""
    started: list[subprocess.Popen] = []

    def run(body: str, **kwargs) -> subprocess.Popen:
        path = tmp_path / f"script{len(started)}.py"
        path.write_text(textwrap.dedent(body))
        env = {**os.environ, "PYTHONPATH": ROOT}  # this checkout's torchqueue (a script's own folder comes first)
        process = subprocess.Popen(
            [sys.executable, str(path)], stdout=subprocess.PIPE, cwd=ROOT, text=True, env=env, **kwargs
        )
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        process.stdout.close()


def read_json_line(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    assert line, f"script ended early with code {process.wait(30)}"
    return json.loads(line)


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)  # polling an external condition, not synchronising with our own code
    return alive


PIPELINE = """
import json, os, sys, time, psutil
import torch
import torchqueue as tq

def slow(x):
    time.sleep(0.05)
    return x

def as_tensor(x):  # so that messages carry shared memory
    return torch.tensor(list(x))

def worker_pids():
    helpers = {{c.pid for c in psutil.Process().children()
               if "multiprocessing.resource_tracker" in " ".join(c.cmdline())
               or "multiprocessing.forkserver" in " ".join(c.cmdline())
               or "torchqueue._forkserver" in " ".join(c.cmdline())}}
    return [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in helpers]

if __name__ == "__main__":
    seq = tq.Sequence(tq.ProcessStep(as_tensor, 2), tq.PoolStep(slow, nworkers=2), context="{method}")
    it = seq((range(i, i + 3) for i in range(10**6)))
    next(it)
    server = tq._forkserver.server_pid()  # the fork server (fork only)
    print(json.dumps({{"pid": os.getpid(), "workers": worker_pids(), "helpers": [server] if server else []}}), flush=True)
"""


def test_close_is_idempotent_and_with_blocks_close(no_leaks):
    seq = tq.Sequence(tq.ProcessStep(double, 2))
    assert list(seq(range(4))) == [0, 2, 4, 6]
    seq.close()
    seq.close()
    with pytest.raises(RuntimeError, match="closed"):
        seq.queue_iterable(range(3))
    with tq.Sequence(tq.ProcessStep(double, 2)) as other:
        list(other(range(4)))
    assert_no_workers()


def test_idle_workers_and_feeder_leave_at_close_without_waiting_for_a_poll(monkeypatch, caplog):
    """Closing wakes what waits for input: with polls made a minute apart, every worker still leaves
    by itself within the join time (none is terminated), in a stream, a pool and a plain step."""
    from torchqueue import _channel, _feeder

    monkeypatch.setattr(_channel, "POLL_S", 60.0)  # forked workers inherit it
    monkeypatch.setattr(_feeder, "POLL_S", 60.0)
    caplog.set_level("DEBUG", logger="torchqueue")
    steps = (tq.ProcessStep(double, 2), tq.RepackStep(2), tq.PoolStep(double, nworkers=2), tq.Queue(2))
    with tq.Sequence(*steps, context="fork") as seq:
        assert list(seq(range(6))) == [[0, 4], [8, 12], [16, 20]]
    assert not [r for r in caplog.records if "terminating" in r.getMessage()]
    assert_no_workers()


def test_close_in_the_middle_of_an_epoch(no_leaks):
    seq = tq.Sequence(tq.ProcessStep(random_sleep, 2), tq.PoolStep(random_sleep, nworkers=2))
    it = seq([i] * 5 for i in range(10**6))
    assert next(it) == [0] * 5
    seq.close()
    with pytest.raises(RuntimeError):
        next(it)


def test_break_and_dropping_the_last_reference_stops_everything(no_leaks):
    for value in tq.Sequence(tq.ProcessStep(double, 2), tq.ProcessStep(double, 2))(range(10**9)):
        if value > 10:
            break
    del value
    gc.collect()
    assert_no_workers()


@pytest.mark.parametrize("leave", ["break", "run out"])
def test_dropping_the_last_reference_stops_the_workers_at_once_without_the_cyclic_collector(no_leaks, leave):
    gc.disable()  # only reference counting may free the Sequence here
    try:
        seq = tq.Sequence(tq.ProcessStep(double, 2))
        for value in seq(range(100)):
            if leave == "break" and value > 10:
                break
        del seq
        assert not worker_children(), "the workers outlived the last reference to their Sequence"
    finally:
        gc.enable()


def test_closing_a_sequence_while_another_thread_iterates_it_ends_that_iteration(no_leaks):
    import threading

    seq = tq.Sequence(tq.ProcessStep(random_sleep, 2))
    it = seq(range(10**9))
    next(it)
    errors = []

    def consume():
        try:
            for _ in it:
                pass
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    seq.close()
    thread.join(30)
    assert not thread.is_alive() and errors


@pytest.mark.parametrize("method", START_METHODS)
def test_interpreter_exit_without_close_leaves_no_worker(method, run_script):
    process = run_script(PIPELINE.format(method=method))
    info = read_json_line(process)
    assert len(info["workers"]) == 2  # the pool's: the ProcessStep runs in its workers (_premap)
    assert process.wait(60) == 0
    assert wait_gone(info["workers"] + info["helpers"]) == []


@pytest.mark.parametrize("method", START_METHODS)
def test_regression_5_workers_exit_when_their_parent_is_killed(method, run_script):
    process = run_script(PIPELINE.format(method=method).rstrip() + "\n    time.sleep(600)\n")
    info = read_json_line(process)
    os.kill(info["pid"], signal.SIGKILL)
    process.wait(30)
    assert wait_gone(info["workers"] + info["helpers"]) == []
    # the workers removed the shared memory the dead consumer left
    assert not glob.glob(f"/dev/shm/torchqueue-{info['pid']}-*")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_that_kills_the_whole_process_group_leaves_no_shared_memory(run_script, signum):
    # what `timeout`, SLURM's scancel or a closed terminal do: the consumer dies without its clean-up
    process = run_script(PIPELINE.format(method="fork").rstrip() + "\n    time.sleep(600)\n", start_new_session=True)
    info = read_json_line(process)
    assert glob.glob(f"/dev/shm/torchqueue-{info['pid']}-*")
    os.killpg(process.pid, signum)
    assert process.wait(30) == -signum
    assert wait_gone(info["workers"] + info["helpers"]) == []
    assert not glob.glob(f"/dev/shm/torchqueue-{info['pid']}-*")


def test_shared_memory_left_by_a_pipeline_killed_whole_is_removed_by_the_next_one(run_script, monkeypatch):
    # SIGKILL to the process group: nobody of that pipeline can clean up
    process = run_script(PIPELINE.format(method="fork").rstrip() + "\n    time.sleep(600)\n", start_new_session=True)
    info = read_json_line(process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    assert wait_gone(info["workers"] + info["helpers"]) == []
    left = glob.glob(f"/dev/shm/torchqueue-{info['pid']}-*")
    assert left
    monkeypatch.setattr(tq._segments, "ABANDONED_AFTER_S", 0.0)  # it died a moment ago
    with tq.Sequence(tq.ProcessStep(double)) as seq:
        assert list(seq([1])) == [2]
        assert not any(os.path.exists(path) for path in left)
        assert glob.glob(f"/dev/shm/torchqueue-{os.getpid()}-*")  # its own, in use, is kept


SEMAPHORES = """
import json, threading, time
import torchqueue as tq

if __name__ == "__main__":
    # a thread of the consumer's: under fork, workers then come from the fork server (named semaphores)
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    seq = tq.Sequence(tq.ProcessStep(abs, 3), tq.ProcessStep(abs, 2), context="{method}")
    it = seq(range(10**6))
    next(it)
    seq._runtime._unlinker.join(60)  # it unlinks the names once every worker runs
    print(json.dumps({{"names": sorted(seq._runtime._semaphores)}}), flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_sigkill_of_the_whole_process_group_leaves_no_named_semaphore(run_script, method):
    # the consumer, its workers and Python's resource tracker all die at once: nobody could unlink them then
    process = run_script(SEMAPHORES.format(method=method), start_new_session=True)
    names = read_json_line(process)["names"]
    assert names  # spawn's and the fork server's semaphores are named
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    left = [name for name in names if os.path.exists(f"/dev/shm/sem.{name.lstrip('/')}")]
    assert not left, f"{len(left)} of the pipeline's {len(names)} named semaphores left in /dev/shm"


UNSTARTED = """
import json, os, signal, threading
import torchqueue as tq
from torchqueue import _runtime

if __name__ == "__main__":
    threading.Thread(target=threading.Event().wait, daemon=True).start()  # workers from the fork server
    _runtime.Runtime._unlink_once_up = lambda *args: None  # the names stay linked, as while workers start
    seq = tq.Sequence(tq.ProcessStep(abs, 3), tq.ProcessStep(abs, 2), context="fork")
    it = seq(range(10**6))
    next(it)
    names = sorted(seq._runtime._semaphores)
    linked = [name for name in names if os.path.exists("/dev/shm/sem." + name.lstrip("/"))]
    print(json.dumps({{"names": names, "linked": linked, "server": tq._forkserver.server_pid()}}), flush=True)
    os.kill(os.getpid(), {signum})
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_consumer_killed_while_its_workers_start_leaves_no_named_semaphore(run_script, signum):
    # `timeout`, `kill` or the OOM killer, before every worker opened the names (the consumer unlinks
    # them only then): under "fork" no resource tracker watches them, the fork server does
    process = run_script(UNSTARTED.format(signum=int(signum)))
    info = read_json_line(process)
    assert info["names"] and info["linked"] == info["names"]
    assert process.wait(30) == -signum
    assert wait_gone([info["server"]]) == []
    left = [name for name in info["names"] if os.path.exists(f"/dev/shm/sem.{name.lstrip('/')}")]
    assert not left, f"{len(left)} of the pipeline's {len(info['names'])} named semaphores left in /dev/shm"


PICKLING = """
import glob, json, multiprocessing, os, signal, threading
import torchqueue as tq

PREFIX = f"/mp-tqtest{os.getpid()}"


class KilledWhilePickled:
    # a step that holds a large model takes seconds to pickle for its workers: the consumer is
    # killed meanwhile (here at once, as soon as the pipeline's semaphores exist)
    def __call__(self, x):
        return x

    def __reduce__(self):
        names = sorted("/" + path[len("/dev/shm/sem."):] for path in glob.glob(f"/dev/shm/sem.{PREFIX[1:]}*"))
        if names:
            print(json.dumps({"names": names, "server": tq._forkserver.server_pid()}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return KilledWhilePickled, ()


if __name__ == "__main__":
    multiprocessing.current_process()._config["semprefix"] = PREFIX  # this pipeline's names, told apart
    threading.Thread(target=threading.Event().wait, daemon=True).start()  # workers from the fork server
    seq = tq.Sequence(tq.ProcessStep(KilledWhilePickled(), 2), context="fork")
    list(seq(range(3)))
"""


def test_a_consumer_killed_while_it_pickles_its_first_worker_leaves_no_named_semaphore(run_script):
    # before: the fork server was told the names only with the first worker's request, after pickling
    process = run_script(PICKLING)
    info = read_json_line(process)
    assert info["names"] and info["server"]
    assert process.wait(30) == -signal.SIGKILL
    assert wait_gone([info["server"]]) == []
    left = [name for name in info["names"] if os.path.exists(f"/dev/shm/sem.{name[1:]}")]
    assert not left, f"{len(left)} of the pipeline's {len(info['names'])} named semaphores left in /dev/shm"


def test_ctrl_c_to_the_process_group_stops_everything_cleanly(run_script):
    head, _ = PIPELINE.format(method="fork").split("    it = seq(")
    body = head + textwrap.indent(
        textwrap.dedent("""
        try:
            it = seq((range(i, i + 3) for i in range(10**6)))
            next(it)
            print(json.dumps({"pid": os.getpid(), "workers": worker_pids()}), flush=True)
            for _ in it:
                pass
        except KeyboardInterrupt:
            print(json.dumps({"interrupted": True}), flush=True)
            seq.close()
            print(json.dumps({"workers": worker_pids()}), flush=True)
    """),
        "    ",
    )
    process = run_script(body, start_new_session=True)
    info = read_json_line(process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: workers get it too
    assert read_json_line(process) == {"interrupted": True}
    assert read_json_line(process) == {"workers": []}
    assert process.wait(60) == 0
    assert wait_gone(info["workers"]) == []


def test_regression_8_user_signal_handlers_are_left_alone():
    def handler(signum, frame):
        pass

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
            list(seq(range(10)))
        assert signal.getsignal(signal.SIGINT) is handler
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@pytest.mark.parametrize("child", ["exits", "uses the copy"])
def test_a_process_forked_by_user_code_leaves_the_pipeline_to_its_parent(run_script, child):
    # The child exits normally (multiprocessing's exit handler used to terminate the parent's workers
    # as its own, as it does DataLoader's), or tries the copied Sequence (a clear error, not a hang
    # that also takes the parent's outputs).
    use = "list(seq(range(3)))" if child == "uses the copy" else "pass"
    process = run_script(f"""
        import json, os, sys
        import torchqueue as tq

        def ident(x):
            return x

        if __name__ == "__main__":
            got, child = [], None
            with tq.Sequence(tq.ProcessStep(ident, 2), context="fork") as seq:
                for i, x in enumerate(seq(range(400))):
                    got.append(x)
                    if i == 20:
                        child = os.fork()
                        if child == 0:
                            try:
                                {use}
                            except RuntimeError as exc:
                                print(json.dumps({{"child": str(exc)}}), flush=True)
                            sys.exit(0)  # a normal exit: atexit handlers run
                _, status = os.waitpid(child, 0)
            print(json.dumps({{"parent": got == list(range(400)), "child_status": status}}), flush=True)
    """)
    if child == "uses the copy":
        assert "is a fork" in read_json_line(process)["child"]
    assert read_json_line(process) == {"parent": True, "child_status": 0}
    assert process.wait(60) == 0


def test_workers_of_pipelines_started_by_threads_at_once_exit_when_the_consumer_is_killed(run_script):
    # A worker forked while another thread forked one too may share its parent-death pipe with it,
    # so that pipe never says the parent died: the workers also watch their parent id.
    process = run_script("""
        import json, os, signal, threading
        import torchqueue as tq

        def ident(x):
            return x

        if __name__ == "__main__":
            sequences, barrier = [], threading.Barrier(4)

            def start():
                barrier.wait(timeout=30)
                sequence = tq.Sequence(tq.ProcessStep(ident, 2), tq.RepackStep(2), context="fork")
                sequence.queue_iterable(range(10))
                sequences.append(sequence)

            threads = [threading.Thread(target=start) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert all(len(list(sequence)) == 5 for sequence in sequences)
            pids = [p.pid for sequence in sequences for _, _, p in sequence._runtime.workers]
            print(json.dumps(pids), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up at all
    """)
    pids = json.loads(process.stdout.readline())
    assert len(pids) == 12 and process.wait(30) == -signal.SIGKILL
    assert wait_gone(pids, seconds=15) == []


def test_ctrl_c_while_close_waits_for_a_busy_worker_still_stops_it_and_frees_the_memory(run_script, tmp_path):
    started = tmp_path / "started"
    process = run_script(f"""
        import json, os, signal, threading, time
        import torch
        import torchqueue as tq

        def slow(x):
            open({str(started)!r}, "w").close()
            time.sleep(60)  # busy in a long step: close() waits for it
            return x

        def big(x):
            return torch.zeros(1 << 20)  # 4 MiB outputs, waiting unread in the segments

        if __name__ == "__main__":
            seq = tq.Sequence(tq.ProcessStep(big, 1), tq.ProcessStep(slow, 1), context="fork")
            seq.queue_iterable(range(8))
            deadline = time.monotonic() + 30
            while not os.path.exists({str(started)!r}) and time.monotonic() < deadline:
                time.sleep(0.01)  # polling a file another process writes, not synchronising our own code
            pids = [p.pid for _, _, p in seq._runtime.workers]
            directory = seq._runtime._segment_dir
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                seq.close()  # waits up to 2 s for the busy worker: Ctrl-C comes meanwhile
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            left = os.path.exists(directory)
            print(json.dumps({{"interrupted": interrupted, "pids": pids, "left": left}}), flush=True)
    """)
    report = read_json_line(process)
    assert report["interrupted"] and not report["left"]
    assert wait_gone(report["pids"]) == []
    assert process.wait(60) == 0


BREAK_AND_CLOSE = """
import json, sys, random, warnings
import numpy as np
import torch
import torchqueue as tq
from multiprocessing import resource_sharer

warnings.simplefilter("ignore", tq.TooManyWorkersWarning)  # 6 workers on a 2-core machine, on purpose

def make(i):  # 1 MiB of each: arrays and tensors that the next steps pass on as they came
    return {{"array": np.full(1 << 18, i, dtype=np.float32), "tensor": torch.full((1 << 18,), float(i)), "sharers": []}}

def pass_on(element):  # says whether this process ever served a file descriptor (torch's own sharing)
    element["sharers"].append(resource_sharer._resource_sharer._listener is not None)
    return element

if __name__ == "__main__":
    rng = random.Random(0)
    sharers = []
    for cycle in range({cycles}):
        seq = tq.Sequence(tq.ProcessStep(make, 2), tq.ProcessStep(pass_on, 2), tq.ProcessStep(pass_on, 2),
                          context="{method}")
        stop = rng.randrange(2, 8)
        for j, element in enumerate(seq(range(1000))):
            assert float(element["array"][0]) == j and float(element["tensor"][-1]) == j
            sharers += element["sharers"]
            if j == stop:
                break
        del element
        seq.close()
    print(json.dumps({{"sharers": sum(sharers), "seen": len(sharers)}}), flush=True)
"""


@pytest.mark.parametrize("method, cycles", [("fork", 30), ("spawn", 4)])
def test_break_and_close_with_large_arrays_passed_on_prints_nothing(method, cycles, run_script):
    """Issue 16 item 4: arrays and tensors of 1 MiB passed on from step to step, then ``break`` and
    ``close()``, many times: no worker prints anything (the workers share the script's stderr).

    Such values used to be passed on by torch's file-descriptor sharing: a server thread in the
    sending worker (``multiprocessing.resource_sharer``) that the receiver connects to as it
    unpickles, which failed with tracebacks when the sender had already stopped. No step serves
    descriptors now."""
    process = run_script(BREAK_AND_CLOSE.format(method=method, cycles=cycles), stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    assert err == "", err[-3000:]
    report = json.loads(out)
    assert report["seen"] > cycles and report["sharers"] == 0, report


def test_ctrl_c_while_the_processes_start_raises_it_and_leaves_no_worker(monkeypatch):
    # before: the thread steps, started after every process, were joined unstarted:
    # "RuntimeError: cannot join thread before it is started", with the KeyboardInterrupt as its context
    from torchqueue import _handles

    real_start, starts = _handles.ProcessHandle.start, []

    def start_then_ctrl_c(self):
        starts.append(self)
        if len(starts) == 2:
            raise KeyboardInterrupt
        real_start(self)

    monkeypatch.setattr(_handles.ProcessHandle, "start", start_then_ctrl_c)
    seq = tq.Sequence(tq.ProcessStep(double, 1, backend="thread"), tq.ProcessStep(double, 2))
    with pytest.raises(KeyboardInterrupt) as info:
        list(seq(range(4)))
    assert info.value.__context__ is None
    monkeypatch.setattr(_handles.ProcessHandle, "start", real_start)
    assert list(seq(range(4))) == [0, 4, 8, 12]  # as after any Ctrl-C: the next call works
    seq.close()
    assert_no_workers()


def _own_segment_dirs() -> set[str]:
    mine = f"torchqueue-{os.getpid()}-"
    return {name for name in os.listdir("/dev/shm") if name.startswith(mine)}


@pytest.mark.parametrize("where", ["semaphore_names", "_start_feeder"])
def test_ctrl_c_as_a_pipeline_starts_leaves_no_worker_and_no_segment_directory(monkeypatch, where):
    # before: a KeyboardInterrupt after the segments' directory was made, before the workers' start (here:
    # as the semaphores' names are taken), left one /dev/shm/torchqueue-* directory per try; one as the
    # feeder thread started (Thread.start() waits for it) escaped the start's clean-up: the runtime never
    # reached the Sequence, so its workers and segments outlived close()
    from torchqueue import _runtime

    owner = _runtime._semnames if where == "semaphore_names" else _runtime.Runtime
    real = getattr(owner, where)

    def then_ctrl_c(*args):
        if where == "_start_feeder":
            real(*args)
        raise KeyboardInterrupt

    before = _own_segment_dirs()
    monkeypatch.setattr(owner, where, then_ctrl_c)
    seq = tq.Sequence(tq.ProcessStep(double, 2))
    with pytest.raises(KeyboardInterrupt):
        list(seq(range(4)))
    assert_no_workers()
    monkeypatch.setattr(owner, where, real)
    assert list(seq(range(4))) == [0, 2, 4, 6]  # as after any Ctrl-C: the next call works
    seq.close()
    assert _own_segment_dirs() <= before
    assert_no_workers()


@pytest.mark.parametrize("where", ["_next_iterator", "queue"])
def test_ctrl_c_between_queuing_an_epoch_and_returning_its_iterator_cancels_it(monkeypatch, where):
    # before: the epoch queued without an iterator gave its outputs to the next call's iterator, and so
    # on: seq(["B0", "B1"]) yielded ["A0", "A1", "A2"]
    from torchqueue import _runtime

    target = (tq.Sequence, "_next_iterator") if where == "_next_iterator" else (_runtime.Runtime, "queue")
    real = getattr(*target)

    def then_ctrl_c(self, *args):
        if where == "queue":
            real(self, *args)  # the runtime took the epoch; Ctrl-C comes before it is counted
        raise KeyboardInterrupt

    seq = tq.Sequence(tq.ProcessStep(identity, 2))
    monkeypatch.setattr(*target, then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        seq(["A0", "A1", "A2"])
    monkeypatch.setattr(*target, real)
    assert list(seq(["B0", "B1"])) == ["B0", "B1"]
    assert list(seq(["C0"])) == ["C0"]
    seq.close()
    assert_no_workers()
