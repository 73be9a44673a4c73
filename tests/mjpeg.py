"""A network camera for tests: multipart/x-mixed-replace JPEG over HTTP on 127.0.0.1, stoppable mid-stream (the
camera sees its source vanish) and restartable on the same port."""

from __future__ import annotations

import http.server
import socketserver
import threading
from collections.abc import Callable


class MjpegServer:
    """`frame(i)` gives the i-th JPEG of a stream; one is sent every `period` seconds to each open connection."""

    def __init__(self, frame: Callable[[int], bytes], period: float, path: str = "/stream.mjpg") -> None:
        self._frame = frame
        self.period = period
        self.path = path
        self.port = 0
        self.sent = 0
        self.connections = 0
        self._server: socketserver.ThreadingTCPServer | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    i = 0
                    while not owner._stopping.is_set():
                        jpeg = owner._frame(i)
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                        self.wfile.write(head.encode() + jpeg + b"\r\n")
                        owner.sent += 1
                        i += 1
                        owner._stopping.wait(owner.period)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._stopping.clear()
        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Close the listener and end every open stream (the clients see the connection close)."""
        if self._server is not None:
            self._stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"
