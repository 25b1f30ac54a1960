"""Real stores on 127.0.0.1 for benchmarks and tests: a directory served over HTTP (Python's
``http.server``, with a request count per path and an outage switch), and an S3-compatible
server (moto's standalone server) holding an uploaded copy. Nothing else is contacted."""
from __future__ import annotations

import functools
import http.server
import socket
import threading
from collections import Counter
from pathlib import Path

S3_KEYS = {"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1"}  # moto accepts any; never real credentials


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real object stores

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        # the kernel copies file to socket (sendfile), as nginx and object stores' front ends
        # do: the server's CPU per shard is not charged to the loader sharing these two cores
        outputfile.flush()
        self.connection.sendfile(source)

    def setup(self):
        super().setup()
        with self.server.store.lock:
            self.server.store.connections.add(self.connection)

    def finish(self):
        super().finish()
        with self.server.store.lock:
            self.server.store.connections.discard(self.connection)

    def do_GET(self):
        store: HttpStore = self.server.store
        path = self.path.split("?", 1)[0]
        with store.lock:
            store.requests[path] += 1
            cut = store.cut_next > 0 and path.endswith(".tar")
            store.cut_next -= cut
        if not cut:
            return super().do_GET()
        # half the shard, then the connection drops: a server dying in the middle of a transfer
        data = Path(self.translate_path(path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        store.on_cut.set()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HttpStore:
    """Serve ``directory`` on 127.0.0.1; ``stop()``/``start()`` take it down and bring it back
    on the same port; ``cut_next = n`` drops the next n shard transfers halfway; ``requests``
    counts GETs per path."""

    def __init__(self, directory: str | Path, port: int = 0):
        self.directory, self.port = str(directory), port
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self.on_cut = threading.Event()
        self.cut_next = 0
        self.connections: set = set()
        self._server = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), functools.partial(_Handler, directory=self.directory))
        server.store = self
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True, name="http-store").start()
        self._server = server

    def stop(self) -> None:
        """Down as a crashed server is: no listener, and open keep-alive connections reset."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def shard_requests(self) -> int:
        return sum(n for path, n in self.requests.items() if path.endswith(".tar"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no server on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.05)


class ProcessHttpStore:
    """``python -m http.server`` for ``directory`` in its own process (a benchmark's server must
    not share the measuring process's interpreter lock)."""

    def __init__(self, directory: str | Path):
        import subprocess
        import sys

        self.port = free_port()
        self._proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
                                       "--directory", str(directory)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)


class S3Store:
    """moto's S3-compatible server on 127.0.0.1 with ``directory`` uploaded to
    ``s3://bucket/prefix/``; ``env`` holds the variables a client needs (dummy keys). In a thread
    of this process, or (``own_process``) as ``moto_server`` in its own."""

    def __init__(self, directory: str | Path, bucket: str = "datasets", prefix: str = "data",
                 own_process: bool = False):
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.port = free_port()
        if own_process:
            import subprocess
            import sys

            self._server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                             "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(self.port)
        else:
            from moto.server import ThreadedMotoServer

            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.url = f"s3://{bucket}/{prefix}"
        self.env = {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint}
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=bucket)
        root = Path(directory)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")

    def stop(self) -> None:
        if hasattr(self._server, "terminate"):
            self._server.terminate()
            self._server.wait(timeout=30)
        else:
            self._server.stop()
