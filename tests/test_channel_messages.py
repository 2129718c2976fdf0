"""
Tests for L{txmesh.pilot.messages}: the sans-IO message layer of the
persistent pilot/proxy channel.
"""

from __future__ import annotations

import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from txmesh.pilot.messages import (
    KNOWN_RESOURCE_TYPES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Ack,
    ChannelDecoder,
    ChannelProtocolError,
    Hello,
    MessageValidationError,
    Nack,
    Node,
    Ping,
    Pong,
    ProxySyncState,
    Push,
    Refused,
    SyncStatus,
    encode,
    message_from_json,
    unknown_resource_types,
)

BOUNDED = settings(max_examples=60, deadline=None)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def frame_json(obj: object) -> bytes:
    return frame(json.dumps(obj).encode("utf-8"))


# -- strategies -----------------------------------------------------------

text = st.text(max_size=12)
non_empty = st.text(min_size=1, max_size=12)
ids = st.integers(min_value=0, max_value=2**63 - 1)
json_scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
resource = st.dictionaries(text, json_value, max_size=4)
resource_type = st.sampled_from(sorted(KNOWN_RESOURCE_TYPES)) | non_empty

nodes = st.builds(
    Node,
    id=non_empty,
    workload=text,
    namespace=non_empty,
    app=text,
    version=text,
    labels=st.dictionaries(non_empty, text, max_size=4),
    locality=text,
)
hellos = st.builds(
    Hello,
    node=nodes,
    credential=text,
    versions=st.dictionaries(resource_type, non_empty, max_size=4),
    protocol_version=st.integers(1, 5),
)
pushes = st.builds(
    Push,
    version=non_empty,
    nonce=non_empty,
    resources=st.dictionaries(resource_type, st.lists(resource, max_size=3), max_size=4),
)
messages = st.one_of(
    hellos,
    pushes,
    st.builds(Ack, nonce=non_empty, version=non_empty),
    st.builds(Nack, nonce=non_empty, version=non_empty, error=non_empty),
    st.builds(Refused, reason=non_empty),
    st.builds(Ping, id=ids),
    st.builds(Pong, id=ids),
)


def example_hello() -> Hello:
    return Hello(
        node=Node(
            id="reviews-v1-7d9f.default",
            workload="reviews-v1",
            namespace="default",
            app="reviews",
            version="v1",
            labels={"app": "reviews", "version": "v1"},
            locality="eu-west/eu-west-1a",
        ),
        credential="join-token-abc",
        versions={"routes": "7", "clusters": "7"},
    )


def example_push() -> Push:
    return Push(
        version="8",
        nonce="n-1",
        resources={"routes": [{"name": "reviews", "cluster": "reviews-v1"}], "clusters": []},
    )


# -- messages -------------------------------------------------------------


class RoundTripTests(SynchronousTestCase):
    """
    Every message survives C{to_json}/C{from_json} and C{encode}/decode.
    """

    def test_examples(self) -> None:
        """
        One hand-written example of each message round-trips through JSON and
        through the framing, and carries its C{type}.
        """
        examples = [
            example_hello(),
            example_push(),
            Ack(nonce="n-1", version="8"),
            Nack(nonce="n-1", version="8", error="route reviews: unknown cluster"),
            Refused(reason="invalid credential"),
            Ping(id=1),
            Pong(id=1),
        ]
        for message in examples:
            obj = message.to_json()
            self.assertEqual(obj["type"], message.TYPE)
            self.assertEqual(type(message).from_json(obj), message)
            self.assertEqual(message_from_json(json.loads(json.dumps(obj))), message)
            self.assertEqual(ChannelDecoder().receive_data(encode(message)), [message])

    def test_hello_defaults(self) -> None:
        """
        A minimal C{Hello} speaks L{PROTOCOL_VERSION} with no credential and
        no versions, and a minimal node's optional fields default.
        """
        hello = Hello.from_json({"type": "hello", "protocol_version": 1, "node": {"id": "p1"}})
        self.assertEqual(hello.protocol_version, PROTOCOL_VERSION)
        self.assertEqual(hello.credential, "")
        self.assertEqual(hello.versions, {})
        self.assertEqual(hello.node, Node(id="p1"))

    def test_unknown_keys_ignored(self) -> None:
        """
        Keys a message does not define are ignored, so a newer peer may add
        optional fields.
        """
        self.assertEqual(
            message_from_json({"type": "ack", "nonce": "n", "version": "1", "future": True}),
            Ack(nonce="n", version="1"),
        )

    def test_messages_are_values(self) -> None:
        """
        Messages are frozen and hashable even with mapping fields.
        """
        push = example_push()
        self.assertEqual(hash(push), hash(example_push()))
        self.assertRaises(AttributeError, setattr, push, "version", "9")

    @BOUNDED
    @given(messages)
    def test_round_trip_property(self, message) -> None:
        """
        Any valid message round-trips through JSON and the framing.
        """
        self.assertEqual(type(message).from_json(message.to_json()), message)
        self.assertEqual(ChannelDecoder().receive_data(encode(message)), [message])


class UnknownResourceTypeTests(SynchronousTestCase):
    """
    L{unknown_resource_types}.
    """

    def test_known(self) -> None:
        """
        A push of known types reports none.
        """
        self.assertEqual(unknown_resource_types(example_push()), [])

    def test_unknown(self) -> None:
        """
        Unknown types are accepted in the push and reported, sorted.
        """
        push = Push(version="1", nonce="n", resources={"wasm": [], "routes": [], "ratelimits": [{}]})
        self.assertEqual(unknown_resource_types(push), ["ratelimits", "wasm"])


class ValidationTests(SynchronousTestCase):
    """
    Invalid messages raise L{MessageValidationError}, a
    L{ChannelProtocolError}, naming the field.
    """

    def assertInvalid(self, obj: dict, field: str) -> MessageValidationError:
        e = self.assertRaises(MessageValidationError, message_from_json, obj)
        self.assertIsInstance(e, ChannelProtocolError)
        self.assertEqual(e.field, field)
        self.assertIn(field, str(e))
        self.assertEqual(e.message_type, obj["type"])
        return e

    def hello(self, **changes) -> dict:
        obj = example_hello().to_json()
        obj.update(changes)
        return obj

    def test_hello_fields(self) -> None:
        """
        Each C{Hello} field is checked, nested node fields by their path.
        """
        node = example_hello().node.to_json()
        self.assertInvalid(self.hello(protocol_version=0), "protocol_version")
        self.assertInvalid(self.hello(protocol_version="1"), "protocol_version")
        self.assertInvalid(self.hello(protocol_version=True), "protocol_version")
        self.assertInvalid(self.hello(credential=None), "credential")
        self.assertInvalid(self.hello(versions={"routes": 7}), "versions.routes")
        self.assertInvalid(self.hello(versions={"routes": ""}), "versions.routes")
        self.assertInvalid(self.hello(versions=[]), "versions")
        self.assertInvalid(self.hello(node=[]), "node")
        self.assertInvalid(self.hello(node={**node, "id": ""}), "node.id")
        self.assertInvalid(self.hello(node={**node, "namespace": 3}), "node.namespace")
        self.assertInvalid(self.hello(node={**node, "labels": {"app": 1}}), "node.labels.app")
        missing_id = dict(node)
        del missing_id["id"]
        self.assertInvalid(self.hello(node=missing_id), "node.id")

    def test_required(self) -> None:
        """
        A missing required field is named.
        """
        obj = self.hello()
        del obj["node"]
        e = self.assertInvalid(obj, "node")
        self.assertIn("required", str(e))
        self.assertInvalid({"type": "nack", "nonce": "n", "version": "1"}, "error")
        self.assertInvalid({"type": "ping"}, "id")

    def test_push_fields(self) -> None:
        """
        C{Push} needs a version, a nonce, and lists of objects per type.
        """
        ok = {"type": "push", "version": "1", "nonce": "n", "resources": {}}
        self.assertInvalid({**ok, "version": ""}, "version")
        self.assertInvalid({**ok, "nonce": 5}, "nonce")
        self.assertInvalid({**ok, "resources": []}, "resources")
        self.assertInvalid({**ok, "resources": {"routes": {}}}, "resources.routes")
        self.assertInvalid({**ok, "resources": {"routes": [{}, "x"]}}, "resources.routes[1]")
        self.assertInvalid({**ok, "resources": {"": []}}, "resources")

    def test_reply_fields(self) -> None:
        """
        C{Ack}, C{Nack}, C{Refused}, C{Ping} and C{Pong} fields are checked.
        """
        self.assertInvalid({"type": "ack", "nonce": "", "version": "1"}, "nonce")
        self.assertInvalid({"type": "nack", "nonce": "n", "version": "1", "error": ""}, "error")
        self.assertInvalid({"type": "refused", "reason": ""}, "reason")
        self.assertInvalid({"type": "ping", "id": -1}, "id")
        self.assertInvalid({"type": "pong", "id": 1.5}, "id")
        self.assertInvalid({"type": "pong", "id": 2**63}, "id")

    def test_construction(self) -> None:
        """
        Constructing a message directly validates too.
        """
        e = self.assertRaises(MessageValidationError, Nack, nonce="n", version="1", error="")
        self.assertEqual(e.field, "error")
        e = self.assertRaises(MessageValidationError, Node, id="")
        self.assertEqual(e.field, "id")

    def test_unknown_type(self) -> None:
        """
        An unknown or missing C{type} is a protocol error naming it.
        """
        e = self.assertRaises(ChannelProtocolError, message_from_json, {"type": "subscribe"})
        self.assertIn("'subscribe'", e.reason)
        self.assertRaises(ChannelProtocolError, message_from_json, {})
        self.assertRaises(ChannelProtocolError, message_from_json, {"type": 1})

    def test_wrong_type_for_class(self) -> None:
        """
        A class's C{from_json} refuses another message's C{type}.
        """
        e = self.assertRaises(MessageValidationError, Ack.from_json, Ping(id=1).to_json())
        self.assertEqual(e.field, "type")


# -- framing --------------------------------------------------------------


class FramingTests(SynchronousTestCase):
    """
    L{encode} and L{ChannelDecoder}.
    """

    def test_wire_format(self) -> None:
        """
        A frame is a 4-byte big-endian length and compact UTF-8 JSON.
        """
        data = encode(Refused(reason="café"))
        body = '{"type":"refused","reason":"café"}'.encode()
        self.assertEqual(data, struct.pack(">I", len(body)) + body)

    def test_byte_by_byte(self) -> None:
        """
        A frame fed one byte at a time yields its message with the last byte
        and nothing before.
        """
        message = example_hello()
        data = encode(message)
        decoder = ChannelDecoder()
        for i in range(len(data) - 1):
            self.assertEqual(decoder.receive_data(data[i : i + 1]), [])
        self.assertEqual(decoder.receive_data(data[-1:]), [message])
        self.assertEqual(decoder.buffered, 0)

    def test_several_frames_per_call(self) -> None:
        """
        Several frames in one call yield all their messages in order; a
        trailing partial frame is kept for the next call.
        """
        sent = [example_push(), Ping(id=1), Ack(nonce="n", version="1")]
        data = b"".join(encode(m) for m in sent)
        tail = encode(Pong(id=1))
        decoder = ChannelDecoder()
        self.assertEqual(decoder.receive_data(data + tail[:3]), sent)
        self.assertEqual(decoder.buffered, 3)
        self.assertEqual(decoder.receive_data(tail[3:]), [Pong(id=1)])

    def test_empty_data(self) -> None:
        """
        Feeding no bytes yields no messages.
        """
        self.assertEqual(ChannelDecoder().receive_data(b""), [])

    @BOUNDED
    @given(st.lists(messages, min_size=1, max_size=5), st.data())
    def test_random_chunks(self, sent, data) -> None:
        """
        Frames cut at arbitrary points yield exactly the messages sent.
        """
        stream = b"".join(encode(m) for m in sent)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        decoder = ChannelDecoder()
        received = []
        start = 0
        for cut in [*cuts, len(stream)]:
            received.extend(decoder.receive_data(stream[start:cut]))
            start = cut
        self.assertEqual(received, sent)
        self.assertEqual(decoder.buffered, 0)

    def test_oversize_prefix_detected_early(self) -> None:
        """
        A length over the limit is refused as soon as the 4 prefix bytes
        arrive, before any body.
        """
        decoder = ChannelDecoder(max_message_bytes=100)
        self.assertEqual(decoder.receive_data(struct.pack(">I", 101)[:3]), [])
        e = self.assertRaises(ChannelProtocolError, decoder.receive_data, struct.pack(">I", 101)[3:])
        self.assertIn("101", e.reason)
        self.assertIn("100", e.reason)

    def test_limit_is_inclusive(self) -> None:
        """
        A body of exactly the limit is accepted.
        """
        body = json.dumps({"type": "refused", "reason": "x"}).encode()
        decoder = ChannelDecoder(max_message_bytes=len(body))
        self.assertEqual(decoder.receive_data(frame(body)), [Refused(reason="x")])

    def test_default_limit(self) -> None:
        """
        The default limit is 4 MiB.
        """
        self.assertEqual(MAX_MESSAGE_BYTES, 4 * 1024 * 1024)
        self.assertEqual(ChannelDecoder().max_message_bytes, MAX_MESSAGE_BYTES)
        self.assertRaises(ChannelProtocolError, ChannelDecoder().receive_data, struct.pack(">I", MAX_MESSAGE_BYTES + 1))

    def test_encode_oversize(self) -> None:
        """
        L{encode} refuses a message the receiver would refuse.
        """
        push = Push(version="1", nonce="n", resources={"routes": [{"name": "x" * 200}]})
        e = self.assertRaises(ChannelProtocolError, encode, push, max_message_bytes=100)
        self.assertIn("100", e.reason)

    def test_encode_not_json(self) -> None:
        """
        L{encode} refuses values JSON cannot carry, or UTF-8 cannot.
        """
        push = Push(version="1", nonce="n", resources={"routes": [{"weight": float("nan")}]})
        self.assertRaises(ChannelProtocolError, encode, push)
        self.assertRaises(ChannelProtocolError, encode, Refused(reason="\ud800"))

    def assertBadFrame(self, data: bytes, words: str) -> None:
        decoder = ChannelDecoder()
        e = self.assertRaises(ChannelProtocolError, decoder.receive_data, data)
        self.assertIn(words, e.reason)
        # The decoder stays broken: the channel must close.
        self.assertRaises(ChannelProtocolError, decoder.receive_data, encode(Ping(id=1)))

    def test_invalid_utf8(self) -> None:
        """
        A body that is not UTF-8 is a protocol error.
        """
        self.assertBadFrame(frame(b'{"type":"refused","reason":"\xff"}'), "UTF-8")

    def test_invalid_json(self) -> None:
        """
        A body that is not JSON, an empty body, or JSON's non-standard
        constants are protocol errors.
        """
        self.assertBadFrame(frame(b'{"type":'), "JSON")
        self.assertBadFrame(frame(b""), "JSON")
        self.assertBadFrame(frame(b'{"type":"ping","id":NaN}'), "JSON")
        self.assertBadFrame(frame(b"[" * 100_000), "JSON")

    def test_not_an_object(self) -> None:
        """
        A JSON value other than an object is a protocol error.
        """
        self.assertBadFrame(frame_json([1, 2]), "object")
        self.assertBadFrame(frame_json("ping"), "object")

    def test_unknown_type(self) -> None:
        """
        An unknown C{type} is a protocol error naming it.
        """
        self.assertBadFrame(frame_json({"type": "subscribe"}), "subscribe")

    def test_invalid_message(self) -> None:
        """
        A message failing validation is a protocol error naming the field.
        """
        self.assertBadFrame(frame_json({"type": "nack", "nonce": "n", "version": "1", "error": ""}), "error")

    def test_error_after_good_frames(self) -> None:
        """
        A bad frame after good ones in the same call raises; the channel is
        closing, so the good ones are not delivered.
        """
        decoder = ChannelDecoder()
        data = encode(Ping(id=1)) + frame(b"nope")
        self.assertRaises(ChannelProtocolError, decoder.receive_data, data)
        self.assertEqual(decoder.buffered, 0)


# -- pilot bookkeeping ----------------------------------------------------


class ProxySyncStateTests(SynchronousTestCase):
    """
    L{ProxySyncState}: the pilot's per-proxy record.
    """

    def test_initial(self) -> None:
        """
        Before any push nothing is recorded.
        """
        state = ProxySyncState("p1")
        self.assertEqual(state.status, SyncStatus.NOT_SENT)
        self.assertIsNone(state.acked_version)

    def test_push_then_ack(self) -> None:
        """
        A push makes the proxy STALE; its ACK makes it SYNCED.
        """
        state = ProxySyncState("p1")
        state.pushed("1", "n1")
        self.assertEqual(state.status, SyncStatus.STALE)
        self.assertEqual((state.pushed_version, state.pushed_nonce), ("1", "n1"))
        self.assertTrue(state.acked("n1", "1"))
        self.assertEqual(state.status, SyncStatus.SYNCED)
        self.assertEqual(state.acked_version, "1")

    def test_nack(self) -> None:
        """
        A NACK records the error and the rejected version and leaves the last
        ACKed version; a later ACKed push makes it SYNCED but keeps the error
        for the operator.
        """
        state = ProxySyncState("p1")
        state.pushed("1", "n1")
        state.acked("n1", "1")
        state.pushed("2", "n2")
        self.assertTrue(state.nacked("n2", "2", "bad route"))
        self.assertEqual(state.status, SyncStatus.NACKED)
        self.assertEqual(state.acked_version, "1")
        self.assertEqual(state.nacked_version, "2")
        self.assertEqual(state.last_nack_error, "bad route")
        state.pushed("3", "n3")
        self.assertEqual(state.status, SyncStatus.STALE)
        state.acked("n3", "3")
        self.assertEqual(state.status, SyncStatus.SYNCED)
        self.assertEqual(state.last_nack_error, "bad route")

    def test_stale_nonce_ignored(self) -> None:
        """
        A reply to a push overtaken by a newer one is ignored, ACK or NACK.
        """
        state = ProxySyncState("p1")
        state.pushed("1", "n1")
        state.pushed("2", "n2")
        self.assertFalse(state.acked("n1", "1"))
        self.assertFalse(state.nacked("n1", "1", "late"))
        self.assertEqual(state.status, SyncStatus.STALE)
        self.assertIsNone(state.acked_version)
        self.assertIsNone(state.last_nack_error)
        self.assertTrue(state.acked("n2", "2"))
        self.assertEqual(state.acked_version, "2")

    def test_reply_before_push_ignored(self) -> None:
        """
        A reply when nothing was pushed is ignored.
        """
        state = ProxySyncState("p1")
        self.assertFalse(state.acked("n1", "1"))
        self.assertEqual(state.status, SyncStatus.NOT_SENT)

    def test_version_mismatch(self) -> None:
        """
        A reply naming the current nonce with another version is a protocol
        error.
        """
        state = ProxySyncState("p1")
        state.pushed("2", "n2")
        self.assertRaises(ChannelProtocolError, state.acked, "n2", "1")
        self.assertRaises(ChannelProtocolError, state.nacked, "n2", "1", "x")
        self.assertEqual(state.status, SyncStatus.STALE)
