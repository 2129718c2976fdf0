"""
Tests for L{txmesh.observability.trace_context}: W3C Trace Context and B3,
as tables of header values.
"""

from __future__ import annotations

import random

import attrs
from twisted.trial.unittest import SynchronousTestCase

from txmesh.observability.trace_context import (
    B3_MULTI,
    B3_SINGLE,
    PROPAGATION_HEADERS,
    W3C,
    TraceContext,
    extract,
    format_b3_single,
    format_traceparent,
    inject,
    new_span_id,
    new_trace_id,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    parse_tracestate,
)
from txmesh.proxy.stream import Headers

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "b7ad6b7169203331"
TRACE64 = "a3ce929d0e0e4736"


def headers(*pairs: tuple[str, str]) -> Headers:
    return Headers.from_pairs(pairs)


class TraceparentTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for value, sampled in [
            (f"00-{TRACE}-{SPAN}-01", True),
            (f"00-{TRACE}-{SPAN}-00", False),
            (f"00-{TRACE}-{SPAN}-09", True),  # other bits: the low bit decides
            (f"00-{TRACE}-{SPAN}-02", False),
            (f"01-{TRACE}-{SPAN}-01-future-field", True),  # a later version may add fields
            (f"cc-{TRACE}-{SPAN}-01", True),
        ]:
            with self.subTest(value=value):
                self.assertEqual(parse_traceparent(value), TraceContext(TRACE, SPAN, sampled=sampled))

    def test_invalid(self) -> None:
        for value in [
            "",
            "00",
            f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
            f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
            f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
            f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
            f"00-{TRACE}a-{SPAN}-01",  # long trace id
            f"00-{TRACE}-{SPAN[:-1]}-01",  # short span id
            f"00-{TRACE}-{SPAN}0-01",
            f"00-{TRACE}-{SPAN}-1",  # short flags
            f"00-{TRACE}-{SPAN}-001",
            f"00-{TRACE.upper()}-{SPAN}-01",  # upper case
            f"00-{TRACE}-{SPAN.upper()}-01",
            f"0A-{TRACE}-{SPAN}-01",
            f"00-{TRACE}-{SPAN}-0A",
            f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
            f"00-{TRACE}-{SPAN}-01-",
            f"01-{TRACE}-{SPAN}-01extra",  # later versions: extra fields after a dash only
            f"00_{TRACE}_{SPAN}_01",
            f"00-{TRACE}-{SPAN}-01\n",
            f"0-0{TRACE}-{SPAN}-01",
            f" 00-{TRACE}-{SPAN}-01",
            f"00-{TRACE[:-1]}g-{SPAN}-01",
        ]:
            with self.subTest(value=value):
                self.assertIsNone(parse_traceparent(value))

    def test_format(self) -> None:
        self.assertEqual(format_traceparent(TraceContext(TRACE, SPAN, sampled=True)), f"00-{TRACE}-{SPAN}-01")
        self.assertEqual(format_traceparent(TraceContext(TRACE, SPAN, sampled=False)), f"00-{TRACE}-{SPAN}-00")
        self.assertEqual(format_traceparent(TraceContext(TRACE, SPAN)), f"00-{TRACE}-{SPAN}-00")
        self.assertEqual(format_traceparent(TraceContext(TRACE, SPAN, debug=True)), f"00-{TRACE}-{SPAN}-01")
        self.assertRaises(ValueError, format_traceparent, TraceContext(sampled=True))


class TracestateTests(SynchronousTestCase):
    def test_table(self) -> None:
        for values, expected in [
            ([b"rojo=00f067aa0ba902b7"], "rojo=00f067aa0ba902b7"),
            ([b"rojo=1,congo=t61rcWkgMzE"], "rojo=1,congo=t61rcWkgMzE"),
            ([b" rojo=1 , congo=2 "], "rojo=1,congo=2"),
            ([b"rojo=1", b"congo=2"], "rojo=1,congo=2"),  # several headers join
            ([b"rojo=1,,congo=2"], "rojo=1,congo=2"),  # empty members are allowed
            ([b"tenant@vendor=x"], "tenant@vendor=x"),
            ([b"a/b*c_d-e=v"], "a/b*c_d-e=v"),
            ([], None),
            ([b""], None),
            ([b"rojo"], None),  # no "="
            ([b"Rojo=1"], None),  # upper-case key
            ([b"1rojo=1"], None),  # a simple key starts with a letter
            ([b"rojo=1,rojo=2"], None),  # duplicate key
            ([b"rojo=a,b"], None),  # "b" is not a member
            ([b"rojo=a=b"], None),  # "=" in a value
            ([b"rojo=\xff"], None),
            ([b"rojo="], None),  # an empty value
            ([",".join(f"k{i}=v" for i in range(33)).encode()], None),  # more than 32 members
            ([",".join(f"k{i}=v" for i in range(32)).encode()], ",".join(f"k{i}=v" for i in range(32))),
        ]:
            with self.subTest(values=values):
                self.assertEqual(parse_tracestate(values), expected)


class B3SingleTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for value, expected in [
            (f"{TRACE}-{SPAN}", TraceContext(TRACE, SPAN)),
            (f"{TRACE}-{SPAN}-1", TraceContext(TRACE, SPAN, sampled=True)),
            (f"{TRACE}-{SPAN}-0", TraceContext(TRACE, SPAN, sampled=False)),
            (f"{TRACE}-{SPAN}-d", TraceContext(TRACE, SPAN, sampled=True, debug=True)),
            (f"{TRACE}-{SPAN}-1-{PARENT}", TraceContext(TRACE, SPAN, PARENT, sampled=True)),
            (f"{TRACE64}-{SPAN}-1", TraceContext("0" * 16 + TRACE64, SPAN, sampled=True)),
            ("0", TraceContext(sampled=False)),
            ("1", TraceContext(sampled=True)),
            ("d", TraceContext(sampled=True, debug=True)),
        ]:
            with self.subTest(value=value):
                self.assertEqual(parse_b3_single(value), expected)

    def test_invalid(self) -> None:
        for value in [
            "",
            "2",
            "true",
            TRACE,  # no span id
            f"{TRACE}-",
            f"{TRACE}-{SPAN}-",
            f"{TRACE}-{SPAN}-2",
            f"{TRACE}-{SPAN}-1-",
            f"{TRACE}-{SPAN}-1-{PARENT}-x",
            f"{TRACE}-{SPAN}-1-{'0' * 16}",
            f"{TRACE.upper()}-{SPAN}-1",
            f"{TRACE[:-2]}-{SPAN}-1",  # 30 digits
            f"{'0' * 32}-{SPAN}-1",
            f"{'0' * 16}-{SPAN}-1",
            f"{TRACE}-{'0' * 16}-1",
            f"{TRACE}-{SPAN[:-1]}-1",
        ]:
            with self.subTest(value=value):
                self.assertIsNone(parse_b3_single(value))

    def test_format(self) -> None:
        for context, expected in [
            (TraceContext(TRACE, SPAN), f"{TRACE}-{SPAN}"),
            (TraceContext(TRACE, SPAN, sampled=True), f"{TRACE}-{SPAN}-1"),
            (TraceContext(TRACE, SPAN, PARENT, sampled=False), f"{TRACE}-{SPAN}-0-{PARENT}"),
            (TraceContext(TRACE, SPAN, PARENT, sampled=True, debug=True), f"{TRACE}-{SPAN}-d-{PARENT}"),
            (TraceContext(sampled=False), "0"),
            (TraceContext(sampled=True, debug=True), "d"),
        ]:
            with self.subTest(context=context):
                self.assertEqual(format_b3_single(context), expected)
                self.assertEqual(parse_b3_single(expected), context)


class B3MultiTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for pairs, expected in [
            ([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN)], TraceContext(TRACE, SPAN)),
            ([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "1")],
             TraceContext(TRACE, SPAN, sampled=True)),
            ([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "0")],
             TraceContext(TRACE, SPAN, sampled=False)),
            ([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "true")],
             TraceContext(TRACE, SPAN, sampled=True)),
            ([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-ParentSpanId", PARENT), ("X-B3-Sampled", "1")],
             TraceContext(TRACE, SPAN, PARENT, sampled=True)),
            ([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Flags", "1")],
             TraceContext(TRACE, SPAN, sampled=True, debug=True)),
            ([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Flags", "1"), ("X-B3-Sampled", "0")],
             TraceContext(TRACE, SPAN, sampled=True, debug=True)),  # debug implies accept
            ([("X-B3-TraceId", TRACE64), ("X-B3-SpanId", SPAN)], TraceContext("0" * 16 + TRACE64, SPAN)),
            ([("X-B3-Sampled", "0")], TraceContext(sampled=False)),
            ([("X-B3-Flags", "1")], TraceContext(sampled=True, debug=True)),
        ]:
            with self.subTest(pairs=pairs):
                self.assertEqual(parse_b3_multi(headers(*pairs)), expected)

    def test_invalid(self) -> None:
        for pairs in [
            [],
            [("X-B3-TraceId", TRACE)],  # no span id
            [("X-B3-SpanId", SPAN)],  # no trace id
            [("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "yes")],
            [("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Flags", "2")],
            [("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-ParentSpanId", "xyz")],
            [("X-B3-TraceId", TRACE.upper()), ("X-B3-SpanId", SPAN)],
            [("X-B3-TraceId", TRACE[:20]), ("X-B3-SpanId", SPAN)],
            [("X-B3-TraceId", "0" * 32), ("X-B3-SpanId", SPAN)],
            [("X-B3-TraceId", TRACE), ("X-B3-SpanId", "0" * 16)],
            [("X-B3-TraceId", TRACE), ("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN)],  # repeated
            [("X-B3-ParentSpanId", PARENT), ("X-B3-Sampled", "1")],  # a parent without ids
            [("X-B3-Flags", "0")],  # no decision, no ids
        ]:
            with self.subTest(pairs=pairs):
                self.assertIsNone(parse_b3_multi(headers(*pairs)))


class ExtractTests(SynchronousTestCase):
    def test_precedence(self) -> None:
        other = "1" * 32
        tp = ("traceparent", f"00-{TRACE}-{SPAN}-01")
        single = ("b3", f"{other}-{PARENT}-0")
        multi = [("x-b3-traceid", "2" * 32), ("x-b3-spanid", "3" * 16)]
        self.assertEqual(extract(headers(tp, single, *multi)), TraceContext(TRACE, SPAN, sampled=True))
        self.assertEqual(extract(headers(single, *multi)), TraceContext(other, PARENT, sampled=False))
        self.assertEqual(extract(headers(*multi)), TraceContext("2" * 32, "3" * 16))

    def test_falls_back_past_invalid(self) -> None:
        single = ("b3", f"{TRACE}-{SPAN}-1")
        self.assertEqual(
            extract(headers(("traceparent", f"ff-{TRACE}-{SPAN}-01"), single)),
            TraceContext(TRACE, SPAN, sampled=True),
        )
        self.assertEqual(
            extract(headers(("b3", "garbage"), ("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN))),
            TraceContext(TRACE, SPAN),
        )

    def test_none(self) -> None:
        for pairs in [
            [],
            [("traceparent", "garbage")],
            [("traceparent", f"00-{TRACE}-{SPAN}-01"), ("traceparent", f"00-{TRACE}-{PARENT}-01")],
            [("b3", "garbage"), ("x-b3-traceid", "nope")],
            [("tracestate", "rojo=1")],  # tracestate alone means nothing
            [("traceparent", "00-\xe9")],
        ]:
            with self.subTest(pairs=pairs):
                self.assertIsNone(extract(headers(*pairs)))

    def test_tracestate(self) -> None:
        tp = ("traceparent", f"00-{TRACE}-{SPAN}-01")
        context = extract(headers(tp, ("tracestate", "rojo=1"), ("tracestate", "congo=2")))
        self.assertEqual(context, TraceContext(TRACE, SPAN, sampled=True, tracestate="rojo=1,congo=2"))
        # An invalid tracestate is dropped; the traceparent still counts.
        context = extract(headers(tp, ("tracestate", "Bad Key=1")))
        self.assertEqual(context, TraceContext(TRACE, SPAN, sampled=True))
        # tracestate rides only with traceparent.
        context = extract(headers(("b3", f"{TRACE}-{SPAN}-1"), ("tracestate", "rojo=1")))
        self.assertIsNone(context.tracestate)


class InjectTests(SynchronousTestCase):
    context = TraceContext(TRACE, SPAN, PARENT, sampled=True, tracestate="rojo=1")

    def stale(self) -> Headers:
        return headers(
            ("host", "example.com"),
            ("traceparent", f"00-{'9' * 32}-{'9' * 16}-01"),
            ("tracestate", "old=1"),
            ("b3", "9" * 32 + "-" + "9" * 16),
            ("x-b3-traceid", "9" * 32),
            ("x-b3-spanid", "9" * 16),
            ("x-b3-parentspanid", "8" * 16),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
            ("x-request-id", "abc"),
        )

    def test_default_formats(self) -> None:
        h = self.stale()
        inject(h, self.context)
        self.assertEqual(list(h), [
            (b"host", b"example.com"),
            (b"x-request-id", b"abc"),
            (b"traceparent", f"00-{TRACE}-{SPAN}-01".encode()),
            (b"tracestate", b"rojo=1"),
            (b"x-b3-traceid", TRACE.encode()),
            (b"x-b3-spanid", SPAN.encode()),
            (b"x-b3-parentspanid", PARENT.encode()),
            (b"x-b3-sampled", b"1"),
        ])
        # traceparent wins, and it does not carry the parent's parent.
        self.assertEqual(extract(h), attrs.evolve(self.context, parent_id=None))

    def test_each_format_round_trips(self) -> None:
        for formats in [(W3C,), (B3_SINGLE,), (B3_MULTI,), (W3C, B3_SINGLE, B3_MULTI)]:
            with self.subTest(formats=formats):
                h = self.stale()
                inject(h, self.context, formats)
                names = {n for n, _ in h} & PROPAGATION_HEADERS
                expected = set()
                if W3C in formats:
                    expected |= {b"traceparent", b"tracestate"}
                if B3_SINGLE in formats:
                    expected.add(b"b3")
                if B3_MULTI in formats:
                    expected |= {b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled"}
                self.assertEqual(names, expected)
                got = extract(h)
                self.assertEqual((got.trace_id, got.span_id, got.sampled), (TRACE, SPAN, True))

    def test_debug_and_unsampled(self) -> None:
        h = Headers()
        inject(h, TraceContext(TRACE, SPAN, sampled=True, debug=True), (W3C, B3_MULTI, B3_SINGLE))
        self.assertEqual(h.get("x-b3-flags"), b"1")
        self.assertNotIn(b"x-b3-sampled", h)
        self.assertEqual(h.get("b3"), f"{TRACE}-{SPAN}-d".encode())
        self.assertEqual(h.get("traceparent"), f"00-{TRACE}-{SPAN}-01".encode())
        h = Headers()
        inject(h, TraceContext(TRACE, SPAN, sampled=False), (W3C, B3_MULTI))
        self.assertEqual(h.get("x-b3-sampled"), b"0")
        self.assertEqual(h.get("traceparent"), f"00-{TRACE}-{SPAN}-00".encode())

    def test_sampling_only(self) -> None:
        h = self.stale()
        inject(h, TraceContext(sampled=False), (W3C, B3_MULTI, B3_SINGLE))
        self.assertEqual([(n, v) for n, v in h if n in PROPAGATION_HEADERS], [(b"b3", b"0"), (b"x-b3-sampled", b"0")])

    def test_unknown_format(self) -> None:
        self.assertRaises(ValueError, inject, Headers(), self.context, ("jaeger",))


class ValueTests(SynchronousTestCase):
    def test_ids(self) -> None:
        rng = random.Random(7)
        trace_id, span_id = new_trace_id(rng), new_span_id(rng)
        self.assertRegex(trace_id, r"\A[0-9a-f]{32}\Z")
        self.assertRegex(span_id, r"\A[0-9a-f]{16}\Z")
        self.assertEqual((trace_id, span_id), (new_trace_id(random.Random(7)), span_id))

    def test_zero_bits_redrawn(self) -> None:
        class Zero:
            calls = 0

            def getrandbits(self, n: int) -> int:
                self.calls += 1
                return 0 if self.calls == 1 else 5

        self.assertEqual(new_span_id(Zero()), "0000000000000005")  # type: ignore[arg-type]

    def test_validation(self) -> None:
        for kw in [
            {"trace_id": TRACE},
            {"span_id": SPAN},
            {"trace_id": TRACE.upper(), "span_id": SPAN},
            {"trace_id": "0" * 32, "span_id": SPAN},
            {"trace_id": TRACE, "span_id": "0" * 16},
            {"trace_id": TRACE64, "span_id": SPAN},
            {"parent_id": PARENT},
        ]:
            with self.subTest(kw=kw):
                self.assertRaises(ValueError, TraceContext, **kw)
