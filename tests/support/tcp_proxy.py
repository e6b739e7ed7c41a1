"""A TCP proxy on 127.0.0.1 that can tear requests apart: a store that fails the way networks do.

Put it between a client and a real server (moto's S3) and switch its ``mode`` at any time:

- ``"pass"``: bytes go through unchanged;
- ``"cut"``: an HTTP ``PUT`` is forwarded up to its headers and the first bytes of its body, then both
  connections are closed (a request torn mid-upload; GET, HEAD and LIST still work);
- ``"lose-reply"``: requests go through, but the reply to the request that completes an upload (a
  ``PUT`` of a whole object, or the ``POST`` completing a multipart upload) is dropped and the
  connections closed: the store took the object, the client sees a network error;
- ``"down"``: every connection is closed as soon as it is used or accepted (the server is gone).
"""

from __future__ import annotations

import socket
import threading

from adrec.runtime import free_port

BODY_BYTES_BEFORE_CUT = 10


def _completes_upload(request_line: bytes) -> bool:
    method, _, target = request_line.partition(b" ")
    return (method == b"PUT" and b"partNumber=" not in target) or (method == b"POST" and b"uploadId=" in target)


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self.port = free_port(40000, 49999)
        self.cuts = 0  # requests torn apart so far
        self.lost_replies = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.mode == "down":
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            state = {"cutting": False, "last": b""}
            threading.Thread(target=self._pump, args=(client, server, True, state), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, state), daemon=True).start()

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool, state: dict) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.mode == "down":
                    break
                if upstream and data[:8].split(b" ", 1)[0] in (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"):
                    state["last"] = data.split(b"\r\n", 1)[0]
                # An interim "100 Continue" (a single PUT sends its body after it) is passed on: only the final
                # reply of a completed upload is lost.
                if (not upstream and self.mode == "lose-reply" and _completes_upload(state["last"])
                        and not data.startswith(b"HTTP/1.1 100")):
                    self.lost_replies += 1
                    break
                if upstream and self.mode == "cut":
                    if data.startswith(b"PUT "):
                        head, sep, body = data.partition(b"\r\n\r\n")
                        if sep and body:
                            dst.sendall(head + sep + body[:BODY_BYTES_BEFORE_CUT])
                            self.cuts += 1
                            break
                        dst.sendall(data)  # the body follows (after 100-continue): cut that
                        state["cutting"] = True
                        continue
                    if state["cutting"]:
                        dst.sendall(data[:BODY_BYTES_BEFORE_CUT])
                        self.cuts += 1
                        break
                dst.sendall(data)
        except OSError:
            pass
        self._close(src, dst)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            self._close(*self._conns)
