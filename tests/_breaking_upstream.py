"""A raw HTTP/1.1 upstream on loopback that breaks bodies on purpose (tests only).

    with BreakingUpstream() as up:
        httpx.get(up.url + "/break")   # head and 100 of 1000 bytes, then the socket closes

Paths: `/whole` (a 1000-byte body, sent whole), `/break` (the head, 100 bytes of the
1000 announced, then a plain close: httpx raises RemoteProtocolError), `/reset` (the
same, then a TCP reset: ReadError), `/slow` (100 bytes, then nothing until the client
goes: a caller that closes early, or a read timeout), `/garbled` (a whole body that
says it is gzip and is not: httpx's decoder fails above the stream). `always=` answers every path as
that one (the instances of a service all get the same path). A thread per connection,
keep-alive.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

BODY = 1000
PART = 100


class BreakingUpstream:
    def __init__(self, always: str | None = None) -> None:
        self.always = always
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._conns: list[socket.socket] = []

    def __enter__(self) -> BreakingUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept: a close alone does not)
        self.sock.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                path = head.split(b" ", 2)[1].decode()
                self.requests.append(path)
                path = self.always or path
                start = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BODY
                if path.startswith("/garbled"):
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                        b"Content-Length: %d\r\n\r\n" % PART + b"x" * PART
                    )
                    continue
                if path.startswith("/whole"):
                    conn.sendall(start + b"x" * BODY)
                    continue
                conn.sendall(start + b"x" * PART)
                if path.startswith("/reset"):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if path.startswith("/slow"):
                    while conn.recv(65536):  # until the client goes
                        pass
                return
        except OSError:
            return
        finally:
            conn.close()
