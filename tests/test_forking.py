"""How workers start: under "fork", by a fork of the consumer's process only while no other Python
thread runs (none could hold a lock), else from torchqueue's fork server; nothing left after the last
pipeline closes; every worker gets its step pickled as it starts (shared tensors, semaphores, Values)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
import torch
from conftest import assert_no_workers, identity

import torchqueue as tq

ROOT = Path(__file__).resolve().parent.parent
CONTEXTS = ["fork", "spawn", "forkserver"]


USER_THREAD = "import threading; threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
"""A consumer with a thread of its own: forking its process could hang a worker."""


def run_program(
    program: str,
    tmp_path: Path,
    *args: str,
    flags: tuple[str, ...] = (),
    timeout: float = 60,
    prelude: str = USER_THREAD,
) -> str:
    """Run ``prelude`` and ``program`` as a script; stderr goes to a file (a pipe nobody reads could block it),
    unbuffered off."""
    script = tmp_path / "program.py"
    script.write_text(prelude + textwrap.dedent(program))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        try:
            result = subprocess.run(
                [sys.executable, *flags, str(script), *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=tmp_path,
                env=env,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"hung; stderr ends with:\n{(tmp_path / 'stderr.txt').read_text()[-2000:]}")
    assert result.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    return result.stdout


# -- fork safety -----------------------------------------------------------------------------------

ISSUE_SCRIPT = """
    import logging, sys, torchqueue as tq
    logging.basicConfig(level=logging.INFO)
    def chunks():
        i = 0
        while True:
            logging.info("reading chunk %d", i); i += 1; yield i
    def step(x):
        logging.info("validating %s", x); return x
    if __name__ == "__main__":
        it = tq.Sequence(tq.ProcessStep(abs, 1), tq.Queue(256))(chunks())
        for i in range(int(sys.argv[1])):
            for _ in range(300): next(it)
            with tq.Sequence(tq.ProcessStep(step, 2)) as val:
                print(i, len(list(val(range(10)))), flush=True)
"""


@pytest.mark.timeout(90)
def test_a_feeder_logging_while_a_pipeline_starts_does_not_hang_it(tmp_path):
    # issue 15's script: the first pipeline's feeder logs while the next one starts; forked from
    # this process, a worker could inherit stderr's lock held, and hang in its first log line
    out = run_program(ISSUE_SCRIPT, tmp_path, "80", timeout=75)
    assert out.splitlines()[-1] == "79 10"


LOGGING_THREAD = """
    import logging, sys, threading, torchqueue as tq
    def step(x):
        logging.info("validating %s", x); return x
    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO, filename="log.txt")
        stop = threading.Event()
        def chatter():
            while not stop.is_set():
                logging.info("a user thread logs " + "x" * 200)
        thread = threading.Thread(target=chatter)
        thread.start()
        try:
            for i in range(4):
                with tq.Sequence(tq.ProcessStep(step, 2)) as seq:
                    assert list(seq(range(10))) == list(range(10))
        finally:
            stop.set()
            thread.join()
        print("ok")
"""


@pytest.mark.timeout(60)
def test_a_user_thread_logging_to_a_file_does_not_hang_the_workers(tmp_path):
    assert run_program(LOGGING_THREAD, tmp_path, timeout=45).strip() == "ok"


THREADS_AT_FORK = """
    import os, sys, threading, warnings, psutil, torch, torchqueue as tq
    from torchqueue import _forkserver
    forks = []
    os.register_at_fork(before=lambda: forks.append(threading.active_count()))
    def slow(x):
        return x
    def left():  # every process of this one's, however deep, but zombies
        return [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    if __name__ == "__main__":
        warnings.simplefilter("ignore", UserWarning)  # pin_memory without CUDA
        first = tq.Sequence(tq.ProcessStep(slow, 2), tq.Queue(8))
        it = first(range(1000))
        next(it)  # its feeder thread is alive while the next pipelines start
        with tq.Sequence(tq.ProcessStep(abs, 2)) as second:
            assert list(second(range(-5, 0))) == [5, 4, 3, 2, 1]
            assert _forkserver.server_pid() is not None
        dataset = torch.utils.data.TensorDataset(torch.arange(12.0))
        loader = tq.QueueFlowLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True, pin_memory=True)
        servers = set()
        for epoch in range(3):
            assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
            servers.add(_forkserver.server_pid())
        assert len(servers) == 1 and None not in servers  # one server while the loader is open
        loader.close()
        first.close()
        after_close = left()
        with tq.Sequence(tq.ProcessStep(abs, 2)) as third:  # a new server
            assert list(third(range(-2, 0))) == [2, 1]
        print("forks", sorted(set(forks)), "left", after_close, left())
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("prelude", "forks"), [("", "[1]"), (USER_THREAD, "[]")], ids=["single-threaded", "with-a-user-thread"]
)
def test_no_fork_in_the_consumer_while_another_thread_runs_and_no_process_left_after_the_last_closes(
    tmp_path, prelude, forks
):
    # the consumer's process is forked only while it is the only Python thread (threading.active_count() 1)
    line = run_program(THREADS_AT_FORK, tmp_path, timeout=100, prelude=prelude).strip().splitlines()[-1]
    assert line == f"forks {forks} left [] []", line


@pytest.mark.timeout(90)
@pytest.mark.parametrize("prelude", ["", USER_THREAD], ids=["single-threaded", "with-a-user-thread"])
def test_no_deprecation_warning_with_warnings_as_errors(tmp_path, prelude):
    # Python 3.12+ warns (DeprecationWarning) at a fork while any OS thread is alive, numpy's OpenBLAS
    # pool included; -W error turns that one into nothing visible, so it is shown ("always") here.
    # torchqueue's fork server (which gets these flags too) is started single-threaded: nobody warns.
    program = THREADS_AT_FORK.replace("os.register_at_fork", "# os.register_at_fork")
    flags = ("-W", "error::DeprecationWarning", "-W", "always:This process:DeprecationWarning")
    run_program(program, tmp_path, flags=flags, timeout=75, prelude=prelude)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "multi-threaded" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]


@pytest.fixture
def user_thread():
    """A thread of the test's own while it runs: the consumer is not forked, the fork server is used."""
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)


def test_a_single_threaded_consumer_is_forked_as_dataloader_forks_it():
    from multiprocessing import resource_sharer

    from torchqueue import _forkserver

    resource_sharer.stop()  # the server thread of torch's descriptor sharing, if an earlier test used it
    assert threading.active_count() == 1, threading.enumerate()
    with tq.Sequence(tq.ProcessStep(what_a_worker_sees), context="fork") as seq:
        assert list(seq(range(1)))[0][2] == os.getpid()  # the worker's parent: this process
        assert _forkserver.server_pid() is None


@pytest.mark.timeout(60)
def test_the_fork_server_is_one_thread_and_reused_while_a_pipeline_is_open(user_thread):
    from torchqueue import _forkserver

    with tq.Sequence(tq.ProcessStep(identity, 2), context="fork") as seq:
        assert list(seq(range(4))) == [0, 1, 2, 3]
        pid = _forkserver.server_pid()
        assert pid is not None and psutil.Process(pid).num_threads() == 1
        with tq.Sequence(tq.ProcessStep(identity, 1)) as other:  # the default start method (fork here)
            assert list(other(range(2))) == [0, 1]
        assert _forkserver.server_pid() == pid
    assert_no_workers()


def what_a_worker_sees(_):
    return os.environ.get("TQ_PROBE"), os.getcwd(), multiprocessing.parent_process().pid


@pytest.mark.timeout(60)
def test_a_forked_worker_sees_the_consumer_as_it_is_when_it_starts(tmp_path, monkeypatch, user_thread):
    # the fork server started earlier; a worker still gets the consumer's environment and directory of now
    with tq.Sequence(tq.ProcessStep(identity), context="fork") as seq:
        list(seq(range(1)))
    monkeypatch.setenv("TQ_PROBE", "set after the server started")
    monkeypatch.chdir(tmp_path)
    with tq.Sequence(tq.ProcessStep(what_a_worker_sees), context="fork") as seq:
        assert list(seq(range(1))) == [("set after the server started", str(tmp_path), os.getpid())]


FRESH_MODULE = """
    import wave  # installed (the standard library), and not imported by the fork server
    import torch
    VALUE = {value}
    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 1
        def __getitem__(self, i):
            from torchqueue import _preload
            return "wave" in _preload.inherited(), "mine" in _preload.inherited(), VALUE
"""

NEXT_EPOCHS = """
    import pathlib, sys, torchqueue as tq
    import mine
    loader = tq.QueueFlowLoader(mine.Probe(), batch_size=None, num_workers=2)
    print(list(loader), flush=True)
    pathlib.Path("mine.py").write_text(sys.argv[1])  # edited between epochs
    print(list(loader), flush=True)
    print(list(loader), flush=True)
    loader.close()
"""


@pytest.mark.timeout(90)
def test_the_next_epochs_workers_inherit_the_installed_modules_the_first_ones_imported(tmp_path):
    # before: every epoch's new workers imported them again (about 3 s a worker for a module that
    # imports lightning, where DataLoader's forked workers start in milliseconds)
    (tmp_path / "mine.py").write_text(textwrap.dedent(FRESH_MODULE.format(value=1)))
    edited = textwrap.dedent(FRESH_MODULE.format(value=22))  # another size: its cached bytecode is stale
    lines = run_program(NEXT_EPOCHS, tmp_path, edited).splitlines()
    # "mine" (your own module) is read by each worker from its file: an edit shows in the next epoch
    assert lines == ["[[False, False, 1]]", "[[True, False, 22]]", "[[True, False, 22]]"]


MAIN_CLASSES_IN = """
    import collections, dataclasses, sys, torchqueue as tq
    Chunk = collections.namedtuple("Chunk", "file start stop")

    @dataclasses.dataclass
    class Event:
        energy: float

    def size(chunk):
        return chunk.stop - chunk.start

    if __name__ == "__main__":
        steps = [tq.ProcessStep(size, 1)], [tq.PoolStep(lambda event: event, 2)]
        with tq.Sequence(*steps[0], context=sys.argv[1]) as seq:
            print(list(seq([Chunk("a.h5", 0, 50), Chunk("b.h5", 50, 64)])))
        with tq.Sequence(*steps[1], context=sys.argv[1]) as seq:
            events = [[Event(1.5), Event(2.5)]]
            out = list(seq(events))
            print(out == events and type(out[0][0]) is Event, flush=True)  # your class, as you sent it
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_elements_of_classes_your_script_defines_reach_the_workers(tmp_path, context):
    # before: under "fork" with another thread running, the fork server's workers have no __main__.Chunk:
    # "AttributeError: Can't get attribute 'Chunk' on <module '__main__'>" (raised unpickling its input)
    assert run_program(MAIN_CLASSES_IN, tmp_path, context).splitlines() == ["[50, 14]", "True"]


UNSENDABLE_CLASS = """
    import sys, threading, torchqueue as tq

    class Guarded:
        lock = threading.Lock()  # cloudpickle cannot send the class by value

    def kind(value):
        return type(value).__name__

    if __name__ == "__main__":
        with tq.Sequence(tq.ProcessStep(kind, 1), context="fork") as seq:
            try:
                list(seq([Guarded()]))
            except AttributeError as exc:
                print(str(exc).splitlines()[0], flush=True)
"""


@pytest.mark.timeout(60)
def test_a_class_your_script_defines_that_cannot_be_sent_says_what_to_do(tmp_path):
    # before: "Can't get attribute 'Guarded' on <module '__main__'>" and no more
    (line,) = run_program(UNSENDABLE_CLASS, tmp_path).splitlines()
    assert "Can't get attribute 'Guarded'" in line and "define it in a module of its own" in line


CONSUMER_KILLED = """
    import os, sys, time, torchqueue as tq
    from torchqueue import _forkserver
    if __name__ == "__main__":
        seq = tq.Sequence(tq.ProcessStep(abs, 2), context="fork")
        it = seq(range(-10**9, 0))
        next(it)
        print(_forkserver.server_pid(), flush=True)
        time.sleep(60)  # killed meanwhile
"""


@pytest.mark.timeout(60)
def test_the_fork_server_and_its_workers_exit_when_the_consumer_is_killed(tmp_path):
    script = tmp_path / "consumer.py"
    script.write_text(USER_THREAD + textwrap.dedent(CONSUMER_KILLED))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env) as consumer:
        try:
            server = psutil.Process(int(consumer.stdout.readline()))
            workers = server.children()
            assert len(workers) == 2
        finally:
            consumer.send_signal(signal.SIGKILL)
            consumer.wait(10)
    gone, alive = psutil.wait_procs([server, *workers], timeout=10)
    assert not alive, f"still running after the consumer was killed: {[p.pid for p in alive]}"


# -- what a step holds reaches every worker (issue 20, items 1 and 3) -------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", CONTEXTS)
def test_a_dataset_of_cpu_tensors_reaches_every_worker(context):
    dataset = torch.utils.data.TensorDataset(torch.arange(20.0))
    loader = tq.QueueFlowLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context=context)
    try:
        assert [b[0].tolist() for b in loader] == [list(map(float, range(i, i + 4))) for i in range(0, 20, 4)]
    finally:
        loader.close()


class CountingDataset(torch.utils.data.Dataset):
    """Counts the items fetched in a shared Value; a semaphore lets one fetch at a time."""

    def __init__(self, context: str) -> None:
        mp = multiprocessing.get_context(context)
        self.count = mp.Value("i", 0)
        self.one_at_a_time = mp.Semaphore(1)

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> int:
        with self.one_at_a_time, self.count.get_lock():
            self.count.value += 1
        return i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", CONTEXTS)
def test_a_dataset_holding_multiprocessing_values_and_semaphores_works(context):
    # made with a spawn or forkserver context (a fork context's cannot reach a process that was not forked)
    dataset = CountingDataset("spawn" if context == "fork" else context)
    loader = tq.QueueFlowLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context=context)
    try:
        assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    finally:
        loader.close()
    assert dataset.count.value == 12


@pytest.mark.timeout(60)
def test_a_fork_context_value_under_the_fork_server_says_what_to_change(user_thread):
    dataset = CountingDataset("fork")
    loader = tq.QueueFlowLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="fork")
    try:
        with pytest.raises(TypeError, match=r"get_context\('spawn'\)"):
            list(loader)
    finally:
        loader.close()
    assert_no_workers()


def test_a_worker_whose_consumer_stopped_before_sending_its_start_exits_quietly(capfd):
    # before: Ctrl-C while a pipeline started its workers printed each new worker's "EOFError: Ran out of
    # input" under your KeyboardInterrupt (the fork server's child found its consumer's pipe closed)
    from torchqueue import _forkserver

    read, write = os.pipe()
    os.close(write)  # the consumer is gone: nothing will come
    reports, report_to = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert _forkserver._bootstrap(read, report_to) == 1
    assert capfd.readouterr().err == ""
    reports.close()
    report_to.close()


def test_the_names_the_fork_server_keeps_go_in_messages_it_reads_whole():
    # a pipeline of many steps has hundreds of semaphores: each message must fit the server's read
    from torchqueue import _forkserver

    names = [f"/mp-{i:08d}" for i in range(1000)]
    messages = list(_forkserver._name_messages(_forkserver._KEEP, names))
    assert len(messages) > 1 and all(len(m) <= _forkserver._MESSAGE_BYTES for m in messages)
    assert all(m[:1] == _forkserver._KEEP for m in messages)
    assert [n.decode() for m in messages for n in m[1:].split(b"\0") if n] == names


def _report_of(load) -> dict | None:
    """What a worker of the fork server reports after ``load()`` (its step's loading), or ``None``."""
    import pickle

    from torchqueue import _preload

    reports, report_to = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.modules.pop("colorsys", None)  # installed (the standard library), and imported by nothing else here
    _preload.start_worker(report_to)
    with _preload.reporting():
        load()
    with reports:  # the worker's end is closed once it reported, or chose not to: no wait
        message = reports.recv(1 << 20)
    return pickle.loads(message) if message else None


def test_a_worker_reports_the_installed_modules_its_step_imported():
    report = _report_of(lambda: __import__("colorsys"))
    assert report is not None and "colorsys" in report["names"] and report["argv"] == sys.argv
    assert report["environ"] == dict(os.environ) and report["cwd"] == os.getcwd()


@pytest.mark.parametrize("start", ["threading", "_thread"])
def test_a_worker_whose_step_started_a_thread_as_it_loaded_reports_nothing(start):
    # the server would import that module too, and start the thread there: a worker it forked while
    # that thread held a lock would hang (two reviewers' modules did; the second one's thread, started
    # with _thread, was not in threading.enumerate())
    import _thread

    stop = threading.Event()

    def load():
        __import__("colorsys")
        if start == "threading":
            threading.Thread(target=stop.wait, daemon=True).start()
        else:
            _thread.start_new_thread(stop.wait, ())

    try:
        assert _report_of(load) is None
    finally:
        stop.set()


def test_the_fork_server_keeps_its_signal_handlers_whatever_a_module_it_imports_sets():
    # a reviewer's module set SIGINT's default handler at import: Ctrl-C then killed the server (the next
    # epoch failed: BrokenPipeError); one that reset SIGCHLD made every epoch 6 s slower
    from torchqueue import _preload

    report = {"environ": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv}
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGCHLD)}
    try:
        with _preload._as_in(report, {}):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        assert {number: signal.getsignal(number) for number in before} == before
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def settings_a_worker_sees(_):
    import warnings

    ignored = [getattr(message, "pattern", None) for action, message, *_ in warnings.filters if action == "ignore"]
    probe = "torchqueue probe" in ignored
    return (
        torch.randn(1).dtype,
        torch.are_deterministic_algorithms_enabled(),
        torch.get_float32_matmul_precision(),
        probe,
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_worker_computes_with_the_consumers_torch_settings_where_a_forked_one_would(context, user_thread):
    """Under "fork" a worker of the fork server (another thread runs) computes as a forked DataLoader worker
    does: float64 where the script set it (before: float32, silently), deterministic algorithms, the warnings
    it filtered. Under "spawn" nothing is carried, as DataLoader's spawned workers get nothing."""
    import warnings

    from torchqueue import _forkserver, _inherited

    before = _inherited.capture()
    with warnings.catch_warnings():  # puts this process's filters back as they were
        try:
            torch.set_default_dtype(torch.float64)
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.set_float32_matmul_precision("medium")
            warnings.filterwarnings("ignore", "torchqueue probe")
            with tq.Sequence(tq.ProcessStep(settings_a_worker_sees), context=context) as seq:
                got = list(seq(range(1)))
                assert (_forkserver.server_pid() is not None) == (context == "fork")
        finally:
            before.apply()
    fresh = (torch.float32, False, "highest", False)
    assert got == [(torch.float64, True, "medium", True) if context == "fork" else fresh]
    assert settings_a_worker_sees(None) == fresh  # this process's own settings are back


def dynamo_imported(_):
    return "torch._dynamo" in sys.modules


@pytest.mark.timeout(60)
def test_a_worker_given_the_default_settings_does_not_import_what_setting_them_would(user_thread):
    # before: every worker of the fork server set deterministic algorithms (off, as they were), which imports
    # torch._dynamo: its first output came 0.85 s late, and close() waited 1 s more for the server, which
    # imported it too, as the worker reported
    assert not torch.are_deterministic_algorithms_enabled()
    with tq.Sequence(tq.ProcessStep(dynamo_imported)) as seq:
        assert list(seq(range(2))) == [False, False]


NEW_PRECISION_API = """
    import json, torch, torchqueue as tq

    def seen(_):
        return [torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark, str(torch.tensor([1 / 3]))]

    if __name__ == "__main__":
        # before: get_float32_matmul_precision() raised as the first worker started ("mix of the legacy
        # and new APIs"): no pipeline could start after the API torch recommends
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.cudnn.deterministic = torch.backends.cudnn.benchmark = True
        torch.set_printoptions(precision=2)
        with tq.Sequence(tq.ProcessStep(seen)) as seq:
            print(json.dumps(list(seq(range(1)))))
"""


@pytest.mark.timeout(90)
def test_a_worker_takes_the_new_precision_api_the_backends_flags_and_print_options(tmp_path):
    assert json.loads(run_program(NEW_PRECISION_API, tmp_path)) == [["bf16", True, True, "tensor([0.33])"]]


PLUGIN_WARNINGS = """
    import importlib.util, json, os, sys, warnings, torch, torchqueue as tq

    def plugin(name, path, source):  # as plug-in loaders load modules: from a file, by path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    if __name__ == "__main__":
        # before: the worker died before it started (ModuleNotFoundError unpickling the plug-in's
        # category); and an "error" filter failed the start on a warning of the step's own import
        categories = plugin("plugin_warnings", "plugins/plugin_warnings.py", "class PluginWarning(UserWarning): pass")
        warnings.filterwarnings("ignore", category=categories.PluginWarning)
        with open("noisy.py", "w") as file:
            file.write("import warnings\\nwarnings.warn('old API', DeprecationWarning)\\n"
                       "def triple(x):\\n    return 3 * x\\n")
        sys.path.insert(0, ".")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import noisy
        warnings.simplefilter("error")  # after the imports, as scripts do
        with tq.Sequence(tq.ProcessStep(noisy.triple)) as seq:
            print(json.dumps(list(seq(range(3)))))
"""


@pytest.mark.timeout(90)
def test_filters_of_plugin_categories_and_error_filters_leave_the_workers_starting_as_forked_ones(tmp_path):
    assert json.loads(run_program(PLUGIN_WARNINGS, tmp_path)) == [0, 3, 6]


UNUSED_CATEGORY = """
    import json, sys, warnings, torchqueue as tq

    def imported(_):
        return "heavy_library" in sys.modules

    if __name__ == "__main__":
        # before: each worker imported the module of every category the consumer's filters named, to
        # set them: after ``import lightning``, lightning and sympy (1.3 s to the first output)
        with open("heavy_library.py", "w") as file:
            file.write("class HeavyWarning(UserWarning):\\n    pass\\n")
        sys.path.insert(0, ".")
        import heavy_library
        warnings.filterwarnings("ignore", category=heavy_library.HeavyWarning)
        with tq.Sequence(tq.ProcessStep(imported)) as seq:
            print(json.dumps(list(seq(range(1)))))
"""


@pytest.mark.timeout(90)
def test_a_worker_imports_no_module_only_for_a_warnings_filter(tmp_path):
    assert json.loads(run_program(UNUSED_CATEGORY, tmp_path)) == [False]


class HoldsAConnection(torch.utils.data.Dataset):
    """A dataset holding an open sqlite connection (as PyG's OnDiskDataset does): it does not pickle."""

    def __init__(self) -> None:
        import sqlite3

        self.db = sqlite3.connect(":memory:")

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.timeout(60)
def test_a_loader_whose_dataset_cannot_go_to_the_fork_servers_workers_says_why_and_what_to_do(user_thread):
    # before: "step 'fetch' cannot be pickled ...: cannot pickle 'sqlite3.Connection' object. Make its function
    # and what it refers to picklable": a step the user never declared, and no word of the thread that caused it
    loader = tq.QueueFlowLoader(HoldsAConnection(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(TypeError) as raised:
        list(loader)
    message = str(raised.value)
    assert message.startswith(
        "the loader's dataset, collate_fn and worker_init_fn cannot be pickled for the 'fork' start method: "
        "cannot pickle 'sqlite3.Connection' object. Make them picklable (open connections and files lazily"
    )
    assert "while other threads run in this process (" in message and "'fetch'" not in message
    assert threading.current_thread().name not in message.split("threads run in this process (")[1].split(")")[0]
    loader.close()
    assert_no_workers()


class ReadsAMemmap:
    """A step over arrays mapped from a file: what its worker holds, and the rows it is asked for."""

    def __init__(self, path: str) -> None:
        import numpy as np

        self.images = np.memmap(path, dtype=np.float32, mode="r+", shape=(8, 6))
        self.rows = self.images[2:5]  # a view, at an offset into the file
        self.columns = np.memmap(path, dtype=np.float32, mode="r", shape=(6, 8), order="F")
        self.strided = self.images[:, ::2]  # not contiguous: copied

    def __call__(self, row: int) -> tuple:
        import numpy as np

        mapped = [isinstance(a, np.memmap) and a._mmap is not None for a in (self.images, self.rows, self.columns)]
        arrays = (self.images, self.rows, self.columns, self.strided)
        return mapped, self.images.filename, [np.array(a).tolist() for a in arrays], float(self.images[row, 0])


@pytest.mark.timeout(60)
def test_a_memmap_reaches_the_fork_servers_workers_mapped_as_a_forked_one(tmp_path, user_thread):
    # before: pickled as an in-memory copy: a 300 MB memmap cost each worker 300 MB, and writes went unseen
    import numpy as np

    path = str(tmp_path / "images.f32")
    np.arange(48, dtype=np.float32).tofile(path)
    step = ReadsAMemmap(path)
    with tq.Sequence(tq.ProcessStep(step), context="fork") as seq:
        ((mapped, filename, arrays, value),) = list(seq([3]))
        assert mapped == [True, True, True] and filename == step.images.filename and value == 18.0
        assert arrays == [np.array(a).tolist() for a in (step.images, step.rows, step.columns, step.strided)]
        step.images[3, 0] = -1.0  # the same mapping in both processes: the worker sees the write
        assert list(seq([3]))[0][3] == -1.0
    assert_no_workers()


class ReadsAFile:
    def __init__(self, path: str, mode: str = "rb") -> None:
        self.file = open(path, mode)  # noqa: SIM115
        self.file.read(3)

    def __call__(self, n: int) -> bytes:
        return self.file.read(n)


@pytest.mark.timeout(60)
def test_a_file_open_for_reading_reaches_the_fork_servers_workers_at_its_position(tmp_path, user_thread):
    # before: TypeError: cannot pickle '_io.BufferedReader' object (DataLoader's forked workers read it)
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(32)))
    reader, writer = ReadsAFile(str(path)), ReadsAFile(str(path), "r+b")
    try:
        with tq.Sequence(tq.ProcessStep(reader), context="fork") as seq:
            assert list(seq([4, 2])) == [bytes(range(3, 7)), bytes(range(7, 9))]
        with pytest.raises(TypeError, match="cannot pickle '_io.BufferedRandom' object"):  # opened for writing too
            with tq.Sequence(tq.ProcessStep(writer), context="fork") as seq:
                list(seq([1]))
    finally:
        reader.file.close()
        writer.file.close()
    assert_no_workers()
