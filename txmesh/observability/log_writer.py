"""
Where access log lines go: standard output or a file, one line per C{write}.

A file is opened for appending with line buffering, so each line reaches
the file (one C{write(2)}) as soon as it is written and nothing waits.  A
write that fails (disk full, file closed) is counted and logged, never
raised: logging must not fail a request.

L{LogWriters} keeps one writer per path, shared by every config that names
it, so a config reload neither reopens a file nor interleaves two handles
on it.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from twisted.logger import Logger

__all__ = ["STDOUT", "LogWriter", "LogWriters"]

STDOUT = "-"
"""
The path that means standard output.
"""


class LogWriter:
    """
    Writes lines to one text stream.

    @ivar name: the path, or C{<stdout>}.
    @ivar lines_written: lines written so far.
    @ivar write_failures: writes that failed; each failed line is lost.
    """

    log = Logger()

    def __init__(self, output: IO[str], name: str = "<stream>", owned: bool = False):
        """
        @param output: a text stream to write lines to.
        @param name: what to call it in error messages.
        @param owned: whether L{close} closes C{output}.
        """
        self._output = output
        self.name = name
        self._owned = owned
        # A stream that is not line-buffered (standard output into a pipe)
        # is flushed after each line, so lines are not held back.
        self._flush = not getattr(output, "line_buffering", False)
        self.lines_written = 0
        self.write_failures = 0

    @classmethod
    def open(cls, path: str) -> LogWriter:
        """
        @param path: a file to append to (created if missing), or C{"-"}
            for the process's standard output (the real one: twistd may have
            pointed C{sys.stdout} at its own log).
        @raise OSError: if the file cannot be opened.
        """
        if path == STDOUT:
            return cls(sys.__stdout__ or sys.stdout, "<stdout>")
        return cls(open(path, "a", buffering=1, encoding="utf-8"), path, owned=True)

    def write_line(self, line: str) -> bool:
        """
        Write one line (which ends in C{\\n}).  Never raises.

        @return: whether the write succeeded.
        """
        try:
            self._output.write(line)
            if self._flush:
                self._output.flush()
        except Exception as e:  # noqa: BLE001 (logging must never fail a request)
            self.write_failures += 1
            # The first failure, then every thousandth: a full disk must not
            # turn every request into a log event too.
            if self.write_failures % 1000 == 1:
                self.log.error("log {name}: write failed ({failures} so far): {error}",
                               name=self.name, failures=self.write_failures, error=e)
            return False
        self.lines_written += 1
        return True

    def close(self) -> None:
        """
        Close the file (never standard output).
        """
        if self._owned:
            self._output.close()


class LogWriters:
    """
    The writers access logs use, one per path, opened on first use and
    shared by every config that names the path.
    """

    def __init__(self) -> None:
        self._writers: dict[str, LogWriter] = {}

    def get(self, path: str) -> LogWriter:
        """
        @param path: a file, or C{"-"} for standard output.
        @return: the writer for C{path}; relative paths that name the same
            file share one writer.
        @raise OSError: if the file cannot be opened.
        """
        key = path if path == STDOUT else os.path.abspath(path)
        writer = self._writers.get(key)
        if writer is None:
            writer = self._writers[key] = LogWriter.open(key)
        return writer

    def close(self) -> None:
        """
        Close every file opened so far.
        """
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.close()
