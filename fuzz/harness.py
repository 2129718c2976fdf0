"""
What the fuzz scripts share: L{ByteSource}, which turns a fuzzer's input
into the choices a target makes (as atheris' C{FuzzedDataProvider} does,
but importable without atheris, so the hypothesis tests in
C{tests/test_fuzz.py} drive the very same targets), and L{main}, the
atheris entry point of every C{fuzz/*.py} script.

This module imports nothing from txmesh: atheris instruments only the
modules imported after it starts, inside L{main}.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
CORPUS_DIR = FUZZ_DIR / "corpus"
# Where a run keeps what it learns (new inputs, crash artifacts): out of the
# checked-in seed corpus, in the work tree's ignored build directory.
WORK_DIR = ROOT / "build" / "fuzz"


class ByteSource:
    """
    Hands out a fuzzer's input piece by piece.  Once the input is used up
    every choice is its smallest value (0, C{False}, C{b""}), so a target
    always terminates and short inputs stay meaningful.
    """

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes):
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        b = self._data[self._pos]
        self._pos += 1
        return b

    def boolean(self) -> bool:
        return bool(self.byte() & 1)

    def below(self, n: int) -> int:
        """
        @return: an integer in C{[0, n)} (two bytes of input when C{n} needs them).
        """
        if n <= 256:
            return self.byte() % n
        return ((self.byte() << 8) | self.byte()) % n

    def uint(self, size: int) -> int:
        """
        @return: an unsigned big-endian integer of C{size} bytes.
        """
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "big")

    def take(self, n: int) -> bytes:
        data = self._data[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def chunk(self, limit: int) -> bytes:
        """
        @return: up to C{limit} bytes, their number chosen by the input.
        """
        return self.take(self.below(limit + 1))

    def rest(self) -> bytes:
        data = self._data[self._pos:]
        self._pos = len(self._data)
        return data


def main(target_name: str, instrument: tuple[str, ...] = ("txmesh",)) -> None:
    """
    Run one target under atheris (libFuzzer).  libFuzzer's own options pass
    through (C{-max_total_time=60}, C{-runs=N}, C{-jobs=N}, a crash file to
    reproduce); without corpus directories on the command line the run
    reads the seeds in C{fuzz/corpus/<target>} and keeps new inputs in
    C{build/fuzz/<target>/corpus}, and crash artifacts go to
    C{build/fuzz/<target>/}.

    @param target_name: a function of L{fuzz.targets} taking C{bytes}.
    @param instrument: the packages whose coverage guides the fuzzer.
    """
    import atheris

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    argv = list(sys.argv)
    positional = [a for a in argv[1:] if not a.startswith("-")]
    work = WORK_DIR / target_name
    if not positional:
        (work / "corpus").mkdir(parents=True, exist_ok=True)
        argv += [str(work / "corpus"), str(CORPUS_DIR / target_name)]
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        work.mkdir(parents=True, exist_ok=True)
        argv.append(f"-artifact_prefix={work}{os.sep}")
    with atheris.instrument_imports(include=list(instrument)):
        from fuzz import targets
    target: Callable[[bytes], None] = getattr(targets, target_name)
    atheris.Setup(argv, target)
    atheris.Fuzz()
