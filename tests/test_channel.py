"""The bounded pipe: capacity, timeouts and stop checks, across processes."""

import multiprocessing
import os
import resource
import time

import pytest

import torchqueue as tq
from torchqueue._channel import Channel, Stopped

pytestmark = pytest.mark.timeout(60)


def always():
    return True


def never():
    return False


def _echo(inbox, outbox):
    while (data := inbox.get(always)) != b"stop":
        outbox.put(data[::-1], always)


def test_messages_round_trip_through_another_process_in_order():
    ctx = multiprocessing.get_context("spawn")
    inbox, outbox = Channel(ctx, 2), Channel(ctx, 2)
    process = ctx.Process(target=_echo, args=(inbox, outbox))
    process.start()
    try:
        big = bytes(range(256)) * 4096  # larger than a pipe buffer
        for message in [b"abc", big, b""]:
            inbox.put(message, always)
            got = outbox.get(always)
            while got is None:
                got = outbox.get(always)
            assert got == message[::-1]
        inbox.put(b"stop", always)
    finally:
        process.join(10)
        if process.exitcode is None:
            process.kill()
    assert process.exitcode == 0


def test_get_with_a_timeout_returns_none_when_nothing_comes():
    channel = Channel(multiprocessing.get_context("fork"), 1)
    start = time.monotonic()
    assert channel.get(always, timeout=0.2) is None
    assert time.monotonic() - start >= 0.15


def test_put_on_a_full_channel_stops_when_asked():
    channel = Channel(multiprocessing.get_context("fork"), 1)
    channel.put(b"x", always)
    assert channel.fill() == 1.0
    with pytest.raises(Stopped):
        channel.put(b"y", never)
    assert channel.get(always) == b"x"
    assert channel.fill() == 0.0


def test_get_on_an_empty_channel_stops_when_asked():
    channel = Channel(multiprocessing.get_context("fork"), 1)
    with pytest.raises(Stopped):
        channel.get(never)


def _double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_process_holding_more_than_1024_files_runs_a_pipeline(context):
    # before: "ValueError: filedescriptor out of range in select()" in the consumer, or a worker's death
    # ("exited with code 1") where a fork server's worker held an fd for each of a dataset's tensors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this machine allows {hard} open files per process")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [open(os.devnull) for _ in range(1100)]
    try:
        channel = Channel(multiprocessing.get_context(context), 1)
        assert channel._reader.fileno() > 1024  # what the pipeline's own pipes get too
        channel.put(b"x", always)
        assert channel.get(always) == b"x"
        channel.close()
        with tq.Sequence(tq.ProcessStep(_double, 2), context=context, timeout=30) as seq:
            assert list(seq(range(10))) == [2 * x for x in range(10)]
    finally:
        for file in held:
            file.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
