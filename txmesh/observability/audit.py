"""
The authorization audit log: one JSON object per line for every request the
C{authz} filter denies and every request an AUDIT policy matches.

A record looks like::

    {"time": "2026-11-25T17:06:08.123Z", "source_principal": "spiffe://cluster.local/ns/other/sa/app",
     "source_ip": "10.0.0.7", "destination": {"host": "web.example.com", "port": 8080},
     "method": "GET", "path": "/admin", "policy": "web/deny-admin", "decision": "DENY",
     "action": "DENY", "request_id": "5f0c...", "reason": "matched DENY policy web/deny-admin"}

Writes go to a file opened for appending with line buffering, so each
record is one C{write} and reaches the file at once; nothing waits.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import IO, Any

import attrs

from txmesh.observability.log_writer import LogWriter

__all__ = ["AuditLog", "AuditRecord", "iso8601"]


def iso8601(seconds: float) -> str:
    """
    @return: C{seconds} since the epoch as ISO 8601 UTC with milliseconds,
        e.g. C{2026-11-25T17:06:08.123Z}.
    """
    when = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@attrs.frozen
class AuditRecord:
    """
    One audited request.

    @ivar time: when, in seconds since the epoch (from the stream's clock).
    @ivar decision: C{ALLOW} or C{DENY}.
    @ivar action: the action of the policy that caused the record (C{DENY},
        C{AUDIT}), or C{None} when no policy matched (an ALLOW-only
        workload's default deny).
    @ivar policy: C{namespace/name} of that policy, or C{None}.
    """

    time: float
    source_principal: str | None
    source_ip: str | None
    host: str | None
    port: int | None
    method: str | None
    path: str | None
    policy: str | None
    decision: str
    action: str | None
    request_id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """
        @return: the record as the log writes it.
        """
        return {
            "time": iso8601(self.time),
            "source_principal": self.source_principal,
            "source_ip": self.source_ip,
            "destination": {"host": self.host, "port": self.port},
            "method": self.method,
            "path": self.path,
            "policy": self.policy,
            "decision": self.decision,
            "action": self.action,
            "request_id": self.request_id,
            "reason": self.reason,
        }


class AuditLog:
    """
    Writes L{AuditRecord}s as JSON lines, through a L{LogWriter} (stdout
    or a file, line-buffered, failures counted and logged, never raised:
    auditing does not fail requests).
    """

    def __init__(self, output: IO[str] | LogWriter, name: str = "<stream>", owned: bool = False):
        """
        @param output: a text stream to write lines to, or a L{LogWriter}.
        @param name: what to call a stream in error messages.
        @param owned: whether L{close} closes a stream.
        """
        self._writer = output if isinstance(output, LogWriter) else LogWriter(output, name, owned)
        self.name = self._writer.name

    @classmethod
    def open(cls, path: str) -> AuditLog:
        """
        @param path: a file to append to (created if missing), or C{"-"}
            for standard output.
        @raise OSError: if the file cannot be opened.
        """
        return cls(LogWriter.open(path))

    def write(self, record: AuditRecord) -> None:
        """
        Write one record.
        """
        self._writer.write_line(json.dumps(record.to_json(), separators=(",", ":"), sort_keys=False) + "\n")

    def close(self) -> None:
        """
        Close the file (not standard output).
        """
        self._writer.close()


class AuditLogs:
    """
    The audit logs filters write to, one per path, shared by every config
    that names it: a reload parses filter configs again and must not open
    the file again.
    """

    def __init__(self) -> None:
        self._logs: dict[str, AuditLog] = {}

    def get(self, path: str) -> AuditLog:
        """
        @return: the audit log writing to C{path} (C{"-"}: standard output),
            opened on first use.
        @raise OSError: if the file cannot be opened.
        """
        log = self._logs.get(path)
        if log is None:
            log = self._logs[path] = AuditLog.open(path)
        return log

    def from_config(self, section: Any) -> AuditLog | None:
        """
        Read a filter config's C{audit} section: C{{path: FILE}} or C{{path:
        "-"}}; C{None} for no audit log.

        @raise FilterConfigError: naming C{audit.path} or the unknown field.
        """
        from txmesh.config.errors import FilterConfigError

        if section is None:
            return None
        if not isinstance(section, Mapping):
            raise FilterConfigError("audit", "expected a mapping like {path: FILE}")
        for key in section:
            if key != "path":
                raise FilterConfigError(f"audit.{key}", "unknown field (expected: path)")
        path = section.get("path")
        if not isinstance(path, str) or not path:
            raise FilterConfigError("audit.path", "expected a file name, or '-' for standard output")
        try:
            return self.get(path)
        except OSError as e:
            raise FilterConfigError("audit.path", f"cannot open {path}: {e.strerror}") from None

