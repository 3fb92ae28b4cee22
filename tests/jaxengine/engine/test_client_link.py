"""ClientLink (the engine process's end of a client connection) against a real
multiprocessing Connection at the other end: the same messages, in order, both ways,
whatever their size, and a client slow to read never blocks the engine's flush."""

import multiprocessing
import threading
import time

import pytest

from jaxengine.engine.client_link import ClientLink


@pytest.fixture
def pair():
    ours, theirs = multiprocessing.Pipe()
    link = ClientLink(theirs)
    yield link, ours
    link.close()
    ours.close()


def _read_until(link: ClientLink, count: int, timeout: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        msgs, closed = link.read()
        assert not closed
        got += msgs
        if not msgs:
            time.sleep(0.001)
    return got


def test_reads_what_a_connection_sends(pair):
    link, client = pair
    big = bytes(range(256)) * 20_000  # 5 MB: several reads, split across frames
    sent = [("add", 1, ([1, 2, 3], None)), ("abort", "r-1"), ("blob", big), ("call", 2, None, ()), ("stop",)]
    writer = threading.Thread(target=lambda: [client.send(m) for m in sent])
    writer.start()
    got = _read_until(link, len(sent))
    writer.join()
    assert got == sent
    assert link.read() == ([], False)  # nothing left, still connected


def test_a_connection_receives_what_it_flushes_in_order(pair):
    link, client = pair
    msgs = [("reply", i, True, f"r-{i}") for i in range(100)]
    for m in msgs:
        link.send(m)
    link.flush()  # one write
    assert [client.recv() for _ in msgs] == msgs


def test_a_slow_reader_never_blocks_the_flush(pair):
    link, client = pair
    big = b"x" * (16 << 20)  # far beyond the socket's buffer
    t0 = time.perf_counter()
    link.send(("outputs", big))
    link.flush()  # the rest goes to the writer thread
    for i in range(5):  # later flushes queue behind it, never overtake it
        link.send(("outputs", i))
        link.flush()
    assert time.perf_counter() - t0 < 2.0
    time.sleep(0.2)  # the client has not read: the writer is still blocked on the first one
    assert client.recv() == ("outputs", big)
    assert [client.recv() for _ in range(5)] == [("outputs", i) for i in range(5)]


def test_an_unpicklable_message_raises_in_the_caller_and_spoils_nothing(pair):
    link, client = pair
    link.send(("reply", 1, True, "ok"))
    with pytest.raises(Exception):
        link.send(("reply", 2, True, lambda: None))
    link.send(("reply", 3, True, "ok"))
    link.flush()
    assert [client.recv(), client.recv()] == [("reply", 1, True, "ok"), ("reply", 3, True, "ok")]
    assert not client.poll(0.1)


def test_a_closed_client_reads_as_closed(pair):
    link, client = pair
    client.send(("leave",))
    client.close()
    got, closed = [], False
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        msgs, closed = link.read()
        got += msgs
    assert got == [("leave",)] and closed
    link.send(("left",))
    link.flush()  # to a closed peer: no error, nothing hangs


def test_messages_arriving_a_byte_at_a_time(pair):
    """Frames split anywhere (inside the length, inside the pickle), and the long-length form
    (-1, then 8 bytes), parse; each message comes out with its last byte, not before."""
    import os
    import pickle
    import select
    import struct

    link, client = pair
    msgs = [("abort", "r-1"), ("call", 7, None, ()), ("stop_strings", [("r-2", "\n\n")])]
    data = [pickle.dumps(m) for m in msgs]
    frames = [struct.pack("!i", len(data[0])) + data[0],
              struct.pack("!i", -1) + struct.pack("!Q", len(data[1])) + data[1],
              struct.pack("!i", len(data[2])) + data[2]]
    stream = b"".join(frames)
    ends = [sum(map(len, frames[: k + 1])) for k in range(len(frames))]  # byte count completing each
    got, completed_at = [], []
    for i in range(len(stream)):
        os.write(client.fileno(), stream[i: i + 1])
        assert select.select([link.sock], [], [], 5)[0]
        new, closed = link.read()
        assert not closed
        got += new
        completed_at += [i + 1] * len(new)
    assert got == msgs and completed_at == ends
