"""
Route matching time with 1,000 routes: L{txmesh.proxy.router.RouteTable}.

Pure CPU, no sockets and no reactor.  Times C{RouteTable.match(head)} per
call for tables shaped like a large mesh and prints microseconds per match
and the ratio to a one-route table measured in the same run:

  - (a) 1,000 virtual hosts of one route each: the host is found through a
    dict keyed by domain (and C{match} caches authority -> virtual host),
    so the first, middle and last host cost the same as a one-host table.
    C{virtual_host()} is timed too, which bypasses that cache and shows the
    domain index alone.
  - (b) one virtual host with 1,000 prefix routes, the matching one first,
    middle or last, and none matching: routes within a virtual host are a
    first-match linear scan, so time grows with the routes scanned.
  - (c) 1,000 hosts x 10 routes: flat in hosts, linear in the <= 10 routes
    scanned within the host.
  - (d) for contrast, 1,000 suffix-wildcard hosts (C{*.svc-NNNN.example}):
    wildcards are tried longest first in a list, so C{virtual_host()} is a
    scan; C{match} hides it behind the authority cache.

Each figure is the best of C{--repeat} runs of a loop calibrated to take
about C{--target} seconds, timed with L{time.perf_counter}.  The figures
include the Python loop around each call (a few tens of nanoseconds).
Measurements, not tests: no timing is asserted and it always exits 0.

Run from the repository root (about 4 s; pin a CPU for steadier figures)::

    taskset -c 0 .venv/bin/python benchmarks/routes.py
    .venv/bin/python benchmarks/routes.py --quick          # smoke: about 1 s
    .venv/bin/python benchmarks/routes.py --repeat 9 --target 0.05
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from txmesh.config.model import Route, RouteMatch, VirtualHost  # noqa: E402
from txmesh.proxy.router import RouteTable  # noqa: E402
from txmesh.proxy.stream import Headers, RequestHead  # noqa: E402

N = 1000


def host(i: int) -> str:
    return f"svc-{i}.ns-{i % 17}.svc.cluster.local"


def wildcard(i: int) -> str:
    # Zero-padded: wildcards are tried longest first, and equal lengths keep
    # their order, so index i is the i-th tried.
    return f"*.svc-{i:04d}.example"


def route(i: int, cluster: str = "app") -> Route:
    return Route(f"r{i}", RouteMatch(prefix=f"/api/r{i}/".encode()), cluster=cluster)


def head(authority: str, path: str) -> RequestHead:
    return RequestHead(
        b"GET", path.encode(), authority.encode(),
        Headers([(b"host", authority.encode()), (b"user-agent", b"bench"), (b"accept", b"*/*")]),
    )


def per_call(fn: Callable[[RequestHead], object], arg: object, repeat: int, target: float) -> float:
    """
    @return: the best time per call of C{fn(arg)} in microseconds.
    """
    number = 64
    while True:  # calibrate: grow the loop until one run takes ~target
        t0 = time.perf_counter()
        for _ in range(number):
            fn(arg)
        elapsed = time.perf_counter() - t0
        if elapsed >= target / 4 or number >= 1 << 22:
            break
        number *= 4
    number = max(1, int(number * target / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best / number * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=7, help="runs per case; the best is reported (default 7)")
    p.add_argument("--target", type=float, default=0.02, help="seconds per run (default 0.02)")
    p.add_argument("--quick", action="store_true", help="smoke test: --repeat 2 --target 0.003")
    a = p.parse_args(argv)
    if a.quick:
        a.repeat, a.target = 2, 0.003

    one = RouteTable([VirtualHost("one", (host(0),), (route(0),))])
    hosts = RouteTable([VirtualHost(f"vh{i}", (host(i),), (route(0),)) for i in range(N)])
    routes = RouteTable([VirtualHost("big", (host(0),), tuple(route(i) for i in range(N)))])
    grid = RouteTable([VirtualHost(f"vh{i}", (host(i),), tuple(route(j) for j in range(10))) for i in range(N)])
    wild = RouteTable([VirtualHost(f"w{i}", (wildcard(i),), (route(0),)) for i in range(N)])

    # (section, case, routes scanned, fn, arg, the route or virtual host name it must find)
    rows: list[tuple[str, str, int, Callable, object, str | None]] = [
        ("baseline", "1 host x 1 route: match()", 1, one.match, head(host(0), "/api/r0/items"), "r0"),
        ("baseline", "1 host: virtual_host() uncached", 0, one.virtual_host, host(0).encode(), "one"),
    ]
    places = (("first", 0), ("middle", N // 2), ("last", N - 1))
    for label, i in places:
        rows.append(("(a) 1,000 hosts x 1 route", f"host {label}: match()", 1,
                     hosts.match, head(host(i), "/api/r0/items"), "r0"))
    for label, i in places:
        rows.append(("(a) 1,000 hosts x 1 route", f"host {label}: virtual_host() uncached", 0,
                     hosts.virtual_host, host(i).encode(), f"vh{i}"))
    for label, i in places:
        rows.append(("(b) 1 host x 1,000 routes", f"route {label} (#{i + 1})", i + 1,
                     routes.match, head(host(0), f"/api/r{i}/items"), f"r{i}"))
    rows.append(("(b) 1 host x 1,000 routes", "no route matches (NR)", N,
                 routes.match, head(host(0), "/other/items"), None))
    for hlabel, hi in places:
        for rlabel, ri in (("first", 0), ("last", 9)):
            rows.append(("(c) 1,000 hosts x 10 routes", f"host {hlabel}, route {rlabel} (#{ri + 1})", ri + 1,
                         grid.match, head(host(hi), f"/api/r{ri}/items"), f"r{ri}"))
    for label, i in places:
        rows.append(("(d) 1,000 wildcard hosts", f"{label} {wildcard(i)}: virtual_host() uncached", 0,
                     wild.virtual_host, f"api{wildcard(i)[1:]}".encode(), f"w{i}"))
    rows.append(("(d) 1,000 wildcard hosts", "middle: match() (authority cached)", 1,
                 wild.match, head(f"api{wildcard(N // 2)[1:]}", "/api/r0/items"), "r0"))

    # Every case must find what it claims to, or its timing means nothing.
    for section, case, _scanned, fn, arg, expect in rows:
        result = fn(arg)
        if (result.name if result is not None else None) != expect:
            raise SystemExit(f"benchmark setup error: {section} / {case} found {result!r}, not {expect!r}")

    print(f"route matching, {platform.python_implementation()} {platform.python_version()}, "
          f"best of {a.repeat} runs of ~{a.target * 1000:.0f} ms each")
    base_match = base_lookup = 0.0
    section_seen = None
    print(f"\n{'case':56} {'scanned':>8} {'us/call':>9} {'ratio':>8}")
    for section, case, scanned, fn, arg, _expect in rows:
        us = per_call(fn, arg, a.repeat, a.target)
        if case == "1 host x 1 route: match()":
            base_match = us
        elif case == "1 host: virtual_host() uncached":
            base_lookup = us
        base = base_match if fn.__name__ == "match" else base_lookup
        if section != section_seen:
            print(section)
            section_seen = section
        print(f"  {case:54} {scanned if scanned else '-':>8} {us:9.3f} {us / base:7.2f}x")
    print("\nratio: against the one-host, one-route table's match() (or virtual_host() for those rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
