"""
The etcd registry: the watch-stream parser, message reading, the key table
and config validation as plain values; the registry's retry and compaction
logic on a fake HTTP client and a L{Clock}; and the real thing against a
real C{etcd} (Debian's etcd-server) on loopback ports: the first read, puts
and deletes through the watch, a bad value, etcd killed and restarted,
changes made while the registry was cut off, and a compaction; and a real
etcd serving https with C{--client-cert-auth}, with certificates made in the
test: read and watched with the right client certificate, refused without
one or when trusting the wrong CA; and a real etcd with authentication on
(simple tokens that expire after 2 s): read and watched as a user with a
read-only role, refused without credentials or with a wrong password (and
recovering when the password file is fixed), and a token that expired or
that etcd forgot in a restart replaced without an error.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent
from zope.interface.verify import verifyObject

from tests.support import free_port, sleep
from txmesh.config.errors import ConfigError
from txmesh.config.model import Endpoint
from txmesh.pilot.registry import IRegistry, ServicePort
from txmesh.pilot.registry.etcd import (
    Credentials,
    EtcdError,
    EtcdRegistry,
    ServiceTable,
    TLSPolicy,
    WatchStreamParser,
    from_config,
    prefix_range_end,
    read_watch_message,
    token_rejected,
)

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
ETCDCTL = shutil.which("etcdctl")
PREFIX = "/txmesh/services/"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def service(host: str, *ports: int, port: int = 9080) -> str:
    """
    @return: a JSON service entry with one endpoint per port in C{ports}.
    """
    return json.dumps({
        "host": host,
        "ports": [{"name": "http", "number": port, "protocol": "HTTP"}],
        "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports],
    })


def put_line(key: str, value: str, revision: int) -> bytes:
    return json.dumps({"result": {"header": {"revision": str(revision)}, "events": [
        {"kv": {"key": b64(key), "value": b64(value), "mod_revision": str(revision)}}]}}).encode() + b"\n"


# --- plain values ----------------------------------------------------------


class WatchStreamParserTests(SynchronousTestCase):
    def test_pieces(self):
        """
        Objects split anywhere, several in one piece, blank lines between.
        """
        stream = b'{"result": {"created": true}}\n\n{"a": "\xc3\xa9"}\n{"b": 1}{"c": 2}\n'
        parser = WatchStreamParser()
        got = []
        for i in range(len(stream)):
            got += parser.feed(stream[i:i + 1])
        self.assertEqual(got, [{"result": {"created": True}}, {"a": "é"}, {"b": 1}, {"c": 2}])
        self.assertEqual(WatchStreamParser().feed(stream), got)

    def test_incomplete_waits(self):
        parser = WatchStreamParser()
        self.assertEqual(parser.feed(b'{"result": {"hea'), [])
        self.assertEqual(parser.feed(b'der": {}}}\n'), [{"result": {"header": {}}}])

    def test_garbage(self):
        self.assertRaises(EtcdError, WatchStreamParser().feed, b"<html>502</html>\n")
        self.assertRaises(EtcdError, WatchStreamParser().feed, b'{"a": \xff}\n')

    def test_too_long(self):
        parser = WatchStreamParser(max_message=10)
        self.assertRaises(EtcdError, parser.feed, b'{"aaaaaaaaaaaaaaaa')


class ReadWatchMessageTests(SynchronousTestCase):
    def test_events(self):
        """
        The gateway leaves out C{type} for PUT (the enum's zero) and the
        value for DELETE; int64s come as strings.
        """
        msg = read_watch_message({"result": {"header": {"revision": "7"}, "events": [
            {"kv": {"key": b64("/p/a"), "value": b64("x"), "mod_revision": "6"}},
            {"type": "DELETE", "kv": {"key": b64("/p/b"), "mod_revision": "7"}},
        ]}})
        self.assertEqual(msg.revision, 7)
        self.assertEqual([(e.kind, e.key, e.value, e.revision) for e in msg.events],
                         [("PUT", "/p/a", b"x", 6), ("DELETE", "/p/b", b"", 7)])

    def test_created_and_compacted(self):
        self.assertTrue(read_watch_message({"result": {"header": {"revision": "3"}, "created": True}}).created)
        msg = read_watch_message({"result": {"header": {}, "canceled": True, "compact_revision": "3"}})
        self.assertEqual((msg.canceled, msg.compact_revision), (True, 3))

    def test_errors(self):
        e = self.assertRaises(EtcdError, read_watch_message, {"error": {"message": "etcdserver: no leader"}})
        self.assertIn("no leader", str(e))
        self.assertRaises(EtcdError, read_watch_message, [])
        self.assertRaises(EtcdError, read_watch_message, {"result": {"events": [{"kv": {"key": "!!"}}]}})

    def test_prefix_range_end(self):
        self.assertEqual(prefix_range_end(b"/txmesh/services/"), b"/txmesh/services0")
        self.assertEqual(prefix_range_end(b"a\xff\xff"), b"b")
        self.assertEqual(prefix_range_end(b"\xff"), b"\0")


class ServiceTableTests(SynchronousTestCase):
    def test_bad_value_keeps_previous(self):
        table = ServiceTable()
        self.assertIsNone(table.put("/p/a", service("a", 1).encode()))
        reason = table.put("/p/a", b"{host: a, ports: [{number: 99999}]}")
        self.assertIn("etcd key /p/a: ports[0].number", reason)
        self.assertEqual(table.entries["/p/a"].endpoints, (Endpoint(host="127.0.0.1", port=1),))
        self.assertIn("/p/a", table.errors)
        self.assertIn("not valid YAML", table.put("/p/b", b"{[:"))
        self.assertNotIn("/p/b", table.entries)
        table.delete("/p/b")
        self.assertEqual(list(table.errors), ["/p/a"])

    def test_reset(self):
        table = ServiceTable()
        table.put("/p/a", service("a", 1).encode())
        table.put("/p/gone", service("gone", 1).encode())
        errors = table.reset([("/p/a", b"nonsense: [")])
        self.assertEqual(len(errors), 1)
        self.assertEqual(list(table.entries), ["/p/a"])

    def test_yaml_and_conflicts(self):
        table = ServiceTable()
        table.put("/p/b", b"host: a\nports: [{name: grpc, number: 9090, protocol: GRPC}]\n")
        table.put("/p/a", service("a", 1).encode())
        view, conflicts = table.view()
        self.assertEqual(view["a"].endpoints, (Endpoint(host="127.0.0.1", port=1),))
        self.assertEqual(conflicts, ["etcd key /p/b: host a is also registered under /p/a"])


class FromConfigTests(SynchronousTestCase):
    def build(self, body):
        return from_config("mesh.yaml", "registries[1]", body, Clock())

    def test_valid(self):
        reg = self.build({"type": "etcd", "endpoints": ["http://127.0.0.1:2379/", "https://etcd:2379"],
                          "prefix": "/mesh/"})
        self.assertTrue(verifyObject(IRegistry, reg))
        self.assertEqual(reg.endpoints, ["http://127.0.0.1:2379", "https://etcd:2379"])
        self.assertEqual(reg.prefix, "/mesh/")
        self.assertEqual(self.build({"endpoints": ["http://e:2379"]}).prefix, "/txmesh/services/")

    def test_errors(self):
        cases = [
            ({}, "registries[1].endpoints", "is required"),
            ({"endpoints": []}, "registries[1].endpoints", "non-empty list"),
            ({"endpoints": "http://e:2379", "prefix": ""}, "registries[1].prefix", "non-empty string"),
            ({"endpoints": ["e:2379"]}, "registries[1].endpoints[0]", "http://"),
            ({"endpoints": ["http://e:2379/v3"]}, "registries[1].endpoints[0]", "has a path"),
            ({"endpoints": ["http://e:99999"]}, "registries[1].endpoints[0]", "not a URL"),
            ({"endpoints": ["http://e:2379"], "timeout": 3}, "registries[1].timeout", "unknown field"),
        ]
        for body, field, reason in cases:
            e = self.assertRaises(ConfigError, self.build, body)
            self.assertEqual((e.source, e.field), ("mesh.yaml", field), body)
            self.assertIn(reason, e.reason)

    def password_dir(self) -> str:
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "etcd"))
        for name, data in (("password", b"s3cret pass\n"), ("empty", b"\n"), ("latin1", b"caf\xe9")):
            with open(os.path.join(directory, "etcd", name), "wb") as f:
                f.write(data)
        return directory

    def test_credentials(self):
        """
        C{username} and C{password_file} (relative to CONFIG_DIR) make the
        registry authenticate; the file is read again for each
        authentication, and its final line break is not part of the password.
        """
        directory = self.password_dir()
        reg = from_config("mesh.yaml", "registries[1]", {"endpoints": "http://e:2379", "username": "txmesh",
                                                         "password_file": "etcd/password"}, Clock(), directory)
        credentials = reg._credentials
        self.assertEqual(credentials, Credentials("txmesh", os.path.join(directory, "etcd", "password")))
        self.assertEqual(credentials.request(), {"name": "txmesh", "password": "s3cret pass"})
        with open(credentials.password_file, "w") as f:
            f.write("rotated")
        self.assertEqual(credentials.request()["password"], "rotated")
        self.assertIsNone(self.build({"endpoints": "http://e:2379"})._credentials)

    def test_credentials_errors(self):
        directory = self.password_dir()
        ok = {"endpoints": "http://e:2379"}
        cases = [
            ({"username": "txmesh"}, "registries[1].password_file", "is required with username"),
            ({"password_file": "etcd/password"}, "registries[1].username", "is required with password_file"),
            ({"username": 7, "password_file": "etcd/password"}, "registries[1].username",
             "expected a non-empty string, got a number"),
            ({"username": "", "password_file": "etcd/password"}, "registries[1].username", "non-empty string"),
            ({"username": "txmesh", "password_file": ["etcd/password"]}, "registries[1].password_file",
             "expected a non-empty string, got a list"),
            ({"username": "txmesh", "password_file": "etcd/nope"}, "registries[1].password_file",
             f"cannot read {os.path.join(directory, 'etcd', 'nope')}: No such file or directory"),
            ({"username": "txmesh", "password_file": "etcd"}, "registries[1].password_file",
             f"cannot read {os.path.join(directory, 'etcd')}: Is a directory"),
            ({"username": "txmesh", "password_file": "etcd/empty"}, "registries[1].password_file",
             "holds no password (it is empty)"),
            ({"username": "txmesh", "password_file": "etcd/latin1"}, "registries[1].password_file",
             "is not UTF-8 text"),
            ({"username": "txmesh", "password": "s3cret"}, "registries[1].password", "unknown field"),
        ]
        for body, field, reason in cases:
            e = self.assertRaises(ConfigError, from_config, "mesh.yaml", "registries[1]", {**ok, **body}, Clock(),
                                  directory)
            self.assertEqual((e.source, e.field), ("mesh.yaml", field), body)
            self.assertIn(reason, e.reason)
            self.assertNotIn("s3cret", str(e))


# --- the registry on a fake client ------------------------------------------


class FakeTransport:
    def __init__(self):
        self.closed = False

    def loseConnection(self):
        self.closed = True


class FakeResponse:
    def __init__(self, code: int, body: bytes = b""):
        self.code = code
        self._body = body
        self.protocol: Any = None

    def content(self):
        return defer.succeed(self._body)

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(FakeTransport())


class FakeHTTP:
    """
    Records each C{post}; the test answers them.
    """

    def __init__(self):
        self.requests: list[tuple[str, dict, defer.Deferred]] = []
        self.headers: list[dict | None] = []

    def post(self, url, json=None, headers=None, **kw):
        d: defer.Deferred = defer.Deferred()
        self.requests.append((url, json, d))
        self.headers.append(headers)
        return d

    def answer(self, response):
        url, body, d = self.requests[-1]
        d.callback(response)
        return url, body


def range_body(revision: int, **kvs: str) -> bytes:
    return json.dumps({"header": {"revision": str(revision)}, "kvs": [
        {"key": b64(PREFIX + k), "value": b64(v)} for k, v in kvs.items()]}).encode()


class FakeClientRegistryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.http = FakeHTTP()
        self.reg = EtcdRegistry(["http://a:2379", "http://b:2379"], self.clock, http=self.http,
                                min_backoff=1, max_backoff=4)
        self.reg.start()

    def test_range_watch_backoff_compaction(self):
        url, body = self.http.answer(FakeResponse(200, range_body(5, a=service("a", 1))))
        self.assertEqual(url, "http://a:2379/v3/kv/range")
        self.assertEqual(body, {"key": b64(PREFIX), "range_end": b64("/txmesh/services0")})
        self.assertEqual(list(self.reg.services()), ["a"])
        watch = FakeResponse(200)
        url, body = self.http.answer(watch)
        self.assertEqual((url, body["create_request"]["start_revision"]), ("http://a:2379/v3/watch", "6"))
        watch.protocol.dataReceived(b'{"result": {"header": {"revision": "5"}, "created": true}}\n'
                                    + put_line(PREFIX + "b", service("b", 2), 8)[:-20])
        watch.protocol.dataReceived(put_line(PREFIX + "b", service("b", 2), 8)[-20:])
        self.assertEqual(sorted(self.reg.services()), ["a", "b"])
        self.assertTrue(self.reg.status()["ok"])

        # The stream ends: retry after 1 s on the next endpoint, from 8 + 1.
        watch.protocol.connectionLost(None)
        status = self.reg.status()
        self.assertEqual((status["ok"], status["phase"], status["services"]), (False, "waiting", 2))
        self.assertIn("http://a:2379: watch stream ended", status["error"])
        count = len(self.http.requests)
        self.clock.advance(1)
        url, body = self.http.requests[-1][:2]
        self.assertEqual(len(self.http.requests), count + 1)
        self.assertEqual((url, body["create_request"]["start_revision"]), ("http://b:2379/v3/watch", "9"))
        self.http.answer(FakeResponse(503, b'{"message": "no leader"}'))
        self.assertIn("HTTP 503: 'no leader'", self.reg.status()["error"])
        self.clock.advance(1.9)
        self.assertEqual(len(self.http.requests), count + 1)  # now waits 2 s
        self.clock.advance(0.1)
        self.assertEqual(len(self.http.requests), count + 2)

        # History compacted: read again; "b" was deleted meanwhile.
        watch = FakeResponse(200)
        self.http.answer(watch)
        watch.protocol.dataReceived(b'{"result": {"header": {"revision": "20"}, "created": true}}\n'
                                    b'{"result": {"header": {}, "canceled": true, "compact_revision": "15"}}\n')
        self.assertTrue(watch.protocol.transport.closed)
        url, _ = self.http.answer(FakeResponse(200, range_body(20, a=service("a", 1, 3))))
        self.assertEqual(url, "http://a:2379/v3/kv/range")
        self.assertEqual(list(self.reg.services()), ["a"])
        self.assertEqual(len(self.reg.services()["a"].endpoints), 2)
        self.assertEqual(self.http.requests[-1][1]["create_request"]["start_revision"], "21")
        self.assertEqual(self.reg.revision, 20)

    def test_stop(self):
        self.http.answer(FakeResponse(200, range_body(5)))
        watch = FakeResponse(200)
        self.http.answer(watch)
        d = self.reg.stop()
        self.assertTrue(watch.protocol.transport.closed)
        watch.protocol.connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(self.reg.status()["phase"], "stopped")
        self.assertFalse(self.clock.getDelayedCalls())


UNAUTHENTICATED = (b'{"result": {"header": {"revision": "5"}, "watch_id": "-1", "created": true, "canceled": true,'
                   b' "cancel_reason": "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"}}\n')
"""What etcd 3.4's gateway streams for a watch made with an expired or unknown token."""
INVALID_TOKEN = (b'{"error": "etcdserver: invalid auth token", "message": "etcdserver: invalid auth token",'
                 b' "code": 16}')
"""What it answers (HTTP 401) to a range made with one."""
AUTH_FAILED = (b'{"error": "etcdserver: authentication failed, invalid user ID or password",'
               b' "message": "etcdserver: authentication failed, invalid user ID or password", "code": 3}')
"""What it answers (HTTP 400) to a wrong password or an unknown user."""


class FakeClientAuthTests(SynchronousTestCase):
    """
    The registry with credentials, on a fake client answering as etcd 3.4
    does.
    """

    def setUp(self):
        self.clock = Clock()
        self.http = FakeHTTP()
        self.password_file = self.mktemp()
        with open(self.password_file, "w") as f:
            f.write("s3cret\n")
        self.logged: list[str] = []

        def observe(event):
            self.logged.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.reg = EtcdRegistry(["http://a:2379", "http://b:2379"], self.clock, http=self.http,
                                min_backoff=1, max_backoff=4, credentials=Credentials("txmesh", self.password_file))
        self.reg.start()

    def authenticate(self, token: str) -> tuple[str, dict]:
        self.assertEqual(self.reg.status()["phase"], "authenticating")
        self.assertIsNone(self.http.headers[-1])
        return self.http.answer(FakeResponse(200, json.dumps({"header": {}, "token": token}).encode()))

    def watching(self, revision: int = 5) -> FakeResponse:
        watch = FakeResponse(200)
        url, _ = self.http.answer(watch)
        self.assertTrue(url.endswith("/v3/watch"))
        watch.protocol.dataReceived(b'{"result": {"header": {"revision": "%d"}, "created": true}}\n' % revision)
        return watch

    def assertNoSecrets(self):
        text = json.dumps(self.reg.status()) + "\n".join(self.logged)
        for secret in ("s3cret", "rotated", "tok.1", "tok.2", "tok.3"):
            self.assertNotIn(secret, text)

    def test_token_on_every_request(self):
        url, body = self.authenticate("tok.1")
        self.assertEqual((url, body), ("http://a:2379/v3/auth/authenticate", {"name": "txmesh", "password": "s3cret"}))
        self.assertEqual(self.http.requests[-1][0], "http://a:2379/v3/kv/range")
        self.assertEqual(self.http.headers[-1], {"Authorization": ["tok.1"]})
        self.http.answer(FakeResponse(200, range_body(5, a=service("a", 1))))
        self.watching()
        self.assertEqual(self.http.headers[-1], {"Authorization": ["tok.1"]})
        self.assertEqual(list(self.reg.services()), ["a"])
        self.assertTrue(self.reg.status()["ok"])
        self.assertEqual(len(self.http.requests), 3)
        self.assertNoSecrets()

    def test_rejected_token_authenticates_again_once(self):
        """
        A token etcd rejects (expired, or etcd restarted) is replaced at
        once, with the password file read again and no error shown; a new
        token rejected too is an error, retried after the backoff.
        """
        self.authenticate("tok.1")
        self.http.answer(FakeResponse(200, range_body(5, a=service("a", 1))))
        watch = self.watching()
        watch.protocol.connectionLost(None)
        self.clock.advance(1)
        self.assertEqual(self.http.headers[-1], {"Authorization": ["tok.1"]})
        with open(self.password_file, "w") as f:
            f.write("rotated")
        watch = FakeResponse(200)
        self.http.answer(watch)
        watch.protocol.dataReceived(UNAUTHENTICATED)
        self.assertTrue(watch.protocol.transport.closed)
        url, body = self.authenticate("tok.2")
        self.assertEqual((url, body["password"]), ("http://b:2379/v3/auth/authenticate", "rotated"))
        url, body = self.http.requests[-1][:2]
        self.assertEqual((url, body["create_request"]["start_revision"]), ("http://b:2379/v3/watch", "6"))
        self.assertEqual(self.http.headers[-1], {"Authorization": ["tok.2"]})
        self.watching()
        self.assertTrue(self.reg.status()["ok"])

        # A range answered 401 with a token just made: no second try at once.
        self.reg.revision = None
        self.reg._token_fresh = True
        self.reg._connect()
        count = len(self.http.requests)
        self.http.answer(FakeResponse(401, INVALID_TOKEN))
        status = self.reg.status()
        self.assertEqual((status["ok"], status["phase"]), (False, "waiting"))
        self.assertIn("range: HTTP 401: 'etcdserver: invalid auth token'", status["error"])
        self.assertEqual(list(self.reg.services()), ["a"])
        self.assertEqual(len(self.http.requests), count)
        self.clock.advance(1)
        self.authenticate("tok.3")
        self.assertNoSecrets()

    def test_wrong_password(self):
        """
        A wrong password is reported, the view kept, and retried after the
        backoff with the file read again.
        """
        self.authenticate("tok.1")
        self.http.answer(FakeResponse(200, range_body(5, a=service("a", 1))))
        watch = self.watching()
        watch.protocol.connectionLost(None)
        self.clock.advance(1)
        watch = FakeResponse(200)
        self.http.answer(watch)
        with open(self.password_file, "w") as f:
            f.write("wrong")
        watch.protocol.dataReceived(UNAUTHENTICATED)
        count = len(self.http.requests)
        self.http.answer(FakeResponse(400, AUTH_FAILED))
        status = self.reg.status()
        self.assertEqual((status["ok"], status["phase"], list(self.reg.services())), (False, "waiting", ["a"]))
        self.assertIn("http://b:2379: authenticate as txmesh: HTTP 400: "
                      "'etcdserver: authentication failed, invalid user ID or password'", status["error"])
        for wait in (2, 4, 4):
            self.clock.advance(wait - 0.01)
            self.assertEqual(len(self.http.requests), count)
            self.clock.advance(0.01)
            self.assertEqual(len(self.http.requests), count + 1)
            count += 1
            self.http.answer(FakeResponse(400, AUTH_FAILED))
        with open(self.password_file, "w") as f:
            f.write("rotated\n")
        self.clock.advance(4)
        url, body = self.authenticate("tok.2")
        self.assertEqual(body["password"], "rotated")
        self.watching()
        self.assertTrue(self.reg.status()["ok"])
        self.assertNotIn("wrong", "\n".join(self.logged))
        self.assertNoSecrets()

    def test_password_file_gone(self):
        """
        A password file that cannot be read when authenticating again is
        reported, and retried after the backoff.
        """
        self.http.answer(FakeResponse(400, AUTH_FAILED))
        os.remove(self.password_file)
        self.clock.advance(1)
        self.assertEqual(len(self.http.requests), 1)
        status = self.reg.status()
        self.assertEqual(status["phase"], "waiting")
        self.assertIn(f"http://b:2379: password_file: cannot read {self.password_file}: No such file",
                      status["error"])
        with open(self.password_file, "w") as f:
            f.write("s3cret")
        self.clock.advance(2)
        self.authenticate("tok.1")

    def test_auth_not_enabled(self):
        """
        As etcd's own client does, the registry goes on without a token when
        etcd has authentication off, and asks again after an error.
        """
        self.http.answer(FakeResponse(412, b'{"error": "etcdserver: authentication is not enabled", "code": 9}'))
        self.assertEqual(self.http.requests[-1][0], "http://a:2379/v3/kv/range")
        self.assertIsNone(self.http.headers[-1])
        self.http.answer(FakeResponse(400, b'{"message": "etcdserver: user name is empty", "code": 3}'))
        self.clock.advance(1)
        self.authenticate("tok.1")
        self.assertEqual(self.http.headers[-1], {"Authorization": ["tok.1"]})

    def test_token_rejected(self):
        self.assertTrue(token_rejected("rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"))
        self.assertTrue(token_rejected("etcdserver: invalid auth token"))
        self.assertFalse(token_rejected("rpc error: code = PermissionDenied desc = etcdserver: permission denied"))


# --- a real etcd -------------------------------------------------------------


class Etcd:
    """
    A real single-member etcd on loopback ports, in a temporary data dir.
    """

    def __init__(self, testcase: Any, tls: bool = False, args: tuple[str, ...] = ()):
        """
        @param tls: serve clients over https only, asking for a client
            certificate signed by the test CA (C{--client-cert-auth}); the
            files are in C{self.pki} (see L{write_pki}).
        @param args: more command-line flags for etcd.
        """
        if ETCD is None:
            raise SkipTest("etcd is not installed (apt-get install etcd-server etcd-client)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-etcd-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        testcase.addCleanup(self.kill)
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.tls_args: list[str] = [*args]
        # With authentication on (see enable_auth), the test's own requests
        # are made as root.
        self.root_password: str | None = None
        self.token: str | None = None
        if tls:
            self.pki = write_pki(os.path.join(self.dir, "pki"))
            self.tls_args = ["--cert-file", self.pki["server"], "--key-file", self.pki["server-key"],
                             "--trusted-ca-file", self.pki["ca"], "--client-cert-auth"]
            with open(self.pki["ca"], "rb") as ca, open(self.pki["client"], "rb") as c, \
                    open(self.pki["client-key"], "rb") as k:
                policy = TLSPolicy.from_pem(ca.read(), c.read(), k.read())
            self.http = HTTPClient(Agent(reactor, contextFactory=policy))
        else:
            self.http = HTTPClient(Agent(reactor))

    @defer.inlineCallbacks
    def start(self, timeout: float = 10.0) -> Any:
        """
        Start etcd and wait until it answers a read.
        """
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(os.path.join(self.dir, "etcd.log"), "ab") as log:
            self.process = subprocess.Popen(
                [ETCD, "--name", "t", "--data-dir", os.path.join(self.dir, "data"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"t={peer}", "--heartbeat-interval", "20", "--election-timeout", "200", *self.tls_args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = reactor.seconds() + timeout
        while True:
            if self.process.poll() is not None:
                with open(os.path.join(self.dir, "etcd.log"), "rb") as f:
                    raise RuntimeError("etcd exited: " + f.read()[-2000:].decode("utf-8", "replace"))
            try:
                if self.root_password is not None:
                    # A restart forgets the simple tokens.
                    yield self.login(timeout=1)
                yield self.call("/v3/kv/range", {"key": b64("/")}, timeout=1)
                return
            except Exception:
                if reactor.seconds() > deadline:
                    raise
            yield sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    @defer.inlineCallbacks
    def login(self, timeout: float = 5) -> Any:
        self.token = None
        answer = yield self.call("/v3/auth/authenticate", {"name": "root", "password": self.root_password},
                                 timeout=timeout)
        self.token = answer["token"]

    @defer.inlineCallbacks
    def enable_auth(self, root_password: str) -> Any:
        """
        Add the user root, give it the role root, and turn authentication
        on; the test's own requests are then made as root.
        """
        yield self.call("/v3/auth/user/add", {"name": "root", "password": root_password})
        yield self.call("/v3/auth/role/add", {"name": "root"})
        yield self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        yield self.call("/v3/auth/enable", {})
        self.root_password = root_password
        yield self.login()

    @defer.inlineCallbacks
    def add_reader(self, user: str, password: str, prefix: str = PREFIX) -> Any:
        """
        Add a user with a role that may only read the keys under C{prefix}.
        """
        role = f"{user}-read"
        yield self.call("/v3/auth/role/add", {"name": role})
        yield self.call("/v3/auth/role/grant", {"name": role, "perm": {
            "permType": "READ", "key": b64(prefix), "range_end": b64(prefix_range_end(prefix.encode()))}})
        yield self.call("/v3/auth/user/add", {"name": user, "password": password})
        yield self.call("/v3/auth/user/grant", {"user": user, "role": role})

    @defer.inlineCallbacks
    def call(self, path: str, body: dict, timeout: float = 5) -> Any:
        headers = {"Authorization": [self.token]} if self.token else None
        response = yield self.http.post(self.url + path, json=body, timeout=timeout, headers=headers)
        content = yield response.content()
        if response.code == 401 and self.token:
            # Root's token expired (the tests' etcd keeps them 2 s).
            yield self.login(timeout=timeout)
            response = yield self.http.post(self.url + path, json=body, timeout=timeout,
                                            headers={"Authorization": [self.token]})
            content = yield response.content()
        if response.code != 200:
            raise RuntimeError(f"etcd {path}: {response.code} {content!r}")
        return json.loads(content)

    @defer.inlineCallbacks
    def put(self, key: str, value: str) -> Any:
        """
        @return: the revision of the put.
        """
        answer = yield self.call("/v3/kv/put", {"key": b64(PREFIX + key), "value": b64(value)})
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> defer.Deferred:
        return self.call("/v3/kv/deleterange", {"key": b64(PREFIX + key)})

    @defer.inlineCallbacks
    def compact(self) -> Any:
        answer = yield self.call("/v3/kv/range", {"key": b64("/")})
        revision = answer["header"]["revision"]
        yield self.call("/v3/kv/compaction", {"revision": revision, "physical": True})
        return int(revision)


def write_pki(directory: str) -> dict[str, str]:
    """
    Make a CA, a server certificate for 127.0.0.1 and a client certificate
    signed by it, and a second CA that signed neither; write them as PEM
    files in C{directory}.

    @return: the paths, by name: C{ca}, C{server}, C{server-key}, C{client},
        C{client-key}, C{other-ca}.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn, key, issuer_name, issuer_key, ca=False, san=None, usage=None):
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test etcd CA", ca_key, name("test etcd CA"), ca_key, ca=True)
    other = cert("another CA", other_key, name("another CA"), other_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = cert("etcd", server_key, ca.subject, ca_key,
                  san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
                  usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client = cert("pilot", client_key, ca.subject, ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "other-ca": other.public_bytes(serialization.Encoding.PEM),
        "server": server.public_bytes(serialization.Encoding.PEM),
        "server-key": key_pem(server_key),
        "client": client.public_bytes(serialization.Encoding.PEM),
        "client-key": key_pem(client_key),
    }
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for label, data in files.items():
        paths[label] = os.path.join(directory, label + ".pem")
        with open(paths[label], "wb") as f:
            f.write(data)
    return paths


class _GateServer(portforward.ProxyServer):
    def connectionMade(self):
        if not self.factory.open:
            self.transport.abortConnection()
            return
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.live.discard(self)
        super().connectionLost(reason)


class Gate(portforward.ProxyFactory):
    """
    A TCP forwarder that can cut every connection through it and refuse
    new ones: a network partition between the registry and etcd.
    """

    protocol = _GateServer
    noisy = False

    def __init__(self, testcase: Any, port: int):
        super().__init__("127.0.0.1", port)
        self.open = True
        self.live: set[_GateServer] = set()
        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.listening.getHost().port}"
        testcase.addCleanup(self.close)

    def cut(self) -> None:
        self.open = False
        for server in list(self.live):
            server.transport.abortConnection()

    def heal(self) -> None:
        self.open = True

    @defer.inlineCallbacks
    def close(self) -> Any:
        self.cut()
        yield self.listening.stopListening()
        yield sleep(0.05)


class CountingHTTP:
    """
    A treq client that counts the requests per path.
    """

    def __init__(self):
        self.client = HTTPClient(Agent(reactor))
        self.paths: list[str] = []

    def post(self, url, **kw):
        self.paths.append(url.split("/", 3)[-1])
        return self.client.post(url, **kw)


class RealEtcdTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.etcd = Etcd(self)
        yield self.etcd.start()
        self.http = CountingHTTP()
        self.changes: list[dict] = []

    def registry(self, url: str | None = None) -> EtcdRegistry:
        reg = EtcdRegistry([url or self.etcd.url], reactor, http=self.http,
                           min_backoff=0.05, max_backoff=0.3, request_timeout=2)
        reg.subscribe(lambda r: self.changes.append(dict(r.services())))
        self.addCleanup(reg.stop)
        reg.start()
        return reg

    @defer.inlineCallbacks
    def until(self, reg: EtcdRegistry, cond: Any, what: str, timeout: float = 5.0) -> Any:
        """
        Wait (bounded) until C{cond(reg)} is true.
        """
        deadline = reactor.seconds() + timeout
        while not cond(reg):
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}; status {reg.status()}, view {sorted(reg.services())}")
            yield sleep(0.02)

    @defer.inlineCallbacks
    def test_initial_range(self):
        """
        Keys put before the registry starts are read at once, JSON or YAML.
        """
        yield self.etcd.put("reviews", service("reviews.default.svc", 19083, 19084))
        yaml_value = ("host: ratings.default.svc\nports: [{name: grpc, number: 9090, protocol: GRPC}]\n"
                      "endpoints: [{address: 10.0.0.9, port: 9090, labels: {version: v1}, weight: 3}]\n")
        if ETCDCTL:
            out, err, code = yield getProcessOutputAndValue(
                ETCDCTL, ["--endpoints", self.etcd.url, "put", PREFIX + "ratings", yaml_value],
                env={**os.environ, "ETCDCTL_API": "3"})
            self.assertEqual(code, 0, err)
        else:
            yield self.etcd.put("ratings", yaml_value)
        for outside in ("/txmesh/services", "/txmesh/services0", "/txmesh/servicesX"):
            yield self.etcd.call("/v3/kv/put", {"key": b64(outside), "value": b64(service("nope", 1))})
        reg = self.registry()
        yield self.until(reg, lambda r: r.status()["phase"] == "watching" and len(r.services()) >= 2, "the range")
        view = reg.services()
        self.assertIn("reviews.default.svc", view)
        ratings = view["ratings.default.svc"]
        self.assertEqual(ratings.ports, (ServicePort("grpc", 9090, "GRPC"),))
        self.assertEqual(ratings.endpoints,
                         (Endpoint(host="10.0.0.9", port=9090, labels=(("version", "v1"),), weight=3),))
        status = reg.status()
        self.assertTrue(status["ok"], status)
        self.assertEqual(self.http.paths, ["v3/kv/range", "v3/watch"])

    @defer.inlineCallbacks
    def test_put_delete_through_watch(self):
        reg = self.registry()
        yield self.until(reg, lambda r: r.status()["phase"] == "watching" and r.status()["last_update"], "start")
        self.assertEqual(dict(reg.services()), {})
        yield self.etcd.put("a", service("a.svc", 1))
        yield self.until(reg, lambda r: "a.svc" in r.services(), "a put")
        yield self.etcd.put("a", service("a.svc", 1, 2))
        yield self.until(reg, lambda r: len(r.services()["a.svc"].endpoints) == 2, "a updated")
        yield self.etcd.delete("a")
        yield self.until(reg, lambda r: not r.services(), "a deleted")
        self.assertEqual([sorted(c) for c in self.changes], [["a.svc"], ["a.svc"], []])
        self.assertEqual(self.http.paths, ["v3/kv/range", "v3/watch"])

    @defer.inlineCallbacks
    def test_bad_value(self):
        """
        A value that does not parse keeps the key's last service and the
        other keys, and is named in status() until fixed.
        """
        yield self.etcd.put("a", service("a.svc", 1))
        yield self.etcd.put("b", service("b.svc", 2))
        reg = self.registry()
        yield self.until(reg, lambda r: len(r.services()) == 2, "start")
        yield self.etcd.put("b", "{host: b.svc, ports: [{number: 0}]}")
        yield self.etcd.put("c", "this: [is not yaml")
        yield self.etcd.put("d", service("d.svc", 4))
        yield self.until(reg, lambda r: "d.svc" in r.services(), "d put")
        self.assertEqual(sorted(reg.services()), ["a.svc", "b.svc", "d.svc"])
        self.assertEqual(reg.services()["b.svc"].endpoints, (Endpoint(host="127.0.0.1", port=2),))
        status = reg.status()
        self.assertFalse(status["ok"])
        self.assertIn(f"etcd key {PREFIX}b: ports[0].number", status["error"])
        self.assertIn(f"etcd key {PREFIX}c: not valid YAML", status["error"])
        yield self.etcd.put("b", service("b.svc", 5))
        yield self.etcd.delete("c")
        yield self.until(reg, lambda r: r.status()["ok"], "the errors to clear")
        self.assertEqual(reg.services()["b.svc"].endpoints, (Endpoint(host="127.0.0.1", port=5),))

    @defer.inlineCallbacks
    def test_etcd_killed_and_restarted(self):
        yield self.etcd.put("a", service("a.svc", 1))
        reg = self.registry()
        yield self.until(reg, lambda r: "a.svc" in r.services() and r.status()["phase"] == "watching", "start")
        self.etcd.kill()
        yield self.until(reg, lambda r: not r.status()["ok"], "the error")
        yield sleep(0.5)  # several retries fail meanwhile
        self.assertEqual(list(reg.services()), ["a.svc"])
        self.assertIn(self.etcd.url, reg.status()["error"])
        yield self.etcd.start()
        yield self.etcd.put("b", service("b.svc", 2))
        yield self.until(reg, lambda r: "b.svc" in r.services() and r.status()["ok"], "b after the restart")
        self.assertEqual(sorted(reg.services()), ["a.svc", "b.svc"])
        self.assertEqual(self.http.paths.count("v3/kv/range"), 1)

    @defer.inlineCallbacks
    def test_changes_while_cut_off(self):
        """
        Changes made while the registry could not reach etcd arrive as
        events when it resumes the watch, without reading the prefix again.
        """
        gate = Gate(self, self.etcd.port)
        yield self.etcd.put("a", service("a.svc", 1))
        reg = self.registry(gate.url)
        yield self.until(reg, lambda r: "a.svc" in r.services() and r.status()["phase"] == "watching", "start")
        gate.cut()
        yield self.until(reg, lambda r: not r.status()["ok"], "the error")
        yield self.etcd.delete("a")
        yield self.etcd.put("b", service("b.svc", 2))
        yield sleep(0.2)
        self.assertEqual(list(reg.services()), ["a.svc"])
        gate.heal()
        yield self.until(reg, lambda r: list(r.services()) == ["b.svc"] and r.status()["ok"], "the changes")
        self.assertEqual(self.http.paths.count("v3/kv/range"), 1)

    @defer.inlineCallbacks
    def test_compaction_reads_again(self):
        """
        When the history since the last revision seen was compacted away,
        the registry reads the prefix again.
        """
        gate = Gate(self, self.etcd.port)
        yield self.etcd.put("a", service("a.svc", 1))
        yield self.etcd.put("b", service("b.svc", 2))
        reg = self.registry(gate.url)
        yield self.until(reg, lambda r: len(r.services()) == 2 and r.status()["phase"] == "watching", "start")
        gate.cut()
        yield self.until(reg, lambda r: not r.status()["ok"], "the error")
        yield self.etcd.delete("a")
        yield self.etcd.put("c", service("c.svc", 3))
        compacted = yield self.etcd.compact()
        gate.heal()
        yield self.until(reg, lambda r: sorted(r.services()) == ["b.svc", "c.svc"] and r.status()["ok"],
                         "the second read")
        self.assertEqual(self.http.paths.count("v3/kv/range"), 2)
        self.assertGreaterEqual(reg.revision, compacted)


class RealEtcdTLSTests(TestCase):
    """
    The registry against a real etcd that serves https only and requires a
    client certificate signed by its CA.
    """

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.etcd = Etcd(self, tls=True)
        yield self.etcd.start()
        self.pki = self.etcd.pki

    def registry(self, **files: str) -> EtcdRegistry:
        body = {"type": "etcd", "endpoints": [self.etcd.url], "prefix": PREFIX}
        body.update({key: os.path.basename(self.pki[label]) for key, label in files.items()})
        reg = from_config("mesh.yaml", "registries[0]", body, reactor, os.path.dirname(self.pki["ca"]))
        reg._min_backoff, reg._max_backoff, reg._timeout = 0.05, 0.3, 2
        self.addCleanup(reg.stop)
        reg.start()
        return reg

    until = RealEtcdTests.until

    @defer.inlineCallbacks
    def test_client_certificate(self):
        """
        With the CA and a client certificate the registry reads the prefix
        and follows changes through the watch.
        """
        yield self.etcd.put("reviews", service("reviews.default.svc", 19083))
        reg = self.registry(ca_file="ca", cert_file="client", key_file="client-key")
        yield self.until(reg, lambda r: r.status()["phase"] == "watching" and "reviews.default.svc" in r.services(),
                         "the range over TLS")
        self.assertTrue(reg.status()["ok"], reg.status())
        yield self.etcd.put("ratings", service("ratings.default.svc", 19085))
        yield self.until(reg, lambda r: "ratings.default.svc" in r.services(), "a put through the TLS watch")
        yield self.etcd.delete("reviews")
        yield self.until(reg, lambda r: "reviews.default.svc" not in r.services(), "a delete through the watch")

    @defer.inlineCallbacks
    def test_no_client_certificate(self):
        """
        Without a client certificate etcd refuses the connection: the
        registry says so in its status and keeps retrying.
        """
        reg = self.registry(ca_file="ca")
        yield self.until(reg, lambda r: r.status()["error"], "the refusal")
        self.assertFalse(reg.status()["ok"])
        self.assertIn(self.etcd.url, reg.status()["error"])
        self.assertEqual(dict(reg.services()), {})

    @defer.inlineCallbacks
    def test_wrong_ca_keeps_last_view(self):
        """
        A registry that trusts another CA rejects etcd's certificate and
        reports it; a view it had stays until etcd can be read again.
        """
        yield self.etcd.put("reviews", service("reviews.default.svc", 19083))
        reg = self.registry(ca_file="ca", cert_file="client", key_file="client-key")
        yield self.until(reg, lambda r: "reviews.default.svc" in r.services(), "the first view")
        wrong = self.registry(ca_file="other-ca", cert_file="client", key_file="client-key")
        # The same registry, now trusting the wrong CA on its next connection.
        reg._http = wrong._http
        self.etcd.kill()
        yield self.until(reg, lambda r: r.status()["error"] and r.status()["phase"] == "waiting", "the lost watch")
        yield self.etcd.start()
        yield self.until(reg, lambda r: "certificate verify failed" in (r.status()["error"] or ""),
                         "the certificate rejected")
        self.assertFalse(wrong.status()["ok"])
        self.assertIn("certificate verify failed", wrong.status()["error"])
        self.assertEqual(wrong.services(), {})
        self.assertIn("reviews.default.svc", reg.services())


class RealEtcdAuthTests(TestCase):
    """
    The registry against a real etcd with authentication on and simple
    tokens that expire after 2 s unused (C{--auth-token-ttl 2}); the
    registry's user, C{txmesh}, may only read the prefix.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.etcd = Etcd(self, args=("--auth-token", "simple", "--auth-token-ttl", "2"))
        yield self.etcd.start()
        yield self.etcd.enable_auth("root-pw")
        yield self.etcd.add_reader("txmesh", "s3cret pw")
        self.dir = self.mktemp()
        os.makedirs(os.path.join(self.dir, "etcd"))
        self.set_password("s3cret pw\n")
        self.http = CountingHTTP()

    def set_password(self, password: str) -> None:
        with open(os.path.join(self.dir, "etcd", "password"), "w") as f:
            f.write(password)

    def registry(self, url: str | None = None, credentials: bool = True) -> EtcdRegistry:
        body = {"type": "etcd", "endpoints": [url or self.etcd.url], "prefix": PREFIX}
        if credentials:
            body.update(username="txmesh", password_file="etcd/password")
        reg = from_config("mesh.yaml", "registries[0]", body, reactor, self.dir)
        reg._http, reg._min_backoff, reg._max_backoff, reg._timeout = self.http, 0.05, 0.3, 2
        self.addCleanup(reg.stop)
        reg.start()
        return reg

    until = RealEtcdTests.until

    @defer.inlineCallbacks
    def test_password_reads_and_watches(self):
        """
        With the right password the registry authenticates once, reads the
        prefix and follows a put made after it started.
        """
        yield self.etcd.put("reviews", service("reviews.default.svc", 19083))
        reg = self.registry()
        yield self.until(reg, lambda r: r.status()["phase"] == "watching" and "reviews.default.svc" in r.services(),
                         "the range as txmesh")
        yield self.etcd.put("ratings", service("ratings.default.svc", 19085))
        yield self.until(reg, lambda r: "ratings.default.svc" in r.services(), "a put through the watch")
        self.assertTrue(reg.status()["ok"], reg.status())
        self.assertEqual(self.http.paths, ["v3/auth/authenticate", "v3/kv/range", "v3/watch"])

    @defer.inlineCallbacks
    def test_no_credentials(self):
        """
        Without credentials etcd refuses the read; the status says why.
        """
        reg = self.registry(credentials=False)
        yield self.until(reg, lambda r: r.status()["error"], "the refusal")
        status = reg.status()
        self.assertEqual((status["ok"], status["phase"]), (False, "waiting"))
        self.assertIn("range: HTTP 400: 'etcdserver: user name is empty' (etcd has authentication enabled: "
                      "set username and password_file)", status["error"])

    @defer.inlineCallbacks
    def test_wrong_password_then_fixed(self):
        """
        The user's password changes in etcd and etcd restarts (forgetting
        the registry's token): authenticating again with the old password
        fails, is reported and retried with the backoff while the last view
        stays; once the password file holds the new password the registry
        recovers, and a change made meanwhile arrives.
        """
        yield self.etcd.put("a", service("a.svc", 1))
        reg = self.registry()
        yield self.until(reg, lambda r: "a.svc" in r.services() and r.status()["phase"] == "watching", "start")
        yield self.etcd.call("/v3/auth/user/changepw", {"name": "txmesh", "password": "new pw"})
        self.etcd.kill()
        yield self.etcd.start()
        yield self.until(reg, lambda r: "authentication failed" in (r.status()["error"] or ""),
                         "the wrong password reported")
        self.assertIn(f"{self.etcd.url}: authenticate as txmesh: HTTP 400: "
                      "'etcdserver: authentication failed, invalid user ID or password'", reg.status()["error"])
        yield self.etcd.put("b", service("b.svc", 2))
        count = self.http.paths.count("v3/auth/authenticate")
        yield sleep(1)
        # The backoff (0.05 s doubling to 0.3 s) bounds the tries.
        self.assertLessEqual(self.http.paths.count("v3/auth/authenticate") - count, 5)
        self.assertEqual(list(reg.services()), ["a.svc"])
        self.assertFalse(reg.status()["ok"])
        self.set_password("new pw")
        yield self.until(reg, lambda r: sorted(r.services()) == ["a.svc", "b.svc"] and r.status()["ok"],
                         "the recovery")
        self.assertEqual(self.http.paths.count("v3/kv/range"), 1)

    @defer.inlineCallbacks
    def test_expired_token(self):
        """
        A watch outlives its token; after the stream is lost, the watch
        made again with the expired token is canceled by etcd, and the
        registry authenticates again at once and resumes it, without an
        error and without reading the prefix again.
        """
        gate = Gate(self, self.etcd.port)
        yield self.etcd.put("a", service("a.svc", 1))
        reg = self.registry(gate.url)
        yield self.until(reg, lambda r: "a.svc" in r.services() and r.status()["phase"] == "watching", "start")
        # etcd drops unused simple tokens once a second, so 2 s of TTL can
        # take up to 3 s; an event sent through the watch keeps it alive.
        yield sleep(3.5)
        yield self.etcd.put("b", service("b.svc", 2))
        yield self.until(reg, lambda r: "b.svc" in r.services(), "a put through the watch, the token expired")
        gate.cut()
        yield self.until(reg, lambda r: not r.status()["ok"], "the lost stream")
        yield self.etcd.put("c", service("c.svc", 3))
        yield sleep(3.5)
        gate.heal()
        yield self.until(reg, lambda r: "c.svc" in r.services() and r.status()["ok"], "the watch resumed")
        self.assertEqual(self.http.paths.count("v3/auth/authenticate"), 2)
        self.assertEqual(self.http.paths.count("v3/kv/range"), 1)
        self.assertEqual(self.http.paths[-3:], ["v3/watch", "v3/auth/authenticate", "v3/watch"])
