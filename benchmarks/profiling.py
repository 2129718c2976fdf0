"""
Where a proxy spends its CPU under load: py-spy samples one process while the
caller applies load, and the samples are folded into the top functions by
self time (the function on top of the stack) and by total time (anywhere on
the stack).

py-spy is a PyPI package (`pip install py-spy`); it attaches with ptrace, so
it needs root or `kernel.yama.ptrace_scope=0`. Without it the profile is
C{None} and the benchmark says why.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PY_SPY = str(Path(sys.executable).parent / "py-spy")
TOP = 15


def py_spy() -> str | None:
    """@return: the py-spy executable, or C{None}."""
    return PY_SPY if os.path.exists(PY_SPY) else shutil.which("py-spy")


# A sample whose innermost Python frame is the reactor's poll is the process
# waiting in epoll_wait: idle, not work.
IDLE = re.compile(r"^\w*Reactor\.doPoll \(|^\w*Reactor\.doIteration \(")


OURS = re.compile(r"^(.*) \((txmesh/[^:]*):\d+\)$")


def fold(raw: str, top: int = TOP) -> dict:
    """
    Fold py-spy's C{--format raw} output (C{frame;frame;... count} per line,
    outermost frame first) into the top functions.

    @return: C{{"samples": n, "idle": share waiting in the reactor's poll,
        "self": [[frame, share], ...], "total": [[frame, share], ...],
        "txmesh": [[function (file), share], ...]}}, the shares being of the
        busy samples; C{txmesh} is inclusive, for txmesh's own functions.
    """
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    ours: collections.Counter = collections.Counter()
    samples = idle = 0
    for line in raw.splitlines():
        m = re.fullmatch(r"(.*) (\d+)", line.strip())
        if not m:
            continue
        frames, count = m.group(1).split(";"), int(m.group(2))
        samples += count
        if IDLE.match(frames[-1]):
            idle += count
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
        # txmesh's own functions, lines merged: where the time goes, inclusive.
        for function in {OURS.sub(r"\1 (\2)", f) for f in frames if OURS.match(f)}:
            ours[function] += count
    busy = samples - idle
    if not busy:
        return {"samples": samples, "idle": 1.0 if samples else 0.0, "self": [], "total": [], "txmesh": []}
    return {
        "samples": samples,
        "idle": idle / samples,
        "self": [[f, n / busy] for f, n in own.most_common(top)],
        "total": [[f, n / busy] for f, n in total.most_common(top)],
        "txmesh": [[f, n / busy] for f, n in ours.most_common(top)],
    }


def profile_under_load(proc, seconds: int, out: Path, load) -> dict | None:
    """
    Sample C{proc} with py-spy for C{seconds} while C{load()} runs.

    @param proc: a L{http1.Proc} (its C{pid} is the Python process).
    @param load: a callable that applies about C{seconds} of load and returns.
    @return: L{fold}'s result plus C{"pid"}, or C{{"error": why}}.
    """
    spy = py_spy()
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    argv = [spy, "record", "--pid", str(proc.pid), "--duration", str(seconds), "--rate", "250",
            "--format", "raw", "--output", str(out), "--nonblocking"]
    with open(out.with_suffix(".log"), "wb") as log:
        spying = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            load()
        finally:
            try:
                spying.wait(seconds + 20)
            except subprocess.TimeoutExpired:
                spying.kill()
                spying.wait()
    if not out.exists():
        why = out.with_suffix(".log").read_text(errors="replace").strip().splitlines()
        return {"error": f"py-spy wrote no profile: {why[-1] if why else 'no output'}"}
    return {"pid": proc.pid, "seconds": seconds} | fold(out.read_text(errors="replace"))


def print_profile(name: str, profile: dict) -> None:
    """Print the top entries of a L{profile_under_load} result."""
    if "error" in profile:
        print(f"profile of {name}: {profile['error']}")
        return
    print(f"profile of {name} under load (py-spy, {profile['samples']} samples, {profile['idle']:.0%} idle in "
          "epoll), top by self time, share of the busy samples:")
    for frame, share in profile["self"]:
        print(f"  {share:6.1%}  {frame}")
    print(f"profile of {name}: txmesh functions by total time (inclusive):")
    for frame, share in profile["txmesh"]:
        print(f"  {share:6.1%}  {frame}")
