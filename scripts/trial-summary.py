#!/usr/bin/env python3
"""
Turn trial's closing summary into one plain line: C{N passed, N failed, N skipped}.

Reads trial's output on stdin and prints that line last. Trial closes a run
with C{PASSED} or C{FAILED}, optionally followed by counts in parentheses::

    PASSED (successes=12)
    PASSED (skips=2, successes=10)
    FAILED (skips=1, expectedFailures=1, failures=2, errors=1, unexpectedSuccesses=1, successes=7)

The counts are mapped as follows:
 - passed: successes
 - failed: failures + errors + unexpectedSuccesses
 - skipped: skips + expectedFailures (trial's "todo" tests that failed as expected)

If no summary is found (trial crashed, hung and was killed, or never started)
the line is C{0 passed, 1 failed, 0 skipped}. With C{--exit-status RC}, a
non-zero exit status of trial that the summary does not explain (for example
trial printed PASSED and then hung until killed by C{timeout}) counts as one
more failure, so the line and this script's exit status never disagree with
what happened.

Exit status: 0 when nothing failed and at least one test passed, 1 otherwise.

Usage::

    trial tests 2>&1 | tee log; scripts/trial-summary.py --exit-status "${PIPESTATUS[0]}" < log
"""

from __future__ import annotations

import argparse
import re
import sys

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SUMMARY = re.compile(r"^(PASSED|FAILED)(?: \(([a-zA-Z]+=\d+(?:, [a-zA-Z]+=\d+)*)\))?\s*$")
_KNOWN = {"successes", "skips", "expectedFailures", "failures", "errors", "unexpectedSuccesses"}


class Summary:
    """
    Counts from one trial run.

    @ivar found: whether trial's summary line was present at all.
    @ivar verdict: C{"PASSED"} or C{"FAILED"} as trial printed it, or C{None}.
    """

    def __init__(self, found: bool, verdict: str | None, counts: dict[str, int]) -> None:
        self.found = found
        self.verdict = verdict
        self.counts = counts
        self.passed = counts.get("successes", 0)
        self.failed = (
            counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
        )
        self.skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
        if not found:
            self.failed = max(self.failed, 1)
        elif verdict == "FAILED" and self.failed == 0:
            # trial said FAILED but with no count we know how to blame: do not call it green.
            self.failed = 1

    def line(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"

    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0


def parse(text: str) -> Summary:
    """
    Find the last trial summary line in C{text} and read its counts.

    @param text: trial's output (stdout and stderr, in any reporter).
    @return: the parsed L{Summary}; C{found} is false when there was none.
    """
    match = None
    for raw in text.splitlines():
        m = _SUMMARY.match(_ANSI.sub("", raw).strip())
        if m:
            match = m
    if match is None:
        return Summary(False, None, {})
    counts: dict[str, int] = {}
    if match.group(2):
        for pair in match.group(2).split(", "):
            key, _, value = pair.partition("=")
            counts[key] = counts.get(key, 0) + int(value)
    return Summary(True, match.group(1), counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--exit-status",
        type=int,
        default=None,
        help="trial's exit status; a non-zero status the summary does not explain counts as a failure",
    )
    args = parser.parse_args(argv)
    text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    summary = parse(text)
    notes = []
    if not summary.found:
        notes.append("trial printed no PASSED/FAILED summary (crashed, killed or never started)")
    else:
        unknown = sorted(set(summary.counts) - _KNOWN)
        if unknown:
            notes.append(f"unknown counts in trial summary ignored: {', '.join(unknown)}")
        if args.exit_status not in (None, 0) and summary.failed == 0:
            summary.failed = 1
            if args.exit_status in (124, 137):
                notes.append(
                    f"trial reported no failure but was killed (status {args.exit_status}, timeout?)"
                )
            else:
                notes.append(f"trial reported no failure but exited with status {args.exit_status}")
        if summary.passed + summary.failed == 0:
            notes.append("no test ran")
    for note in notes:
        print(f"trial-summary: {note}")
    print(summary.line(), flush=True)
    return 0 if summary.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
