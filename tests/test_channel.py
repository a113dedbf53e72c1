"""The bounded pipe: capacity, timeouts and stop checks, across processes."""

import multiprocessing
import time

import pytest

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
