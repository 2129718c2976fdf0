"""
The filter chain, through L{txmesh.testing.FilterHarness}: ordering,
modification, local replies, pauses (Deferreds and coroutines), failures.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.testing import FilterHarness, StubResponse, StubUpstream


@implementer(IHTTPFilterFactory)
class Factory:
    """
    Builds the filter class given, passing (config, stream, log).
    """

    def __init__(self, name, cls, log=None):
        self.name = name
        self._cls = cls
        self.log = log if log is not None else []

    def parse_config(self, raw):
        if raw.get("bad"):
            raise FilterConfigError("bad", "is bad")
        return dict(raw)

    def create_filter(self, config, stream):
        return self._cls(config, stream, self.log)


class Recorder(HTTPFilter):
    def __init__(self, config, stream, log):
        self.tag = config.get("tag", "?")
        self.log = log

    def request_headers(self, head, end_stream):
        self.log.append((self.tag, "request_headers", end_stream))
        head.headers.add("x-seen", self.tag)

    def request_data(self, data, end_stream):
        self.log.append((self.tag, "request_data", data, end_stream))

    def response_headers(self, head, end_stream):
        self.log.append((self.tag, "response_headers"))
        head.headers.add("x-resp-seen", self.tag)

    def response_data(self, data, end_stream):
        self.log.append((self.tag, "response_data", data, end_stream))

    def stream_complete(self):
        self.log.append((self.tag, "complete"))


class Upper(HTTPFilter):
    def __init__(self, config, stream, log):
        pass

    def request_data(self, data, end_stream):
        return data.upper()

    def response_data(self, data, end_stream):
        return data[::-1]


class Rejecter(HTTPFilter):
    def __init__(self, config, stream, log):
        self.log = log

    def request_headers(self, head, end_stream):
        if head.headers.get("x-deny") == b"yes":
            return LocalReply(403, b"denied\n", ((b"x-why", b"test"),))


class Pauser(HTTPFilter):
    """
    Pauses the request head until the test fires C{log[0]}.
    """

    def __init__(self, config, stream, log):
        self.log = log

    def request_headers(self, head, end_stream):
        d = Deferred()
        self.log.append(d)
        return d


class CoroutineFilter(HTTPFilter):
    def __init__(self, config, stream, log):
        self.stream = stream

    async def request_headers(self, head, end_stream):
        from twisted.internet.defer import succeed

        value = await succeed(b"from-coroutine")
        head.headers.set("x-coro", value)


class Exploder(HTTPFilter):
    def __init__(self, config, stream, log):
        pass

    def request_headers(self, head, end_stream):
        raise RuntimeError("boom")


class ResponseReplacer(HTTPFilter):
    def __init__(self, config, stream, log):
        pass

    def response_headers(self, head, end_stream):
        if head.status == 500:
            return LocalReply(502, b"masked\n")


class ChainOrderTests(SynchronousTestCase):
    def test_order_and_modification(self):
        """
        Request hooks run in order, response hooks in reverse; headers
        changed by a filter are what later filters and the upstream see.
        """
        log = []
        f = Factory("rec", Recorder, log)
        h = FilterHarness([(f, {"tag": "a"}), (f, {"tag": "b"})], StubUpstream(body=b"ok"))
        r = h.request("GET", "/")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"ok")
        self.assertEqual(r.upstream_request.head.headers.get_all("x-seen"), [b"a", b"b"])
        self.assertEqual(r.headers.get_all("x-resp-seen"), [b"b", b"a"])
        self.assertEqual(
            [e for e in log if e[1] in ("request_headers", "response_headers")],
            [("a", "request_headers", True), ("b", "request_headers", True),
             ("b", "response_headers"), ("a", "response_headers")])
        self.assertEqual(log[-2:], [("a", "complete"), ("b", "complete")])
        self.assertTrue(r.complete)

    def test_data_replacement(self):
        """
        A data hook returning bytes replaces the data, both ways.
        """
        h = FilterHarness([(Factory("u", Upper), {})], StubUpstream(body=b"abc"))
        r = h.request("POST", "/", body=b"hello")
        self.assertEqual(r.upstream_request.body, b"HELLO")
        self.assertEqual(r.body, b"cba")

    def test_trailers(self):
        """
        Request and response trailers pass through.
        """
        h = FilterHarness([], StubUpstream(body=b"x", trailers={"grpc-status": "0"}))
        r = h.request("POST", "/", body=b"b", trailers={"x-t": "1"})
        self.assertEqual(r.upstream_request.trailers.get("x-t"), b"1")
        self.assertEqual(r.trailers.get("grpc-status"), b"0")


class LocalReplyTests(SynchronousTestCase):
    def test_local_reply_skips_upstream(self):
        """
        A L{LocalReply} answers the client; the upstream sees nothing, and
        earlier filters still see the response.
        """
        log = []
        h = FilterHarness([(Factory("rec", Recorder, log), {"tag": "a"}), (Factory("deny", Rejecter), {})])
        r = h.request("GET", "/", headers={"x-deny": "yes"})
        self.assertEqual(r.status, 403)
        self.assertEqual(r.body, b"denied\n")
        self.assertEqual(r.headers.get("x-why"), b"test")
        self.assertEqual(r.headers.get("x-txmesh-flags"), b"LR")
        self.assertIsNone(r.upstream_request)
        self.assertEqual(h.upstream.requests, [])
        self.assertIn(("a", "response_headers"), log)

    def test_response_hook_replaces_response(self):
        """
        A response hook may replace the upstream's response before it is sent.
        """
        h = FilterHarness([(Factory("r", ResponseReplacer), {})], StubUpstream(status=500, body=b"secret"))
        r = h.request("GET", "/")
        self.assertEqual((r.status, r.body), (502, b"masked\n"))

    def test_local_reply_validates_status(self):
        self.assertRaises(ValueError, LocalReply, 42)


class PauseTests(SynchronousTestCase):
    def test_deferred_pauses_then_continues(self):
        """
        A hook returning a Deferred holds the stream -- body events queue
        behind it, in order -- until it fires.
        """
        log = []
        h = FilterHarness([(Factory("p", Pauser, log), {}), (Factory("u", Upper), {})], StubUpstream(body=b"k"))
        stream, r = h.start("POST", "/", end_stream=False)
        stream.request_data(b"one", False)
        stream.request_data(b"two", True)
        self.assertEqual(h.upstream.requests, [])
        self.assertFalse(r.complete)
        log[0].callback(None)
        self.assertEqual(h.upstream.requests[0].body, b"ONETWO")
        self.assertTrue(r.complete)

    def test_deferred_local_reply(self):
        """
        A Deferred may resolve to a L{LocalReply}.
        """
        log = []
        h = FilterHarness([(Factory("p", Pauser, log), {})])
        stream, r = h.start("GET", "/")
        log[0].callback(LocalReply(429, b"slow down"))
        self.assertEqual(r.status, 429)
        self.assertEqual(h.upstream.requests, [])

    def test_deferred_on_clock(self):
        """
        Filters that wait on time use the stream's clock.
        """

        class Waiter(HTTPFilter):
            def __init__(self, config, stream, log):
                self.stream = stream

            def request_headers(self, head, end_stream):
                return deferLater(self.stream.clock, 5, lambda: None)

        h = FilterHarness([(Factory("w", Waiter), {})])
        r = h.request("GET", "/")
        self.assertFalse(r.complete)
        h.clock.advance(5)
        self.assertTrue(r.complete)

    def test_coroutine_hook(self):
        h = FilterHarness([(Factory("c", CoroutineFilter), {})])
        r = h.request("GET", "/")
        self.assertEqual(r.upstream_request.head.headers.get("x-coro"), b"from-coroutine")

    def test_upstream_deferred(self):
        """
        A stub upstream may answer later.
        """
        d = Deferred()
        h = FilterHarness([], StubUpstream(handler=lambda req: d))
        r = h.request("GET", "/")
        self.assertFalse(r.complete)
        d.callback(StubResponse(204))
        self.assertEqual(r.status, 204)
        self.assertTrue(r.complete)


class FailureTests(SynchronousTestCase):
    def test_exception_is_500(self):
        """
        A filter that raises gives the client a 500 and is logged; the
        upstream is not asked.
        """
        h = FilterHarness([(Factory("x", Exploder), {})])
        r = h.request("GET", "/")
        self.assertEqual(r.status, 500)
        self.assertEqual(h.upstream.requests, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failed_deferred_is_500(self):
        log = []
        h = FilterHarness([(Factory("p", Pauser, log), {})])
        stream, r = h.start("GET", "/")
        log[0].errback(RuntimeError("later boom"))
        self.assertEqual(r.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bad_return_value(self):
        class Weird(HTTPFilter):
            def __init__(self, config, stream, log):
                pass

            def request_headers(self, head, end_stream):
                return 42

        h = FilterHarness([(Factory("w", Weird), {})])
        r = h.request("GET", "/")
        self.assertEqual(r.status, 500)

    def test_config_errors_surface(self):
        self.assertRaises(FilterConfigError, FilterHarness, [(Factory("rec", Recorder), {"bad": True})])

    def test_downstream_reset_completes_filters(self):
        log = []
        h = FilterHarness([(Factory("rec", Recorder, log), {"tag": "a"})],
                          StubUpstream(handler=lambda req: Deferred()))
        stream, r = h.start("GET", "/")
        stream.downstream_reset()
        self.assertIn(("a", "complete"), log)
        self.assertIn("DC", stream.response_flags)
