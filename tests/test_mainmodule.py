"""What ``__main__`` defines (a script; ``python -c``, as a notebook) works in workers under every start method."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent(
    """
    import dataclasses, sys, threading
    import torch
    import torchqueue as tq

    lock = threading.Lock()  # a global a by-value pickle could not carry

    @dataclasses.dataclass
    class Point:
        x: torch.Tensor
        tag: str

    def make(i):
        with lock:
            return Point(torch.full((3,), float(i)), f"p{i}")

    def bump(p):
        return Point(p.x + 1, p.tag)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return Point(torch.full((2,), float(i)), f"s{i}")

    def keep(batch):
        return batch

    class Refused(Exception):
        pass

    def refuse(x):
        raise Refused(f"no {x}")

    def refusing():
        def closure(x):
            raise Refused(f"no {x}")

        return closure

    def main(context):
        steps = [tq.ProcessStep(make, 2), tq.ProcessStep(bump), tq.ProcessStep(lambda p: p)]
        with tq.Sequence(*steps, context=context) as seq:
            got = list(seq(range(4)))
        assert all(type(p) is Point for p in got), [type(p) for p in got]  # the script's class
        assert [p.tag for p in got] == ["p0", "p1", "p2", "p3"]
        assert all(torch.equal(p.x, torch.full((3,), i + 1.0)) for i, p in enumerate(got))
        loader = tq.QueueFlowLoader(
            Items(), batch_size=3, num_workers=2, multiprocessing_context=context, collate_fn=keep
        )
        batches = list(loader)
        loader.close()
        assert [[s.tag for s in b] for b in batches] == [["s0", "s1", "s2"], ["s3", "s4", "s5"]]
        assert all(type(s) is Point for b in batches for s in b)
        for fn in (refuse, refusing(), lambda x: refuse(x)):  # the exception's class is the script's
            with tq.Sequence(tq.ProcessStep(fn), context=context) as seq:
                try:
                    list(seq(range(2)))
                except Refused as exc:
                    assert "no 0" in str(exc)
                else:
                    raise AssertionError(f"{fn} raised no Refused")
        print("ok", context)
    """
)


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_a_scripts_functions_classes_and_globals_work_in_workers(tmp_path, context):
    script = tmp_path / "script.py"
    script.write_text(PROGRAM + '\nif __name__ == "__main__":\n    main(sys.argv[1])\n')
    result = subprocess.run(
        [sys.executable, str(script), context], capture_output=True, text=True, cwd=ROOT, timeout=150
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ok {context}" in result.stdout


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_what_a_notebook_defines_works_in_workers(context):
    # ``python -c``: ``__main__`` has no file the workers could import, as in Jupyter (tests/test_notebooks.py
    # runs the real notebooks); the lock then cannot be pickled, so this program's make() does not use it.
    program = PROGRAM.replace("    with lock:\n        return Point", "    return Point") + f"\nmain({context!r})\n"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ok {context}" in result.stdout


GUARDED = textwrap.dedent(
    """
    import sys
    import torchqueue as tq

    def outside(x):  # by reference, as before: the re-import defines it
        return x

    if __name__ == "__main__":
        scale = 3

        class Scaled:
            def __init__(self, x):
                self.x = x * scale

        def calib(x):
            return Scaled(outside(x))

        with tq.Sequence(tq.ProcessStep(calib, 2), context=sys.argv[1]) as seq:
            got = list(seq(range(5)))
        assert all(type(s) is Scaled for s in got), [type(s) for s in got]
        print("ok", [s.x for s in got])
    """
)


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_a_function_and_class_defined_under_the_main_guard_work_in_workers(tmp_path, context):
    # before: by reference, and the workers' re-import skips that block: "Can't get attribute 'calib'"
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    result = subprocess.run(
        [sys.executable, str(script), context], capture_output=True, text=True, cwd=ROOT, timeout=150
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok [0, 3, 6, 9, 12]" in result.stdout


def test_what_the_reimport_defines_is_read_from_the_scripts_source(tmp_path):
    from torchqueue._mainmodule import _names_outside_guard

    script = tmp_path / "s.py"
    script.write_text(
        textwrap.dedent(
            """
            import os.path as osp, json
            from math import pi as PI
            A = B = 1
            try:
                import numpy
            except ImportError:
                numpy = None
            def f(): inner = 1
            class C: pass
            if "__main__" == __name__:
                g = 2
                def h(): pass
            else:
                k = 3
            if __name__ == "__main__" and True:
                m = 4
            """
        )
    )
    names = _names_outside_guard(str(script), 0.0)
    assert {"osp", "json", "PI", "A", "B", "numpy", "f", "C", "k", "m"} <= names
    assert not {"g", "h", "inner"} & names


UNGUARDED = textwrap.dedent(
    """
    import torchqueue as tq

    def calib(x):
        return x * 2

    with tq.Sequence(tq.ProcessStep(calib, 2), context="spawn") as seq:
        print(list(seq(range(10))))
    """
)


def test_a_script_without_the_main_guard_under_spawn_is_told_why_its_workers_died(tmp_path):
    # before: "died: exited with code 1", chained to an internal torchqueue._channel.Stopped traceback
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=150)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("torchqueue.errors.WorkerDiedError: worker ") and "died before it started" in last
    assert 'start pipelines under `if __name__ == "__main__":`' in last
    assert "During handling of the above exception" not in result.stderr
