"""ClientLink: the engine process's end of one client connection, read and written from the
engine's step loop without blocking it and without waking another thread.

The client's end is a plain `multiprocessing.connection.Connection` (a socket pair); this
end speaks Connection's wire format on the socket directly: each message is a 4-byte
big-endian signed length, then its pickle (length -1: an 8-byte length follows, for a
message over 2 GiB). Why not a Connection here too: its `recv` makes two blocking reads per
message and its `send` blocks on a full socket. Every read or write releases the GIL, so a
busy thread beside the step loop (the writer thread a blocking send needs) takes it from
the loop again and again, and a client slow to read could stall a step. Here

- `read()` takes everything waiting in one non-blocking `recv` and unpickles the complete
  messages in it (a partial one waits for the next read);
- `send()` pickles and frames a message (so one that cannot be pickled raises in the
  caller); `flush()` writes all framed messages in one non-blocking `send`. What does not
  fit (a client slow to read) goes, with every flush after it, to a writer thread that
  writes it blocking: the order is kept and the step loop never waits.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import struct
import threading
from multiprocessing.connection import Connection
from typing import Any

_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
_READ_SIZE = 1 << 20


class ClientLink:
    def __init__(self, conn: Connection):
        self.conn = conn  # kept open: the socket is a duplicate of its descriptor
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._inbox = bytearray()  # received bytes not yet a whole message
        self._outbox: list[bytes] = []  # framed messages for the next flush
        self._overflow: queue.SimpleQueue = queue.SimpleQueue()
        # Chunks handed to the writer thread (counted by the step loop) and written by it
        # (counted by the writer): equal when it has nothing left, so the loop may write.
        self._queued = 0
        self._written = 0
        self._writer: threading.Thread | None = None  # started at the first overflow

    def read(self) -> tuple[list[Any], bool]:
        """The complete messages waiting, and whether the client has closed its end."""
        try:
            data = self.sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return [], False
        except OSError:  # reset: the client is gone
            return [], True
        if not data:
            return [], True
        self._inbox += data
        buf, at, msgs = self._inbox, 0, []
        while len(buf) - at >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(buf, at)
            head = _LENGTH.size
            if n == -1:
                if len(buf) - at < head + _LONG_LENGTH.size:
                    break
                (n,) = _LONG_LENGTH.unpack_from(buf, at + head)
                head += _LONG_LENGTH.size
            if len(buf) - at - head < n:
                break
            msgs.append(pickle.loads(buf[at + head: at + head + n]))
            at += head + n
        del buf[:at]
        return msgs, False

    def send(self, msg: Any) -> None:
        """Frame `msg` for the next `flush` (pickle errors raise here)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(data)
        head = _LENGTH.pack(n) if n <= 0x7FFFFFFF else _LENGTH.pack(-1) + _LONG_LENGTH.pack(n)
        self._outbox += (head, data)

    def flush(self) -> None:
        """Write what `send` framed: here if the socket takes it, else on the writer thread."""
        if not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        if self._queued == self._written:  # the writer has nothing left: this write goes first
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:  # the client is gone; its end's EOF tells the loop
                return
            if sent == len(data):
                return
            data = data[sent:]
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="jaxengine-link-writer", daemon=True)
            self._writer.start()
        self._queued += 1
        self._overflow.put(data)

    def _write(self) -> None:
        while (data := self._overflow.get()) is not None:
            try:
                self.sock.sendall(data)
            except OSError:  # the client is gone
                return
            self._written += 1

    def close(self) -> None:
        """Write what is queued (waiting up to 10 s for a slow client), then close."""
        self.flush()
        if self._writer is not None:
            self._overflow.put(None)
            self._writer.join(10)
        self.sock.close()
        self.conn.close()
