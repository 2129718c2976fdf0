"""
Trace context propagation: W3C Trace Context (C{traceparent},
C{tracestate}) and Zipkin's B3 (the single C{b3} header and the
C{x-b3-*} headers).

This module is pure: it reads and writes L{Headers} and nothing else (no
clock, no I/O), and new ids come from a C{random.Random} the caller passes.

Reading is forgiving about what is absent and strict about what is present:
a header that does not follow its format exactly is ignored, never repaired
and never passed on.  L{extract} tries the formats in order of precedence --
C{traceparent}, then C{b3}, then C{x-b3-*} -- and the first valid one wins,
so a broken C{traceparent} next to a valid C{b3} still continues the trace.
L{inject} removes every propagation header before writing the chosen
formats, so a next hop never sees a stale parent in a format it was not
given.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

import attrs

from txmesh.proxy.stream import Headers

W3C = "w3c"
"""
Format name: C{traceparent} and C{tracestate}.
"""

B3_MULTI = "b3"
"""
Format name: the C{x-b3-traceid}, C{x-b3-spanid}, C{x-b3-parentspanid},
C{x-b3-sampled} and C{x-b3-flags} headers (what Envoy's Zipkin tracer and
Istio's sample apps propagate).
"""

B3_SINGLE = "b3-single"
"""
Format name: the single C{b3} header.
"""

FORMATS = (W3C, B3_MULTI, B3_SINGLE)

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
X_B3_TRACEID = b"x-b3-traceid"
X_B3_SPANID = b"x-b3-spanid"
X_B3_PARENTSPANID = b"x-b3-parentspanid"
X_B3_SAMPLED = b"x-b3-sampled"
X_B3_FLAGS = b"x-b3-flags"

PROPAGATION_HEADERS = frozenset({
    TRACEPARENT, TRACESTATE, B3, X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_FLAGS,
})
"""
Every header L{inject} owns: it removes them all before writing.
"""

MAX_TRACESTATE_MEMBERS = 32
"""
The W3C limit on C{tracestate} list members; a longer list is invalid.
"""

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_TRACE_ID_B3 = re.compile(r"(?:[0-9a-f]{16}|[0-9a-f]{32})\Z")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.DOTALL)
# tracestate keys: "simple-key" or "tenant@system" (W3C Trace Context, 3.3.1.3.1).
_TS_KEY = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})\Z"
)
# tracestate values: printable ASCII but "," and "=", not ending in a space.
_TS_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z")


def _trace_id(value: str | None) -> str | None:
    if value is not None and not _HEX32.match(value):
        raise ValueError(f"trace_id must be 32 lower-case hex digits, not {value!r}")
    if value == _ZERO_TRACE:
        raise ValueError("trace_id must not be all zeros")
    return value


def _span_id(value: str | None) -> str | None:
    if value is not None and not _HEX16.match(value):
        raise ValueError(f"span id must be 16 lower-case hex digits, not {value!r}")
    if value == _ZERO_SPAN:
        raise ValueError("span id must not be all zeros")
    return value


@attrs.frozen
class TraceContext:
    """
    Where a request sits in a trace, as one hop tells the next.

    A context with ids names the span the receiver's span is a child of.
    A context without ids (B3's C{b3: 0}, C{b3: 1}, C{b3: d}, or a lone
    C{x-b3-sampled}) carries only a sampling decision.

    @ivar trace_id: 32 lower-case hex digits (64-bit B3 ids are padded on
        the left with zeros), or C{None} with C{span_id}.
    @ivar span_id: 16 lower-case hex digits, or C{None} with C{trace_id}.
    @ivar parent_id: the parent of C{span_id}, or C{None} for a root.
    @ivar sampled: C{True} (record), C{False} (do not) or C{None} (no
        decision yet: the receiver decides).
    @ivar debug: B3's debug flag: record regardless of sampling.
    @ivar tracestate: the normalized W3C C{tracestate}, or C{None}.
    """

    trace_id: str | None = attrs.field(default=None, converter=_trace_id)
    span_id: str | None = attrs.field(default=None, converter=_span_id)
    parent_id: str | None = attrs.field(default=None, converter=_span_id)
    sampled: bool | None = None
    debug: bool = False
    tracestate: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.trace_id is None) != (self.span_id is None):
            raise ValueError("trace_id and span_id go together: give both or neither")
        if self.parent_id is not None and self.span_id is None:
            raise ValueError("parent_id needs a span_id")

    @property
    def has_ids(self) -> bool:
        """
        @return: whether this context names a span (else it only carries a
            sampling decision).
        """
        return self.span_id is not None


def new_trace_id(rng: random.Random) -> str:
    """
    @param rng: where the bits come from.
    @return: a random, non-zero 128-bit trace id as 32 lower-case hex digits.
    """
    while True:
        bits = rng.getrandbits(128)
        if bits:
            return f"{bits:032x}"


def new_span_id(rng: random.Random) -> str:
    """
    @param rng: where the bits come from.
    @return: a random, non-zero 64-bit span id as 16 lower-case hex digits.
    """
    while True:
        bits = rng.getrandbits(64)
        if bits:
            return f"{bits:016x}"


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def _one(headers: Headers, name: bytes) -> str | None:
    """
    @return: the only value of C{name} as text; C{None} when it is absent,
        repeated (ambiguous) or not ASCII.
    """
    values = headers.get_all(name)
    if len(values) != 1:
        return None
    return _text(values[0])


def parse_traceparent(value: str) -> TraceContext | None:
    """
    Parse a W3C C{traceparent} value.

    Version C{00} must be exactly C{00-<32 hex>-<16 hex>-<2 hex>}.  A later
    version may carry more fields after a C{-}, which are ignored as the
    spec requires; version C{ff} is invalid.  Ids must be lower-case and not
    all zeros.

    @return: the context (C{sampled} from the flags' low bit), or C{None}
        when C{value} is invalid.
    """
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, sampled=bool(int(flags, 16) & 0x01))


def format_traceparent(context: TraceContext) -> str:
    """
    @param context: a context with ids.
    @return: its version-00 C{traceparent} value; sampled only when
        C{context.sampled} is true or C{context.debug} (W3C has no deferred
        decision).
    """
    if not context.has_ids:
        raise ValueError("a traceparent needs a trace_id and a span_id")
    flags = "01" if context.sampled or context.debug else "00"
    return f"00-{context.trace_id}-{context.span_id}-{flags}"


def parse_tracestate(values: Iterable[bytes]) -> str | None:
    """
    Parse and normalize W3C C{tracestate} header values (several headers
    are joined with commas, as the spec says).

    @return: the list members joined by C{","} with surrounding whitespace
        and empty members dropped; C{None} when there are none or the list
        is invalid (a bad key or value, a duplicate key, more than
        L{MAX_TRACESTATE_MEMBERS} members).
    """
    members: list[str] = []
    keys: set[str] = set()
    for raw in values:
        text = _text(raw)
        if text is None:
            return None
        for member in text.split(","):
            member = member.strip(" \t")
            if not member:
                continue
            key, eq, val = member.partition("=")
            if not eq or not _TS_KEY.match(key) or not _TS_VALUE.match(val) or key in keys:
                return None
            keys.add(key)
            members.append(member)
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    return ",".join(members)


def _b3_trace_id(value: str) -> str | None:
    if not _TRACE_ID_B3.match(value):
        return None
    # 64-bit B3 trace ids are padded to 128 bits, as OpenTelemetry does.
    value = value.rjust(32, "0")
    return None if value == _ZERO_TRACE else value


def _b3_span_id(value: str) -> str | None:
    if not _HEX16.match(value) or value == _ZERO_SPAN:
        return None
    return value


_B3_SINGLE_SAMPLING = {"0": (False, False), "1": (True, False), "d": (True, True)}


def parse_b3_single(value: str) -> TraceContext | None:
    """
    Parse a single C{b3} header: C{{trace}-{span}}, C{{trace}-{span}-{sampling}},
    C{{trace}-{span}-{sampling}-{parent}}, or only the sampling state
    C{0} (deny), C{1} (accept) or C{d} (debug, which implies accept).

    @return: the context, or C{None} when C{value} is invalid.
    """
    parts = value.split("-")
    if len(parts) == 1:
        decision = _B3_SINGLE_SAMPLING.get(parts[0])
        if decision is None:
            return None
        return TraceContext(sampled=decision[0], debug=decision[1])
    if len(parts) > 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    span_id = _b3_span_id(parts[1])
    if trace_id is None or span_id is None:
        return None
    sampled: bool | None = None
    debug = False
    if len(parts) >= 3:
        decision = _B3_SINGLE_SAMPLING.get(parts[2])
        if decision is None:
            return None
        sampled, debug = decision
    parent_id = None
    if len(parts) == 4:
        parent_id = _b3_span_id(parts[3])
        if parent_id is None:
            return None
    return TraceContext(trace_id, span_id, parent_id, sampled=sampled, debug=debug)


def format_b3_single(context: TraceContext) -> str:
    """
    @return: the single C{b3} header value for C{context}; the sampling
        state is omitted when C{context.sampled} is C{None}.
    """
    state = "d" if context.debug else {True: "1", False: "0", None: ""}[context.sampled]
    if not context.has_ids:
        if not state:
            raise ValueError("a b3 header needs ids or a sampling decision")
        return state
    value = f"{context.trace_id}-{context.span_id}"
    if state:
        value += "-" + state
        if context.parent_id is not None:
            value += "-" + context.parent_id
    return value


# Multi-header X-B3-Sampled: "1"/"0", and the "true"/"false" old tracers sent.
_B3_SAMPLED = {"1": True, "0": False, "true": True, "false": False}


def parse_b3_multi(headers: Headers) -> TraceContext | None:
    """
    Parse the C{x-b3-*} headers.  C{x-b3-traceid} and C{x-b3-spanid} go
    together; C{x-b3-sampled} alone is a sampling decision without ids;
    C{x-b3-flags: 1} is debug (and implies sampled).

    @return: the context, or C{None} when the headers are absent or any of
        them is invalid.
    """
    names = (X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_FLAGS)
    present = [name for name in names if name in headers]
    if not present:
        return None
    raw = {name: _one(headers, name) for name in present}
    if any(v is None for v in raw.values()):
        return None
    sampled: bool | None = None
    if X_B3_SAMPLED in raw:
        sampled = _B3_SAMPLED.get(raw[X_B3_SAMPLED] or "")
        if sampled is None:
            return None
    debug = False
    if X_B3_FLAGS in raw:
        if raw[X_B3_FLAGS] not in ("0", "1"):
            return None
        debug = raw[X_B3_FLAGS] == "1"
    if debug:
        sampled = True
    trace_raw, span_raw = raw.get(X_B3_TRACEID), raw.get(X_B3_SPANID)
    if trace_raw is None and span_raw is None:
        if X_B3_PARENTSPANID in raw or (sampled is None and not debug):
            return None
        return TraceContext(sampled=sampled, debug=debug)
    if trace_raw is None or span_raw is None:
        return None
    trace_id, span_id = _b3_trace_id(trace_raw), _b3_span_id(span_raw)
    if trace_id is None or span_id is None:
        return None
    parent_id = None
    if X_B3_PARENTSPANID in raw:
        parent_id = _b3_span_id(raw[X_B3_PARENTSPANID] or "")
        if parent_id is None:
            return None
    return TraceContext(trace_id, span_id, parent_id, sampled=sampled, debug=debug)


def extract(headers: Headers) -> TraceContext | None:
    """
    Read the trace context a request carries.

    The formats are tried in order -- C{traceparent} (with its
    C{tracestate}), the single C{b3} header, the C{x-b3-*} headers -- and the
    first valid one wins; invalid ones are skipped.  C{tracestate} is read
    only with a valid C{traceparent}.  Never raises.

    @param headers: the request headers.
    @return: the context, or C{None} when no format is present and valid.
    """
    # One scan of the request's headers: the formats' many lookups then go
    # over these few, and a request that carries none (a trace's first hop)
    # is done here.
    pairs = [(n, v) for n, v in headers.items() if n in PROPAGATION_HEADERS]
    if not pairs:
        return None
    carried = Headers(pairs)
    value = _one(carried, TRACEPARENT)
    if value is not None:
        context = parse_traceparent(value)
        if context is not None:
            tracestate = parse_tracestate(carried.get_all(TRACESTATE))
            if tracestate is not None:
                context = attrs.evolve(context, tracestate=tracestate)
            return context
    value = _one(carried, B3)
    if value is not None:
        context = parse_b3_single(value)
        if context is not None:
            return context
    return parse_b3_multi(carried)


def inject(headers: Headers, context: TraceContext, formats: Iterable[str] = (W3C, B3_MULTI)) -> None:
    """
    Write C{context} into C{headers} in each of C{formats}, after removing
    every propagation header (L{PROPAGATION_HEADERS}) already there.

    A context without ids writes only B3's sampling decision (W3C cannot
    carry one without ids).

    @param formats: names from L{FORMATS}.
    @raise ValueError: for an unknown format name.
    """
    formats = tuple(formats)
    for name in formats:
        if name not in FORMATS:
            raise ValueError(f"unknown propagation format {name!r} (expected one of: {', '.join(FORMATS)})")
    headers.remove_many(PROPAGATION_HEADERS)
    ids = context.has_ids
    written: list[tuple[bytes, str]] = []
    if W3C in formats and ids:
        written.append((TRACEPARENT, format_traceparent(context)))
        if context.tracestate:
            written.append((TRACESTATE, context.tracestate))
    if B3_SINGLE in formats and (ids or context.sampled is not None or context.debug):
        written.append((B3, format_b3_single(context)))
    if B3_MULTI in formats:
        if ids:
            written.append((X_B3_TRACEID, context.trace_id or ""))
            written.append((X_B3_SPANID, context.span_id or ""))
            if context.parent_id is not None:
                written.append((X_B3_PARENTSPANID, context.parent_id))
        if context.debug:
            # Debug implies accept: the spec says not to send X-B3-Sampled too.
            written.append((X_B3_FLAGS, "1"))
        elif context.sampled is not None:
            written.append((X_B3_SAMPLED, "1" if context.sampled else "0"))
    # The names are lower-case constants: appended at once, not normalised
    # one by one as Headers.add would.
    headers.items().extend([(name, value.encode("latin-1")) for name, value in written])
