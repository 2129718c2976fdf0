"""
Tests for L{txmesh.policy.jwks}: a real JWKS server (C{twisted.web} on
127.0.0.1, port 0) fetched with treq; timers on a L{task.Clock}.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.test_jwt import default_jwks, ec_key, jwk, jwks, rsa_key
from txmesh.policy.jwks import RemoteJwks, StaticJwks
from txmesh.policy.jwt import JwksError


class JwksResource(Resource):
    """
    Serves C{body} with C{code}; or never answers when C{hang}.
    """

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.code = 200
        self.hang = False
        self.hits = 0
        self.pending: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.hits += 1
        if self.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return self.body


class RemoteJwksTests(TestCase):
    """
    L{RemoteJwks} against a real server.
    """

    def setUp(self) -> None:
        self.resource = JwksResource(json.dumps(default_jwks()).encode())
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(self._stop_port)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.clock = Clock()
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/jwks.json"
        self.source = RemoteJwks(
            self.url, self.clock, client=self.client,
            refresh_interval=600, fetch_timeout=5, retry_interval=5, min_refetch_interval=30,
        )
        self.addCleanup(self.source.stop)

    def _stop_port(self) -> Any:
        for request in self.resource.pending:
            if not request.finished and not request._disconnected:
                request.finish()
        if self.port is not None:
            return self.port.stopListening()
        return None

    def serve(self, *keys: dict[str, Any]) -> None:
        self.resource.body = json.dumps(jwks(*keys)).encode()

    @inlineCallbacks
    def test_first_fetch(self) -> Any:
        self.source.start()
        keys = yield self.source.wait_for_keys()
        self.assertEqual(keys.kids(), {"rsa-1", "ec-1"})
        self.assertIsNone(self.source.error)
        self.assertEqual(self.resource.hits, 1)

    @inlineCallbacks
    def test_cached(self) -> Any:
        yield self.source.wait_for_keys()
        again = self.source.wait_for_keys()
        self.assertTrue(again.called)
        yield again
        self.source.start()  # already running: no second fetch
        self.assertEqual(self.resource.hits, 1)

    @inlineCallbacks
    def test_refresh_on_interval(self) -> Any:
        self.source.start()
        yield self.source.settled()
        self.serve(jwk(rsa_key("next"), "rsa-2"))
        self.clock.advance(599)
        self.assertEqual(self.resource.hits, 1)
        self.clock.advance(1)
        keys = yield self.source.settled()
        self.assertEqual(self.resource.hits, 2)
        self.assertEqual(keys.kids(), {"rsa-2"})
        self.assertEqual(self.source.keys.kids(), {"rsa-2"})

    @inlineCallbacks
    def test_unknown_kid_refetch_rate_limited(self) -> Any:
        self.source.start()
        yield self.source.settled()
        self.serve(jwk(rsa_key("next"), "rsa-2"))
        # The last fetch was just now: too soon.
        self.assertIsNone(self.source.refetch_for_unknown_kid())
        self.clock.advance(30)
        keys = yield self.source.refetch_for_unknown_kid()
        self.assertEqual(keys.kids(), {"rsa-2"})
        self.assertEqual(self.resource.hits, 2)
        # A flood of unknown kids right after: no more fetches.
        for _ in range(10):
            self.assertIsNone(self.source.refetch_for_unknown_kid())
        self.assertEqual(self.resource.hits, 2)

    @inlineCallbacks
    def test_unknown_kid_joins_fetch_in_flight(self) -> Any:
        self.source.start()
        joined = self.source.refetch_for_unknown_kid()
        self.assertIsNotNone(joined)
        keys = yield joined
        self.assertEqual(keys.kids(), {"rsa-1", "ec-1"})
        self.assertEqual(self.resource.hits, 1)

    @inlineCallbacks
    def test_server_down_keeps_keys(self) -> Any:
        self.source.start()
        first = yield self.source.settled()
        yield self.port.stopListening()
        self.port = None
        self.clock.advance(600)
        keys = yield self.source.settled()
        self.assertIs(keys, first)
        self.assertIs(self.source.keys, first)
        self.assertIn(f"GET {self.url}: ", self.source.error)
        self.assertIn("onnection refused", self.source.error)
        # A retry is scheduled after retry_interval, not after a full refresh.
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [605.0])

    @inlineCallbacks
    def test_recovers_after_outage(self) -> Any:
        self.source.start()
        yield self.source.settled()
        self.resource.code = 503
        self.clock.advance(600)
        yield self.source.settled()
        self.assertEqual(self.source.error, f"GET {self.url}: HTTP 503")
        self.resource.code = 200
        self.serve(jwk(ec_key("next"), "ec-2"))
        self.clock.advance(5)
        yield self.source.settled()
        self.assertIsNone(self.source.error)
        self.assertEqual(self.source.keys.kids(), {"ec-2"})

    @inlineCallbacks
    def test_garbage_json(self) -> Any:
        self.source.start()
        first = yield self.source.settled()
        self.resource.body = b"<html>oops</html>"
        self.clock.advance(600)
        yield self.source.settled()
        self.assertIs(self.source.keys, first)
        self.assertIn("Jwks is an invalid JSON", self.source.error)

    @inlineCallbacks
    def test_no_usable_keys(self) -> Any:
        self.resource.body = json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode()
        keys = yield self.source.wait_for_keys()
        self.assertIsNone(keys)
        self.assertIn("Jwks doesn't have any valid public key", self.source.error)

    @inlineCallbacks
    def test_first_fetch_fails(self) -> Any:
        yield self.port.stopListening()
        self.port = None
        keys = yield self.source.wait_for_keys()
        self.assertIsNone(keys)
        self.assertIn("onnection refused", self.source.error)
        # A request right after does not cause another fetch...
        again = self.source.wait_for_keys()
        self.assertTrue(again.called)
        self.assertEqual(self.source.fetches, 1)
        # ...but the retry timer does.
        self.clock.advance(5)
        self.assertEqual(self.source.fetches, 2)
        yield self.source.settled()

    @inlineCallbacks
    def test_timeout(self) -> Any:
        self.resource.hang = True
        waiting = self.source.wait_for_keys(timeout=2)
        yield _until(lambda: self.resource.hits == 1)
        self.assertFalse(waiting.called)
        self.clock.advance(2)
        self.assertTrue(waiting.called)
        keys = yield waiting
        self.assertIsNone(keys)
        self.assertIsNone(self.source.error)  # the fetch itself is still running
        self.clock.advance(3)
        yield self.source.settled()
        self.assertEqual(self.source.error, f"GET {self.url}: timed out after 5s")

    def test_cancel_wait(self) -> None:
        self.resource.hang = True
        waiting = self.source.wait_for_keys(timeout=2)
        waiting.addErrback(lambda f: None)
        waiting.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the fetch timeout
        self.source.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_stop(self) -> Any:
        self.source.start()
        yield self.source.settled()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.source.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _until(predicate: Any) -> Deferred:
    """
    @return: a L{Deferred} firing once C{predicate()} holds, checked on each
        reactor turn (the server side of a real socket needs a few).
    """
    d: Deferred = Deferred()

    def check() -> None:
        if predicate():
            d.callback(None)
        else:
            reactor.callLater(0, check)

    check()
    return d


class StaticJwksTests(SynchronousTestCase):
    """
    L{StaticJwks}: inline and file key sets.
    """

    def test_inline(self) -> None:
        self.assertEqual(StaticJwks.from_json(json.dumps(default_jwks())).keys.kids(), {"rsa-1", "ec-1"})
        self.assertIsNone(StaticJwks.from_json(json.dumps(default_jwks())).error)

    def test_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(default_jwks(), f)
        self.assertEqual(StaticJwks.from_file(path).keys.kids(), {"rsa-1", "ec-1"})

    def test_missing_file(self) -> None:
        e = self.assertRaises(JwksError, StaticJwks.from_file, os.path.join(self.mktemp(), "nope.json"))
        self.assertIn("cannot read", str(e))

    def test_garbage(self) -> None:
        self.assertRaises(JwksError, StaticJwks.from_json, "not json")
