"""
Tests for L{txmesh.observability.access_log} (records, the two formats,
the filter predicate) and L{txmesh.observability.log_writer}.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from txmesh.observability.access_log import (
    MAX_PATH_LENGTH,
    AccessRecord,
    LogFilter,
    LogFilterError,
    TCPAccessRecord,
    format_json,
    format_line,
    format_text,
)
from txmesh.observability.log_writer import LogWriter, LogWriters

# 2016-04-15T20:17:00.310Z, Envoy's documented sample line.
ENVOY_SAMPLE_TIME = 1460751420.310

SAMPLE = AccessRecord(
    start_time=ENVOY_SAMPLE_TIME,
    method="POST",
    path="/api/v1/locations",
    protocol="HTTP/2",
    response_code=204,
    response_flags=(),
    bytes_received=154,
    bytes_sent=0,
    duration_ms=226,
    upstream_service_time="100",
    x_forwarded_for="10.0.35.28",
    user_agent="nsq2http",
    request_id="cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2",
    authority="locations",
    upstream_host="10.0.2.1:80",
    upstream_cluster="locations",
    downstream_remote_address="10.0.35.28:51234",
    route_name="default",
)


class TextFormatTests(SynchronousTestCase):
    """
    L{format_text} is Envoy's default format string, byte for byte.
    """

    def test_envoy_sample(self) -> None:
        """
        Envoy's documented sample request formats to Envoy's documented line
        (the upstream host without the C{tcp://} scheme old versions wrote).
        """
        self.assertEqual(
            format_text(SAMPLE),
            '[2016-04-15T20:17:00.310Z] "POST /api/v1/locations HTTP/2" 204 - 154 0 226 100 "10.0.35.28" '
            '"nsq2http" "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2" "locations" "10.0.2.1:80"\n',
        )

    def test_missing_values_are_dashes(self) -> None:
        """
        Every unknown or empty value is C{-}, as Envoy writes unset values;
        a request with no response head has code C{0}.
        """
        record = AccessRecord(start_time=0.0, method="GET", path="/", protocol="HTTP/1.1", user_agent="",
                              response_flags=("DC",))
        self.assertEqual(
            format_text(record),
            '[1970-01-01T00:00:00.000Z] "GET / HTTP/1.1" 0 DC 0 0 0 - "-" "-" "-" "-" "-"\n',
        )

    def test_cases(self) -> None:
        """
        A table of single-field variations on the sample: each changes
        exactly one token of the line.
        """
        base = format_text(SAMPLE)
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"response_flags": ("URX", "UF")}, " 204 - ", " 204 URX,UF "),
            ({"response_flags": ("UO",), "response_code": 503}, " 204 - ", " 503 UO "),
            ({"upstream_service_time": None}, " 226 100 ", " 226 - "),
            ({"x_forwarded_for": "1.2.3.4, 10.0.35.28"}, '"10.0.35.28"', '"1.2.3.4, 10.0.35.28"'),
            ({"upstream_host": None}, '"10.0.2.1:80"', '"-"'),
            ({"path": "/a?b=c d"}, "/api/v1/locations", "/a?b=c d"),
            ({"protocol": "HTTP/1.0"}, " HTTP/2\"", " HTTP/1.0\""),
            ({"user_agent": 'evil\r\n[forged] "GET'}, '"nsq2http"', '"evil\\x0d\\x0a[forged] "GET"'),
        ]
        for change, old, new in cases:
            record = AccessRecord(**{**_asdict(SAMPLE), **change})
            self.assertEqual(format_text(record), base.replace(old, new, 1), change)

    def test_long_path_capped(self) -> None:
        """
        A path longer than L{MAX_PATH_LENGTH} is cut and ends in C{...}.
        """
        record = AccessRecord(start_time=0.0, path="/" + "a" * 10000)
        line = format_text(record)
        path = line.split(" ")[2]
        self.assertEqual(len(path), MAX_PATH_LENGTH)
        self.assertTrue(path.endswith("..."))

    def test_tcp(self) -> None:
        """
        A TCP connection is Envoy's default line with C{"- - -"} for the
        request line, C{0} for the code and C{-} for the HTTP fields.
        """
        record = TCPAccessRecord(start_time=ENVOY_SAMPLE_TIME, duration_ms=1500, bytes_received=12,
                                 bytes_sent=34, upstream_host="10.0.2.1:5432", upstream_cluster="db",
                                 downstream_remote_address="10.0.0.7:40000", route_name="pg")
        self.assertEqual(
            format_text(record),
            '[2016-04-15T20:17:00.310Z] "- - -" 0 - 12 34 1500 - "-" "-" "-" "-" "10.0.2.1:5432"\n',
        )
        failed = TCPAccessRecord(start_time=ENVOY_SAMPLE_TIME, response_flags=("UF",), upstream_host="10.0.2.1:5432")
        self.assertEqual(
            format_text(failed),
            '[2016-04-15T20:17:00.310Z] "- - -" 0 UF 0 0 0 - "-" "-" "-" "-" "10.0.2.1:5432"\n',
        )


def _asdict(record: AccessRecord) -> dict[str, Any]:
    return attrs.asdict(record, recurse=False)


class JSONFormatTests(SynchronousTestCase):
    """
    L{format_json} writes Istio's field names, one object per line.
    """

    def test_fields(self) -> None:
        """
        Every field has Istio's name; numbers are numbers, unknown values are
        C{null}, keys are sorted, and the line ends in a newline.
        """
        line = format_json(SAMPLE)
        self.assertTrue(line.endswith("}\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(json.loads(line), {
            "authority": "locations",
            "bytes_received": 154,
            "bytes_sent": 0,
            "connection_termination_details": None,
            "downstream_peer_principal": None,
            "downstream_remote_address": "10.0.35.28:51234",
            "duration": 226,
            "method": "POST",
            "path": "/api/v1/locations",
            "protocol": "HTTP/2",
            "request_id": "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2",
            "response_code": 204,
            "response_flags": "-",
            "route_name": "default",
            "start_time": "2016-04-15T20:17:00.310Z",
            "trace_id": None,
            "upstream_cluster": "locations",
            "upstream_host": "10.0.2.1:80",
            "upstream_service_time": "100",
            "user_agent": "nsq2http",
            "x_forwarded_for": "10.0.35.28",
        })
        keys = list(json.loads(line))
        self.assertEqual(keys, sorted(keys))

    def test_flags_and_identity(self) -> None:
        """
        Flags are comma-separated; the peer principal and trace id are kept.
        """
        record = AccessRecord(start_time=0.0, response_flags=("URX", "UT"), response_code=504,
                              downstream_peer_principal="spiffe://cluster.local/ns/a/sa/b",
                              trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
        value = json.loads(format_json(record))
        self.assertEqual(value["response_flags"], "URX,UT")
        self.assertEqual(value["downstream_peer_principal"], "spiffe://cluster.local/ns/a/sa/b")
        self.assertEqual(value["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736")

    def test_newlines_escaped(self) -> None:
        """
        A value with a newline cannot split the JSON line.
        """
        line = format_json(AccessRecord(start_time=0.0, user_agent="a\nb"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(json.loads(line)["user_agent"], "a\nb")

    def test_tcp(self) -> None:
        """
        A TCP record has the same keys; the HTTP ones are C{null} and the
        code is C{0}.
        """
        record = TCPAccessRecord(start_time=0.0, duration_ms=7, bytes_received=1, bytes_sent=2,
                                 response_flags=("UH",), upstream_cluster="db", route_name="pg",
                                 downstream_remote_address="127.0.0.1:5")
        value = json.loads(format_json(record))
        self.assertEqual(set(value), set(json.loads(format_json(SAMPLE))))
        self.assertEqual(value["response_code"], 0)
        self.assertEqual(value["response_flags"], "UH")
        self.assertIsNone(value["method"])
        self.assertIsNone(value["protocol"])
        self.assertEqual((value["duration"], value["bytes_received"], value["bytes_sent"]), (7, 1, 2))
        self.assertEqual(value["upstream_cluster"], "db")

    def test_format_line(self) -> None:
        """
        L{format_line} picks the format by name and refuses others.
        """
        self.assertEqual(format_line(SAMPLE, "text"), format_text(SAMPLE))
        self.assertEqual(format_line(SAMPLE, "json"), format_json(SAMPLE))
        self.assertRaises(ValueError, format_line, SAMPLE, "xml")


def _record(code: int = 200, flags: tuple[str, ...] = ()) -> AccessRecord:
    return AccessRecord(start_time=0.0, response_code=code, response_flags=flags)


class LogFilterTests(SynchronousTestCase):
    """
    L{LogFilter}: which records are written.
    """

    def test_table(self) -> None:
        """
        Status ranges, any-of flags and C{errors_only}, alone and together.
        """
        cases: list[tuple[Any, AccessRecord | TCPAccessRecord, bool]] = [
            ({}, _record(200), True),
            ({"status": {"min": 400}}, _record(399), False),
            ({"status": {"min": 400}}, _record(400), True),
            ({"status": {"min": 500, "max": 599}}, _record(503, ("UO",)), True),
            ({"status": {"max": 499}}, _record(503), False),
            ({"flags": ["UO", "UT"]}, _record(504, ("UT",)), True),
            ({"flags": ["UO", "UT"]}, _record(503, ("UF",)), False),
            ({"flags": ["UO"]}, _record(200), False),
            ({"errors_only": True}, _record(200), False),
            ({"errors_only": True}, _record(404, ("NR",)), True),
            ({"errors_only": True}, _record(200, ("DI",)), True),
            ({"errors_only": True}, _record(403), True),
            ({"errors_only": False}, _record(200), True),
            ({"status": {"min": 500}, "flags": ["UO"]}, _record(503, ("UF",)), False),
            ({"status": {"min": 500}, "flags": ["UO"]}, _record(503, ("UO",)), True),
            ({"errors_only": True}, TCPAccessRecord(start_time=0.0), False),
            ({"errors_only": True}, TCPAccessRecord(start_time=0.0, response_flags=("UF",)), True),
            ({"flags": ["UH"]}, TCPAccessRecord(start_time=0.0, response_flags=("UH",)), True),
        ]
        for raw, record, expected in cases:
            log_filter = LogFilter.from_config(raw)
            self.assertEqual(log_filter.matches(record), expected, (raw, record))

    def test_none(self) -> None:
        """
        No section: no filter.
        """
        self.assertIsNone(LogFilter.from_config(None))

    def test_errors(self) -> None:
        """
        Bad sections are refused, naming the field.
        """
        cases = [
            ("400", ""),
            ({"status": 400}, "status"),
            ({"status": {"min": "400"}}, "status.min"),
            ({"status": {"min": 99}}, "status.min"),
            ({"status": {"max": True}}, "status.max"),
            ({"status": {"least": 400}}, "status.least"),
            ({"status": {"min": 500, "max": 400}}, "status"),
            ({"flags": "UO"}, "flags"),
            ({"flags": ["UO", "XX"]}, "flags[1]"),
            ({"errors_only": "yes"}, "errors_only"),
            ({"codes": [500]}, "codes"),
        ]
        for raw, field in cases:
            with self.assertRaises(LogFilterError, msg=repr(raw)) as raised:
                LogFilter.from_config(raw)
            self.assertEqual(raised.exception.field, field, raw)


class _Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


class LogWriterTests(SynchronousTestCase):
    """
    L{LogWriter} and L{LogWriters}.
    """

    def path(self) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return os.path.join(directory, "access.log")

    def test_file_lines_visible_at_once(self) -> None:
        """
        A line written to a file is in the file as soon as the call returns.
        """
        writers = LogWriters()
        self.addCleanup(writers.close)
        path = self.path()
        writer = writers.get(path)
        self.assertTrue(writer.write_line("one\n"))
        with open(path) as f:
            self.assertEqual(f.read(), "one\n")
        self.assertEqual(writer.lines_written, 1)

    def test_shared_per_path(self) -> None:
        """
        One writer per file, however the path is spelled.
        """
        writers = LogWriters()
        self.addCleanup(writers.close)
        path = self.path()
        relative = os.path.relpath(path)
        self.assertIs(writers.get(path), writers.get(relative))
        self.assertIs(writers.get("-"), writers.get("-"))

    def test_failures_counted_not_raised(self) -> None:
        """
        A failing write returns false, is counted and logged once, and never
        raises.
        """
        writer = LogWriter(_Broken(), "broken")
        self.assertFalse(writer.write_line("a\n"))
        self.assertFalse(writer.write_line("b\n"))
        self.assertEqual((writer.write_failures, writer.lines_written), (2, 0))

    def test_closed_file(self) -> None:
        """
        Writing to a closed file is a counted failure too.
        """
        writers = LogWriters()
        writer = writers.get(self.path())
        writers.close()
        self.assertFalse(writer.write_line("late\n"))
        self.assertEqual(writer.write_failures, 1)

    def test_stream_flushed(self) -> None:
        """
        A stream that is not line-buffered is flushed after each line.
        """
        raw = io.BytesIO()
        stream = io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")
        writer = LogWriter(stream)
        writer.write_line("x\n")
        self.assertEqual(raw.getvalue(), b"x\n")
