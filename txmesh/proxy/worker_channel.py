"""
The channel between C{twistd txmesh-proxy --concurrency N}'s parent and its
worker processes: length-prefixed JSON messages over the worker's pipes
(sans-IO framing here; the processes around it are in
L{txmesh.proxy.workers} and L{txmesh.proxy.worker}).

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON, a
mapping with a C{"type"}.  Parent to worker (the worker's standard input):

  - C{config}: C{document} (the parsed YAML document, validated by the
    parent), C{source} (its file name, against which relative paths
    resolve), C{version} (the parent's config version); the first also
    C{identity}: the C{identity} message below, or C{None}.
  - C{identity}: C{spiffe_id}, C{material} (C{key}, C{chain}, C{roots}:
    PEM text, or C{None} before the pilot signed a certificate): the
    workload identity the parent holds, sent at start and on every change.
  - C{admin}: C{id}, C{page} (C{metrics}, C{clusters}, C{config_dump}).

Worker to parent (the worker's file descriptor 3):

  - C{ready}: C{pid}, C{version}.
  - C{applied}: C{version}, C{ok}, C{error} (C{None} when C{ok}).
  - C{admin}: C{id}, C{body} (text for C{metrics}, else a JSON value).

The pipe is private to the two processes, which is why the workload
identity's private key may travel on it: it never goes through the
environment or a file.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_FRAME = 64 * 1024 * 1024
"""
The largest message accepted (a config document or a metrics page).
"""

_LENGTH = struct.Struct(">I")


class FrameError(Exception):
    """
    The other side sent something that is not a frame of this channel;
    C{str()} says what.
    """


def encode(message: dict[str, Any]) -> bytes:
    """
    @param message: a JSON-serialisable mapping with a C{"type"}.
    @return: its frame.
    @raise FrameError: it has no C{type}, or is larger than L{MAX_FRAME}.
    """
    if not isinstance(message.get("type"), str):
        raise FrameError("a message needs a string 'type'")
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """
    Turns the bytes of the channel, in pieces of any size, into messages.
    """

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """
        @return: the messages C{data} completes, in order.
        @raise FrameError: a frame is too long or not a JSON mapping with a
            string C{type}; the channel cannot be trusted after that.
        """
        self._buffer += data
        out = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self._max:
                raise FrameError(f"frame of {length} bytes is over the {self._max}-byte limit")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_LENGTH.size:end])
            del self._buffer[:end]
            try:
                message = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise FrameError(f"frame is not UTF-8 JSON ({e})") from None
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise FrameError("frame is not a mapping with a string 'type'")
            out.append(message)
        return out

    @property
    def pending(self) -> int:
        """
        @return: bytes received that do not yet make a whole frame.
        """
        return len(self._buffer)


def read_message(fd: int, max_frame: int = MAX_FRAME) -> dict[str, Any] | None:
    """
    Read exactly one message from C{fd}, blocking (a worker reads its first
    config this way, before its reactor runs; what follows stays unread).

    @return: the message, or C{None} at end of file before a whole frame.
    @raise FrameError: as L{FrameDecoder.feed}.
    """
    import os

    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(_LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes is over the {max_frame}-byte limit")
    body = exactly(length)
    if body is None:
        return None
    messages = FrameDecoder(max_frame).feed(header + body)
    return messages[0]
