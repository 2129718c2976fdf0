"""
End-to-end tests of the real C{twistd txmesh-proxy} command: the proxy runs
as a child process from a YAML file, in front of real upstreams (nginx,
small Python servers in child processes), and is driven by real clients
(curl, raw sockets, the C{websockets} library).

What only a separate process shows lives here: the command line, refusal to
start on a bad file, SIGHUP and C{--watch} reloads, memory staying flat
while 100 MB bodies stream through, and the proxy surviving an upstream that
dies mid-response.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from time import sleep as time_sleep
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import log
from twisted.trial import unittest

from tests.support import CURL, Nginx, curl, free_port, raw_connect, sleep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

FLAGS_HEADER = b"x-txmesh-flags"
MB = 1 << 20


def child_env() -> dict[str, str]:
    """
    @return: the environment for child Python processes: this one's, with
        the repository first on C{PYTHONPATH} (so twistd finds the plugin).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@defer.inlineCallbacks
def wait_port(process: subprocess.Popen, port: int, what: str, timeout: float = 10.0) -> Any:
    """
    Wait until C{process} accepts on C{port}; fail early if it exits.
    """
    deadline = reactor.seconds() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if reactor.seconds() > deadline:
                raise AssertionError(f"{what} did not listen on {port} within {timeout}s") from None
        yield sleep(0.05)


def parse_head(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    Split curl's C{-D -} output into the final response's status, headers
    and body (informational heads such as C{100 Continue} are skipped).
    """
    rest = raw
    while True:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        if status >= 200:
            break
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def vm_hwm_kb(pid: int) -> int:
    """
    @return: the peak resident set size (C{VmHWM}) of process C{pid}, in kB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


# Upstreams that nginx cannot play: a body sink that counts and hashes what
# it reads, an upstream that dies mid-response, a WebSocket echo server.

SINK_SCRIPT = r'''
import asyncio, hashlib, json, os, sys

async def read_body(reader, headers):
    h, n = hashlib.sha256(), 0
    if "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            chunk = await reader.read(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("body cut short")
            h.update(chunk)
            n += len(chunk)
            left -= len(chunk)
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            while size:
                chunk = await reader.read(min(size, 1 << 20))
                if not chunk:
                    raise ConnectionError("body cut short")
                h.update(chunk)
                n += len(chunk)
                size -= len(chunk)
            await reader.readexactly(2)
    return n, h.hexdigest()

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if path.startswith("/crash"):
                # Promise a megabyte, send 100 KB, die.
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 100000)
                await writer.drain()
                os._exit(0)
            if path.startswith("/sink/slow"):
                # Read nothing for a while: the proxy must stop reading
                # the client rather than buffer the body.
                await asyncio.sleep(1.5)
            expect = headers.get("expect", "")
            if expect.lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            n, digest = await read_body(reader, headers)
            body = json.dumps({"method": method, "path": path, "bytes": n, "sha256": digest,
                               "expect": expect,
                               "transfer_encoding": headers.get("transfer-encoding", "")}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

WEBSOCKET_ECHO_SCRIPT = r'''
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), max_size=None):
        await asyncio.get_running_loop().create_future()

asyncio.run(main())
'''


class PythonUpstream:
    """
    A Python script run as a child process listening on a fixed port.
    """

    def __init__(self, testcase: Any, script: str):
        self.dir = tempfile.mkdtemp(prefix="txmesh-upstream-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        path = os.path.join(self.dir, "upstream.py")
        with open(path, "w") as f:
            f.write(script)
        self.port = free_port()
        with open(os.path.join(self.dir, "stderr"), "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, path, str(self.port)], env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        testcase.addCleanup(_stop_process, self.process, signal.SIGKILL)

    def wait_listening(self) -> defer.Deferred:
        return wait_port(self.process, self.port, "upstream")


class ProxyProcess:
    """
    C{twistd -n txmesh-proxy} as a child process, from a config template.

    The template's C{{http}}, C{{tcp}} and C{{admin}} placeholders are fixed
    free ports (a child cannot report a port 0 back); other placeholders are
    filled from L{write}'s keyword arguments.  Its log (stdout) and stderr
    go to files in a temporary directory.
    """

    def __init__(self, testcase: Any):
        self._case = testcase
        self.dir = tempfile.mkdtemp(prefix="txmesh-proxy-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "proxy.yaml")
        self.log_path = os.path.join(self.dir, "twistd.log")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.ports = {"http": free_port(), "tcp": free_port(), "admin": free_port()}
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    def write(self, template: str, **values: Any) -> None:
        text = textwrap.dedent(template)
        for k, v in {**self.ports, **values}.items():
            text = text.replace("{" + k + "}", str(v))
        # Write-then-rename, so a watching proxy never reads half a file.
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def start(self, *options: str) -> None:
        with open(self.log_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "txmesh-proxy", "--config", self.path, *options],
                cwd=self.dir, env=child_env(), stdout=out, stderr=err)
        self._case.addCleanup(self.stop)

    def stop(self) -> None:
        """
        Stop the proxy (SIGTERM, then SIGKILL); copy its output to the test
        log, and fail the test if it holds a traceback.
        """
        if self.process is None:
            return
        _stop_process(self.process)
        text = self.log_text()
        log.msg(f"txmesh-proxy output (exit {self.process.returncode}):\n{text}")
        if "Traceback" in text or "Unhandled" in text:
            raise AssertionError(f"txmesh-proxy logged an error:\n{text}")

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            log_text = f.read().decode("utf-8", "replace")
        with open(self.stderr_path, "rb") as f:
            return log_text + f.read().decode("utf-8", "replace")

    def reload(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    @defer.inlineCallbacks
    def wait_ready(self, timeout: float = 15.0) -> Any:
        """
        Poll the admin C{/ready} until it answers 200; fail early (with the
        proxy's output) if the process exits.
        """
        deadline = reactor.seconds() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"txmesh-proxy exited with {self.process.returncode}:\n{self.log_text()}")
            out, _, code = yield curl("--max-time", "1", "-o", "/dev/null", "-w", "%{http_code}",
                                      self.admin + "/ready")
            if code == 0 and out == b"200":
                return
            if reactor.seconds() > deadline:
                raise AssertionError(f"txmesh-proxy not ready within {timeout}s:\n{self.log_text()}")
            yield sleep(0.1)

    @defer.inlineCallbacks
    def run(self, template: str, *options: str, **values: Any) -> Any:
        """
        Write the config, start the proxy and wait until it is ready.
        """
        self.write(template, **values)
        self.start(*options)
        yield self.wait_ready()
        return self

    @defer.inlineCallbacks
    def config_version(self) -> Any:
        out, _, code = yield curl(self.admin + "/config_dump")
        assert code == 0, code
        return json.loads(out)["version"]

    @defer.inlineCallbacks
    def wait_log(self, pattern: str, timeout: float = 10.0) -> Any:
        """
        Wait until the proxy's output matches C{pattern}.
        """
        deadline = reactor.seconds() + timeout
        while True:
            text = self.log_text()
            if re.search(pattern, text):
                return text
            if reactor.seconds() > deadline:
                raise AssertionError(f"{pattern!r} not in the proxy log within {timeout}s:\n{text}")
            yield sleep(0.1)


NGINX_SITE = """
    server {{
      listen 127.0.0.1:{port};
      root www;
      default_type text/plain;
      location = /hello {{ return 200 "hello from nginx\\n"; }}
      location /p/ {{ return 200 "$uri"; }}
      location /files/ {{ }}
      location /dav/ {{ dav_methods PUT; create_full_put_path on; client_max_body_size 0; }}
      location /tiny/ {{ dav_methods PUT; client_max_body_size 1k; }}
    }}
"""

BASE_CONFIG = """
    node: {id: t, workload: t, namespace: default, app: t, version: v1}
    admin: {address: "tcp:{admin}:interface=127.0.0.1"}
    listeners:
      - name: http
        address: "tcp:{http}:interface=127.0.0.1"
        http_filters: [{name: metrics}]
        routes:
          - {name: health, match: {path: /healthz}, direct_response: {status: 200, body: ok}}
          {extra_routes}
          - {name: sink, match: {prefix: /sink}, cluster: sink}
          - {name: default, match: {prefix: /}, cluster: app}
      - name: tcp
        address: "tcp:{tcp}:interface=127.0.0.1"
        protocol: tcp
        cluster: app
    clusters:
      - name: app
        endpoints: ["127.0.0.1:{app}"]
      - name: sink
        endpoints: ["127.0.0.1:{sink}"]
"""


class ProxyProcessTests(unittest.TestCase):
    """
    The real C{twistd txmesh-proxy} between real clients and upstreams.
    """

    timeout = 60

    def setUp(self) -> None:
        if CURL is None:
            raise unittest.SkipTest("curl is not installed")
        if not os.path.exists(TWISTD):
            raise unittest.SkipTest(f"no twistd next to {sys.executable}")

    @defer.inlineCallbacks
    def start_nginx(self) -> Any:
        """
        Start nginx serving C{www/} from its prefix; its workers (which
        drop to C{nobody} when run as root) may read the prefix and write
        under C{www/dav}.

        @return: C{(nginx, port)}.
        """
        port = free_port()
        nginx = Nginx(self, NGINX_SITE.format(port=port))
        os.chmod(nginx.prefix, 0o755)
        for sub in ("files", "dav"):
            os.makedirs(os.path.join(nginx.prefix, "www", sub))
        os.chmod(os.path.join(nginx.prefix, "www", "dav"), 0o777)
        yield nginx.wait_listening(port)
        return nginx, port

    @defer.inlineCallbacks
    def start_proxy(self, *options: str, app: int, sink: int = 1, extra_routes: str = "") -> Any:
        """
        Run the proxy from L{BASE_CONFIG} (a short drain, so a hung request
        cannot stretch cleanup).
        """
        proxy = ProxyProcess(self)
        yield proxy.run(BASE_CONFIG, "--drain-timeout", "3", *options,
                        app=app, sink=sink, extra_routes=extra_routes)
        return proxy

    # 1. The command line

    @defer.inlineCallbacks
    def test_help(self) -> Any:
        """
        C{--help} lists the options in Twisted's usage style and exits 0.
        """
        out, err, code = yield getProcessOutputAndValue(
            TWISTD, ("-n", "--pidfile=", "txmesh-proxy", "--help"), env=child_env(), path=REPO)
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("Usage: twistd [options] txmesh-proxy --config FILE [options]", text)
        self.assertRegex(text, r"-c, --config=\s+The proxy's YAML config file \(required without")
        self.assertRegex(text, r"-w, --watch=\s+Seconds between checks")
        self.assertRegex(text, r"--drain-timeout=\s+Seconds in-flight requests")
        self.assertIn("[default: 5.0]", text)
        self.assertIn("SIGHUP", text)

    @defer.inlineCallbacks
    def test_missing_config(self) -> Any:
        """
        Without C{--config} twistd prints the reason and exits non-zero.
        """
        out, err, code = yield getProcessOutputAndValue(
            TWISTD, ("-n", "--pidfile=", "txmesh-proxy"), env=child_env(), path=REPO)
        self.assertNotEqual(code, 0)
        self.assertIn(b"--config FILE or --pilot ADDRESS is required", out + err)

    # 2. Refusing to start

    @defer.inlineCallbacks
    def test_invalid_config_refuses_to_start(self) -> Any:
        """
        An invalid file stops the proxy before it listens: a non-zero exit
        and a message with the file, the field and the reason.
        """
        proxy = ProxyProcess(self)
        proxy.write("""
            listeners:
              - name: http
                address: "tcp:{http}:interface=127.0.0.1"
                routes: [{match: {prefix: /}, cluster: nope}]
            clusters:
              - {name: app, endpoints: ["127.0.0.1:1"]}
            """)
        proxy.start()
        code = yield deferToThread(proxy.process.wait, 20)
        self.assertNotEqual(code, 0)
        with open(proxy.stderr_path) as f:
            stderr = f.read()
        self.assertIn(proxy.path, stderr)
        self.assertIn("listeners[0].routes[0].cluster", stderr)
        self.assertIn("unknown cluster 'nope'", stderr)
        self.assertNotIn("Traceback", proxy.log_text())

    # 3. HTTP/1 through the proxy to nginx and a body sink

    @defer.inlineCallbacks
    def test_http_to_nginx(self) -> Any:
        """
        GET (body byte for byte), HEAD, HTTP/1.0; successful responses carry
        no response-flags header.
        """
        nginx, port = yield self.start_nginx()
        blob = os.urandom(256 * 1024 + 7)
        with open(os.path.join(nginx.prefix, "www", "files", "blob"), "wb") as f:
            f.write(blob)
        proxy = yield self.start_proxy(app=port)
        # Without -r, txmesh-proxy runs on its own reactor: the 256 kB blob
        # takes its batched-write path past a full socket buffer.
        self.assertIn("reactor class: txmesh.reactor.TxmeshReactor", proxy.log_text())

        out, err, code = yield curl("-D", "-", proxy.http + "/files/blob")
        self.assertEqual(code, 0, err)
        status, headers, body = parse_head(out)
        self.assertEqual(status, 200)
        self.assertEqual(body, blob)
        self.assertEqual(headers[b"content-length"], str(len(blob)).encode())
        self.assertNotIn(FLAGS_HEADER, headers)

        out, err, code = yield curl("-I", proxy.http + "/files/blob")
        self.assertEqual(code, 0, err)
        status, headers, body = parse_head(out)
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers[b"content-length"], str(len(blob)).encode())
        self.assertNotIn(FLAGS_HEADER, headers)

        out, err, code = yield curl("--http1.0", "-D", "-", proxy.http + "/files/blob")
        self.assertEqual(code, 0, err)
        status, headers, body = parse_head(out)
        self.assertEqual(status, 200)
        self.assertEqual(body, blob)

        out, err, code = yield curl("--http1.0", proxy.http + "/hello")
        self.assertEqual((code, out), (0, b"hello from nginx\n"), err)

    @defer.inlineCallbacks
    def test_request_bodies(self) -> Any:
        """
        Request bodies arrive intact: a POST of a file to a sink that hashes
        it (curl sends C{Expect: 100-continue} past 1 MB), a PUT to nginx
        read back byte for byte, and an explicit C{Expect: 100-continue}
        whose C{100 Continue} reaches the client.
        """
        nginx, port = yield self.start_nginx()
        sink = PythonUpstream(self, SINK_SCRIPT)
        yield sink.wait_listening()
        proxy = yield self.start_proxy(app=port, sink=sink.port)
        data = os.urandom(2 * MB + 3)
        path = os.path.join(proxy.dir, "upload.bin")
        with open(path, "wb") as f:
            f.write(data)

        out, err, code = yield curl("--data-binary", "@" + path, proxy.http + "/sink/post")
        self.assertEqual(code, 0, err)
        seen = json.loads(out)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["bytes"], len(data))
        self.assertEqual(seen["sha256"], hashlib.sha256(data).hexdigest())
        self.assertEqual(seen["expect"], "100-continue")

        # Chunked request framing passes through too.
        out, err, code = yield curl("-H", "Transfer-Encoding: chunked", "--data-binary", "@" + path,
                                    proxy.http + "/sink/chunked")
        self.assertEqual(code, 0, err)
        seen = json.loads(out)
        self.assertEqual((seen["bytes"], seen["sha256"]), (len(data), hashlib.sha256(data).hexdigest()))

        out, err, code = yield curl("-D", "-", "-T", path, proxy.http + "/dav/upload.bin")
        self.assertEqual(code, 0, err)
        self.assertEqual(parse_head(out)[0], 201)
        with open(os.path.join(nginx.prefix, "www", "dav", "upload.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

        small = os.path.join(proxy.dir, "small.txt")
        with open(small, "wb") as f:
            f.write(b"expect me\n" * 100)
        out, err, code = yield curl("-D", "-", "-H", "Expect: 100-continue", "-T", small,
                                    proxy.http + "/dav/small.txt")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, rb"^HTTP/1\.1 100 Continue\r\n\r\nHTTP/1\.1 201 ")
        _, headers, _ = parse_head(out)
        self.assertNotIn(FLAGS_HEADER, headers)
        out, err, code = yield curl(proxy.http + "/dav/small.txt")
        self.assertEqual(out, b"expect me\n" * 100)

        # The upstream refuses before any 100 Continue: curl gets the 413
        # without sending its body, and the proxy serves on.
        out, err, code = yield curl("-D", "-", "-o", "/dev/null", "-H", "Expect: 100-continue", "-T", path,
                                    proxy.http + "/tiny/refused.bin")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, rb"^HTTP/1\.1 413 ")
        out, err, code = yield curl(proxy.http + "/hello")
        self.assertEqual((code, out), (0, b"hello from nginx\n"), err)

    # 4. 100 MB each way with flat memory

    @defer.inlineCallbacks
    def test_100mb_request_body_streams(self) -> Any:
        """
        A 100 MB upload streams through to an upstream that reads it all,
        twice: to a prompt reader, then to one that reads nothing for 1.5 s
        (the proxy must stop reading curl, not buffer).  The proxy's peak
        RSS grows by less than 50 MB.
        """
        sink = PythonUpstream(self, SINK_SCRIPT)
        yield sink.wait_listening()
        proxy = yield self.start_proxy(app=1, sink=sink.port)
        path = os.path.join(proxy.dir, "zeros")
        with open(path, "wb") as f:
            f.truncate(100 * MB)
        digest = hashlib.sha256(bytes(100 * MB)).hexdigest()
        yield curl(proxy.http + "/healthz")
        before = vm_hwm_kb(proxy.process.pid)
        for url in ("/sink/big", "/sink/slow"):
            started = reactor.seconds()
            out, err, code = yield curl("--max-time", "25", "-H", "Expect:", "--data-binary", "@" + path,
                                        proxy.http + url)
            elapsed = reactor.seconds() - started
            after = vm_hwm_kb(proxy.process.pid)
            log.msg(f"100 MB request body to {url}: VmHWM {before} kB -> {after} kB in {elapsed:.2f}s")
            self.assertEqual(code, 0, err)
            seen = json.loads(out)
            self.assertEqual((seen["bytes"], seen["sha256"]), (100 * MB, digest))
            self.assertLess(after - before, 50 * 1024, (url, before, after))

    @defer.inlineCallbacks
    def test_100mb_response_body_streams(self) -> Any:
        """
        A 100 MB file from nginx streams to curl, then to a client that
        reads nothing for 1.5 s (the proxy must stop reading nginx, not
        buffer).  The proxy's peak RSS grows by less than 50 MB.
        """
        nginx, port = yield self.start_nginx()
        with open(os.path.join(nginx.prefix, "www", "files", "big"), "wb") as f:
            f.truncate(100 * MB)
        proxy = yield self.start_proxy(app=port)
        yield curl(proxy.http + "/hello")
        before = vm_hwm_kb(proxy.process.pid)
        started = reactor.seconds()
        out, err, code = yield curl("--max-time", "25", "-o", "/dev/null", "-w", "%{size_download}",
                                    proxy.http + "/files/big")
        elapsed = reactor.seconds() - started
        after = vm_hwm_kb(proxy.process.pid)
        log.msg(f"100 MB response body to curl: VmHWM {before} kB -> {after} kB in {elapsed:.2f}s")
        self.assertEqual(code, 0, err)
        self.assertEqual(int(out), 100 * MB)
        self.assertLess(after - before, 50 * 1024, (before, after))

        def slow_reader() -> int:
            with socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=20) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                s.sendall(b"GET /files/big HTTP/1.1\r\nHost: slow\r\nConnection: close\r\n\r\n")
                time_sleep(1.5)
                received = 0
                data = b""
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    if data is not None:
                        data += chunk
                        if b"\r\n\r\n" in data:
                            received = len(data.partition(b"\r\n\r\n")[2])
                            data = None
                    else:
                        received += len(chunk)
                return received

        started = reactor.seconds()
        received = yield deferToThread(slow_reader)
        elapsed = reactor.seconds() - started
        after = vm_hwm_kb(proxy.process.pid)
        log.msg(f"100 MB response body to a slow reader: VmHWM {before} kB -> {after} kB in {elapsed:.2f}s")
        self.assertEqual(received, 100 * MB)
        self.assertLess(after - before, 50 * 1024, (before, after))

    # 5. WebSocket

    @defer.inlineCallbacks
    def test_websocket_echo(self) -> Any:
        """
        A WebSocket upgrade through the proxy: 100 messages (text and
        binary, up to 64 KB) come back in order.
        """
        echo = PythonUpstream(self, WEBSOCKET_ECHO_SCRIPT)
        yield echo.wait_listening()
        proxy = yield self.start_proxy(app=echo.port)
        url = f"ws://127.0.0.1:{proxy.ports['http']}/ws"

        def exchange() -> list[Any]:
            from websockets.sync.client import connect

            sent = [f"message {i}" if i % 2 else os.urandom(i * 650) for i in range(100)]
            with connect(url, open_timeout=10, close_timeout=5, max_size=None) as ws:
                for m in sent[:50]:
                    ws.send(m)
                    assert ws.recv(timeout=10) == m
                for m in sent[50:]:  # many in flight at once
                    ws.send(m)
                received = [ws.recv(timeout=10) for _ in sent[50:]]
            return [sent[50:], received]

        sent, received = yield deferToThread(exchange)
        self.assertEqual(len(received), 50)
        self.assertTrue(sent == received, "echoes differ")

    # 6. Pipelining

    @defer.inlineCallbacks
    def test_pipelined_requests_answered_in_order(self) -> Any:
        """
        Twenty GETs written at once on one connection come back in order.
        """
        _, port = yield self.start_nginx()
        proxy = yield self.start_proxy(app=port)
        client = yield raw_connect(self, proxy.ports["http"])
        paths = [f"/p/{i}-{'x' * (i * 37)}" for i in range(20)]
        client.transport.write(b"".join(
            f"GET {p} HTTP/1.1\r\nHost: pipelined\r\n\r\n".encode() for p in paths))

        def responses(data: bytes) -> list[tuple[int, bytes]]:
            out = []
            while b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
                if len(rest) < length:
                    break
                out.append((int(head.split()[1]), rest[:length]))
                data = rest[length:]
            return out

        data = yield client.wait_for(lambda d: len(responses(d)) >= 20, timeout=15)
        got = responses(data)
        self.assertEqual([s for s, _ in got], [200] * 20)
        self.assertEqual([b.decode() for _, b in got], paths)

    # 7. An upstream dying mid-response

    @defer.inlineCallbacks
    def test_upstream_dies_mid_response(self) -> Any:
        """
        The upstream promises 1 MB, sends 100 KB and exits: curl reports a
        partial transfer (exit 18), and the proxy goes on serving.
        """
        crasher = PythonUpstream(self, SINK_SCRIPT)
        yield crasher.wait_listening()
        proxy = yield self.start_proxy(app=crasher.port)
        out, err, code = yield curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                    proxy.http + "/crash")
        self.assertEqual(code, 18, err)
        status, size = out.split()
        self.assertEqual(status, b"200")
        self.assertEqual(int(size), 100000)
        yield deferToThread(crasher.process.wait, 10)

        out, err, code = yield curl(proxy.http + "/healthz")
        self.assertEqual((code, out), (0, b"ok"), err)
        # The dead upstream is now refused: a 503 that says why.
        out, err, code = yield curl("-D", "-", proxy.http + "/again")
        status, headers, _ = parse_head(out)
        self.assertEqual(status, 503)
        self.assertIn(b"UF", headers.get(FLAGS_HEADER, b""))
        self.assertIsNone(proxy.process.poll())

    # 8. Reloads

    @defer.inlineCallbacks
    def test_sighup_reload_and_refusal(self) -> Any:
        """
        SIGHUP applies a rewritten file; an invalid rewrite is refused with
        the field named in the log, and the last good config keeps serving.
        """
        _, port = yield self.start_nginx()
        proxy = yield self.start_proxy(app=port)
        out, _, _ = yield curl("-o", "/dev/null", "-w", "%{http_code}", proxy.http + "/v2")
        self.assertEqual(out, b"404")  # nginx's, for now
        self.assertEqual((yield proxy.config_version()), 1)

        proxy.write(BASE_CONFIG, app=port, sink=1, extra_routes=(
            "- {name: v2, match: {path: /v2}, direct_response: {status: 200, body: two}}"))
        proxy.reload()
        yield self.wait_body(proxy.http + "/v2", b"two")
        self.assertEqual((yield proxy.config_version()), 2)

        proxy.write(BASE_CONFIG, app=port, sink=1, extra_routes=(
            "- {name: broken, match: {prefix: /b}, cluster: missing}"))
        proxy.reload()
        text = yield proxy.wait_log("config reload refused")
        self.assertIn("listeners[0].routes[1].cluster", text)
        self.assertIn("unknown cluster 'missing'", text)
        self.assertEqual((yield proxy.config_version()), 2)
        out, _, _ = yield curl(proxy.admin + "/stats/prometheus")
        self.assertIn(b'txmesh_config_reloads_total{result="applied"} 1.0', out)
        self.assertIn(b'txmesh_config_reloads_total{result="rejected"} 1.0', out)
        out, _, _ = yield curl(proxy.http + "/v2")
        self.assertEqual(out, b"two")
        out, _, _ = yield curl(proxy.http + "/hello")
        self.assertEqual(out, b"hello from nginx\n")
        self.assertIsNone(proxy.process.poll())

    @defer.inlineCallbacks
    def test_watch_picks_up_changes(self) -> Any:
        """
        With C{--watch 0.2} a rewritten file is applied without a signal.
        """
        _, port = yield self.start_nginx()
        proxy = yield self.start_proxy("--watch", "0.2", app=port)
        proxy.write(BASE_CONFIG, app=port, sink=1, extra_routes=(
            "- {name: v2, match: {path: /v2}, direct_response: {status: 200, body: watched}}"))
        yield self.wait_body(proxy.http + "/v2", b"watched")
        self.assertEqual((yield proxy.config_version()), 2)

    @defer.inlineCallbacks
    def wait_body(self, url: str, body: bytes, timeout: float = 10.0) -> Any:
        deadline = reactor.seconds() + timeout
        while True:
            out, _, _ = yield curl(url)
            if out == body:
                return
            if reactor.seconds() > deadline:
                raise AssertionError(f"{url} still answers {out!r}, not {body!r}")
            yield sleep(0.1)

    # 9. L4

    @defer.inlineCallbacks
    def test_tcp_listener(self) -> Any:
        """
        The TCP listener carries HTTP to nginx opaquely, several requests
        on one connection included.
        """
        _, port = yield self.start_nginx()
        proxy = yield self.start_proxy(app=port)
        tcp = f"http://127.0.0.1:{proxy.ports['tcp']}"
        out, err, code = yield curl("-D", "-", tcp + "/hello", tcp + "/p/second")
        self.assertEqual(code, 0, err)
        self.assertIn(b"hello from nginx\n", out)
        self.assertTrue(out.endswith(b"/p/second"), out)
        # Opaque: nothing the HTTP listener adds.
        self.assertNotIn(b"x-request-id", out.lower())

    # 10. Admin

    @defer.inlineCallbacks
    def test_admin_endpoints(self) -> Any:
        """
        C{/ready}, C{/config_dump}, C{/clusters} and C{/stats/prometheus}.
        """
        _, port = yield self.start_nginx()
        proxy = yield self.start_proxy(app=port)

        out, _, _ = yield curl("-w", "\n%{http_code}", proxy.admin + "/ready")
        self.assertEqual(out, b"LIVE\n\n200")

        out, _, _ = yield curl(proxy.admin + "/config_dump")
        dump = json.loads(out)
        self.assertEqual(dump["version"], 1)
        self.assertEqual(dump["source"], proxy.path)
        self.assertEqual([lst["name"] for lst in dump["config"]["listeners"]], ["http", "tcp"])

        out, _, _ = yield curl(proxy.admin + "/clusters")
        clusters = json.loads(out)
        self.assertEqual([e["address"] for e in clusters["app"]["endpoints"]], [f"127.0.0.1:{port}"])

        for _ in range(3):
            out, _, _ = yield curl(proxy.http + "/hello")
            self.assertEqual(out, b"hello from nginx\n")
        out, _, _ = yield curl("-D", "-", proxy.admin + "/stats/prometheus")
        status, headers, body = parse_head(out)
        self.assertEqual(status, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"text/plain"), headers)
        lines = [line for line in body.decode().splitlines()
                 if line.startswith("istio_requests_total{") and 'response_code="200"' in line
                 and 'destination_service_name="app"' in line]
        self.assertEqual(len(lines), 1, body.decode())
        self.assertEqual(float(lines[0].rsplit(" ", 1)[1]), 3.0)

    # Shutdown

    @defer.inlineCallbacks
    def test_sigterm_drains_in_flight_request(self) -> Any:
        """
        SIGTERM closes the listeners, lets a request in flight finish, then
        the process ends (twistd re-raises the signal as its exit status).
        """
        sink = PythonUpstream(self, SINK_SCRIPT)
        yield sink.wait_listening()
        proxy = yield self.start_proxy(app=1, sink=sink.port)
        in_flight = curl("--data-binary", "drain me", proxy.http + "/sink/slow")
        yield sleep(0.5)
        proxy.process.send_signal(signal.SIGTERM)
        out, err, code = yield in_flight
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["bytes"], len("drain me"))
        exit_code = yield deferToThread(proxy.process.wait, 10)
        self.assertEqual(exit_code, -signal.SIGTERM)
        self.assertIn("Server Shut Down", proxy.log_text())
