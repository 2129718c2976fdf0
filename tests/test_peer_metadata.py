"""
L{txmesh.observability.peer_metadata}: the x-txmesh-peer encoding.  Garbage
in gives "unknown", never an exception.
"""

from twisted.trial.unittest import SynchronousTestCase

from txmesh.observability.peer_metadata import (
    MAX_HEADER_LENGTH,
    NO_PEER,
    PeerMetadata,
    clean,
    decode,
    encode,
)

U = "unknown"

DECODE_CASES = {
    "round_trip": (b"w=reviews-v1;n=default;a=reviews;v=v1", PeerMetadata("reviews-v1", "default", "reviews", "v1")),
    "str_input": ("w=a;n=b;a=c;v=d", PeerMetadata("a", "b", "c", "d")),
    "order_free_and_spaces": (b" v=v2 ; a=web;w=web-v2;n=prod", PeerMetadata("web-v2", "prod", "web", "v2")),
    "missing_fields": (b"w=web", PeerMetadata("web", U, U, U)),
    "bad_chars": (b"w=we b;n=a\"b;a=x{y};v=1.0_rc-1", PeerMetadata(U, U, U, "1.0_rc-1")),
    "empty_value": (b"w=;n=ns", PeerMetadata(U, "ns", U, U)),
    "unknown_keys_ignored": (b"x=1;w=web;path=/a", PeerMetadata("web", U, U, U)),
    "first_of_duplicates": (b"w=one;w=two", PeerMetadata("one", U, U, U)),
    "value_too_long": (b"w=" + b"a" * 129, PeerMetadata(U, U, U, U)),
    "value_at_limit": (b"w=" + b"a" * 128, PeerMetadata("a" * 128, U, U, U)),
    "header_too_long": (b"w=web;" + b"x" * MAX_HEADER_LENGTH, NO_PEER),
    "none": (None, NO_PEER),
    "empty": (b"", NO_PEER),
    "not_ascii": ("w=wéb".encode(), NO_PEER),
    "binary": (b"\x00\xff\xfe", NO_PEER),
    "no_equals": (b"web;default", NO_PEER),
    "separators_only": (b";;;===", NO_PEER),
    "equals_in_value": (b"w=a=b;n=ns", PeerMetadata(U, "ns", U, U)),
    "not_a_string": (12, NO_PEER),
}


class DecodeTests(SynchronousTestCase):
    pass


def _decode_case(raw, expected):
    def test(self):
        self.assertEqual(decode(raw), expected)
    return test


for _name, (_raw, _expected) in DECODE_CASES.items():
    setattr(DecodeTests, f"test_{_name}", _decode_case(_raw, _expected))


class EncodeTests(SynchronousTestCase):
    def test_encode(self):
        self.assertEqual(encode("web-v1", "prod", "web", "v1"), b"w=web-v1;n=prod;a=web;v=v1")

    def test_invalid_values_sent_as_unknown(self):
        self.assertEqual(encode("a;b", "", "x=y", "v" * 200), b"w=unknown;n=unknown;a=unknown;v=unknown")

    def test_round_trip(self):
        self.assertEqual(decode(encode("w", "n", "a", "v")), PeerMetadata("w", "n", "a", "v"))

    def test_clean(self):
        for value, expected in [("ok-1.2_x", "ok-1.2_x"), ("", U), (None, U), (3, U), ("a b", U), ("ä", U)]:
            self.assertEqual(clean(value), expected, value)
