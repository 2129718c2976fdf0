"""
Istio's Bookinfo traffic management on txmesh, with numbers.

Starts sample backends for Bookinfo's services on 127.0.0.1:19080-19086
(C{examples/demo/services.py --role backend}: each answers JSON naming its
version), and one txmesh-proxy routing from the Istio documents of this
directory (C{proxy.yaml}: outbound listener :19090, admin :19099).  Then it
sends traffic through the outbound listener and counts what happened:

  0. host names: C{reviews}, C{reviews.default}, the FQDN with its port;
  1. the reviews canary (90% v1, 10% v2) over 2,000 requests;
  2. the A/B rule: C{end-user: jason} always sees v2;
  3. fault injection: ratings for jason is delayed 2 s;
  4. circuit breaking: a burst of 200 concurrent requests to reviews
     overflows C{http1MaxPendingRequests: 32} (503, flag C{UO});
  5. retries and outlier detection: one of ratings' two replicas is killed,
     every request still succeeds, the dead one is ejected after 3 errors;
  6. the v3 rollout: the proxy reloads (SIGHUP) C{proxy-v3-rollout.yaml}
     and reviews splits 75% v1 / 25% v3 over 2,000 requests.

Run it with the virtualenv's Python (the children need Twisted and txmesh)::

    .venv/bin/python examples/bookinfo/walkthrough.py           # run, print, stop
    .venv/bin/python examples/bookinfo/walkthrough.py --check   # also assert; exit 0 or 1
    .venv/bin/python examples/bookinfo/walkthrough.py --stay    # run, then keep the mesh up

Logs go to C{.demo/bookinfo/} (C{$TXMESH_BOOKINFO_DIR} to change).  Every
child is stopped at the end, on Ctrl-C and on SIGTERM.  This file uses only
the standard library, like C{examples/demo/demo.py}.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# The demo's process handling (children that die with us, signals as Stop,
# busy-port checks) serves the walkthrough too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo"))
from demo import Stop, _die_with_parent, _on_signal, busy_ports  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STATE_DIR = os.environ.get("TXMESH_BOOKINFO_DIR") or os.path.join(ROOT, ".demo", "bookinfo")
START_TIMEOUT = float(os.environ.get("TXMESH_BOOKINFO_START_TIMEOUT", "20"))

HOST = "127.0.0.1"
OUTBOUND = 19090
INBOUND = 19091
ADMIN = 19099

# The workloads of services.yaml: (name, version, port).
BACKENDS = (
    ("productpage-v1", "v1", 19080),
    ("details-v1", "v1", 19081),
    ("reviews-v1", "v1", 19082),
    ("reviews-v2", "v2", 19083),
    ("reviews-v3", "v3", 19084),
    ("ratings-v1", "v1", 19085),
    ("ratings-v1-b", "v1", 19086),
)
PORTS = sorted([p for _, _, p in BACKENDS] + [OUTBOUND, INBOUND, ADMIN])

# Files the proxy's config names, by paths relative to it: the state
# directory holds symlinks to them, and proxy.yaml there points at the
# config in force, so the rollout is a symlink swap and a SIGHUP.
ISTIO_FILES = ("services.yaml", "destination-rules.yaml", "virtual-services.yaml", "reviews-v3-rollout.yaml")

CANARY_REQUESTS = 2000  # ±3% is then 4.5 standard deviations of a 90/10 split
AB_REQUESTS = 100
BURST = 200
OUTAGE_REQUESTS = 200
ROLLOUT_REQUESTS = 2000
TOLERANCE = 0.03  # of the share of each version
MIN_DELAY = 1.9  # seconds; the fault injects 2s


# --- processes ----------------------------------------------------------------


class Child:
    """
    One process: a sample backend (ready when its port accepts) or the
    proxy (ready when its admin C{/ready} answers 200).
    """

    def __init__(self, name: str, argv: list[str], ready: Callable[[], bool]):
        self.name = name
        self.argv = argv
        self.ready = ready
        self.process: subprocess.Popen | None = None
        self.log = os.path.join(STATE_DIR, name + ".log")

    def start(self, env: dict[str, str]) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=STATE_DIR,
                env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))  # noqa: PLW1509 (no threads)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """
        Signal the child's process group and wait for it; SIGKILL after
        C{grace} seconds.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        _signal_group(process.pid, sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(5)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _twistd() -> list[str]:
    python = sys.executable
    twistd = os.path.join(os.path.dirname(python), "twistd")
    if os.path.exists(twistd):
        return [twistd]
    return [python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def backend(name: str, version: str, port: int) -> Child:
    argv = [sys.executable, os.path.join(ROOT, "examples", "demo", "services.py"),
            "--role", "backend", "--version", version, "--port", str(port)]
    return Child(name, argv, lambda: _port_open(port))


def proxy() -> Child:
    argv = _twistd() + ["-n", "--pidfile=", "-r", "txmesh", "txmesh-proxy",
                        "--config", os.path.join(STATE_DIR, "proxy.yaml"), "--drain-timeout", "1"]
    return Child("proxy", argv, lambda: http_get(ADMIN, "/ready", timeout=1.0)[0] == 200)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def use_config(name: str) -> None:
    """
    Point the state directory's C{proxy.yaml} at C{examples/bookinfo/NAME}
    (atomically, so a reload never sees a missing file).
    """
    tmp = os.path.join(STATE_DIR, "proxy.yaml.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join(HERE, name), tmp)
    os.replace(tmp, os.path.join(STATE_DIR, "proxy.yaml"))


def prepare_state() -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    for name in ISTIO_FILES:
        link = os.path.join(STATE_DIR, name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.join(HERE, name), link)
    for name in os.listdir(STATE_DIR):
        if name.endswith(".log"):
            os.unlink(os.path.join(STATE_DIR, name))
    use_config("proxy.yaml")


def wait_ready(children: list[Child], timeout: float) -> str | None:
    """
    @return: C{None} once every child is ready, else what went wrong.
    """
    deadline = time.monotonic() + timeout
    pending = list(children)
    while pending:
        for c in list(pending):
            code = c.process.poll()
            if code is not None:
                return f"{c.name} exited with status {code} while starting; its log ({c.log}):\n{tail(c.log)}"
            if c.ready():
                pending.remove(c)
        if not pending:
            return None
        if time.monotonic() > deadline:
            return f"not ready after {timeout:.0f}s: {', '.join(c.name for c in pending)}"
        time.sleep(0.05)
    return None


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines[-n:])


# --- HTTP ---------------------------------------------------------------------


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """
    One request on a new connection.

    @return: C{(status, headers, body)}; status 0 if the request failed.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except (OSError, http.client.HTTPException):
        return 0, {}, b""
    finally:
        conn.close()


class Client:
    """
    Requests through the proxy's outbound listener on one keep-alive
    connection (reopened if it breaks), as an app calling its sidecar.
    """

    def __init__(self, port: int = OUTBOUND, timeout: float = 10.0):
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, host: str, path: str, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", path, headers={"Host": host, **(headers or {})})
                response = self.conn.getresponse()
                body = response.read()
                result = response.status, {k.lower(): v for k, v in response.getheaders()}, body
                if response.will_close:
                    self.close()
                return result
            except (OSError, http.client.HTTPException):
                # A keep-alive connection the proxy closed: one fresh try.
                self.close()
                if attempt == 2:
                    return 0, {}, b""
        return 0, {}, b""

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def version_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return "?"
    return doc.get("version", "?") if isinstance(doc, dict) else "?"


def outcome(status: int, headers: dict[str, str], body: bytes) -> str:
    """
    @return: C{v1}/C{v2}/C{v3} for a 200 from a backend, else the status
        and response flags, e.g. C{503 UO}.
    """
    if status == 200:
        return version_of(body)
    flags = headers.get("x-txmesh-flags", "")
    return f"{status} {flags}".strip() if status else "no response"


def count(client: Client, n: int, host: str, path: str, headers: dict[str, str] | None = None
          ) -> tuple[collections.Counter, collections.Counter, float]:
    """
    @return: outcomes, values of C{x-reviews-route}, and seconds taken.
    """
    outcomes: collections.Counter = collections.Counter()
    routes: collections.Counter = collections.Counter()
    began = time.monotonic()
    for _ in range(n):
        status, resp_headers, body = client.get(host, path, headers)
        outcomes[outcome(status, resp_headers, body)] += 1
        routes[resp_headers.get("x-reviews-route", "-")] += 1
    return outcomes, routes, time.monotonic() - began


def burst(n: int, host: str, path: str) -> collections.Counter:
    """
    Open C{n} connections, then send one request on each as fast as
    possible, so they reach the proxy together.

    @return: the outcomes.
    """
    socks = []
    outcomes: collections.Counter = collections.Counter()
    try:
        for _ in range(n):
            socks.append(socket.create_connection((HOST, OUTBOUND), timeout=10))
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("ascii")
        for s in socks:
            s.sendall(request)
        for s in socks:
            response = http.client.HTTPResponse(s)
            try:
                response.begin()
                body = response.read()
                headers = {k.lower(): v for k, v in response.getheaders()}
                outcomes[outcome(response.status, headers, body)] += 1
            except (OSError, http.client.HTTPException):
                outcomes["no response"] += 1
            finally:
                response.close()
    finally:
        for s in socks:
            s.close()
    return outcomes


def admin_json(path: str) -> Any:
    status, _, body = http_get(ADMIN, path)
    if status != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def endpoint_stats(cluster_suffix: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """
    @return: the C{upstream_requests} of the cluster whose name ends with
        C{cluster_suffix} and its endpoints' counters by address.
    """
    clusters = admin_json("/clusters") or {}
    for name, c in clusters.items():
        if name.endswith(cluster_suffix):
            return c["upstream_requests"], {e["address"]: e for e in c["endpoints"]}
    return 0, {}


# --- the walkthrough ----------------------------------------------------------


def share(counts: collections.Counter, key: str, total: int) -> float:
    return counts.get(key, 0) / total if total else 0.0


def show_counts(counts: collections.Counter, total: int) -> str:
    return "  ".join(f"{k} {v:5d} ({100.0 * v / total:5.1f}%)" for k, v in sorted(counts.items()))


class Walkthrough:
    """
    The steps, each printing what it did and the numbers it saw; with
    C{check}, each also records whether the numbers are what the config says.
    """

    def __init__(self, check: bool, children: dict[str, Child], env: dict[str, str]):
        self.check = check
        self.children = children
        self.env = env
        self.failures: list[str] = []
        self.step = ""

    def title(self, text: str) -> None:
        self.step = text.split(":")[0]
        print(f"\n=== {text}")

    def say(self, text: str = "") -> None:
        print(text)
        sys.stdout.flush()

    def expect(self, ok: bool, what: str) -> None:
        if not self.check:
            return
        if ok:
            print(f"    check: ok: {what}")
        else:
            print(f"    check: FAILED: {what}")
            self.failures.append(f"{self.step}: {what}")
        sys.stdout.flush()

    def expect_share(self, counts: collections.Counter, total: int, version: str, expected: float) -> None:
        got = share(counts, version, total)
        self.expect(abs(got - expected) <= TOLERANCE,
                    f"{version} {100 * got:.1f}% is {100 * expected:.0f}% ± {100 * TOLERANCE:.0f}%")

    def run(self) -> None:
        self.hosts()
        self.canary()
        self.ab()
        self.fault()
        self.breaker()
        self.outage()
        self.rollout()

    def hosts(self) -> None:
        self.title("0. Host names: the Host header picks the service, as in Istio's sidecar")
        self.say("$ curl -s -H 'Host: NAME' http://127.0.0.1:19090/reviews/1")
        client = Client()
        for host in ("reviews", "reviews.default", "reviews.default.svc.cluster.local:9080", "details",
                     "ratings.default.svc", "nosuch"):
            status, headers, body = client.get(host, "/reviews/1")
            self.say(f"    Host: {host:40s} -> {outcome(status, headers, body)}")
            if host == "nosuch":
                self.expect(status == 404 and headers.get("x-txmesh-flags") == "NR", "an unknown host is 404 NR")
            else:
                self.expect(status == 200, f"Host {host} is routed")
        client.close()

    def canary(self) -> None:
        self.title(f"1. Canary: reviews v1 90% / v2 10% (virtual-services.yaml, route 'canary'), "
                   f"{CANARY_REQUESTS:,} requests")
        self.say("$ for i in $(seq 2000); do curl -s -H 'Host: reviews' http://127.0.0.1:19090/reviews/1 \\\n"
                 "      | grep -o '\"version\": \"v.\"'; done | sort | uniq -c")
        client = Client()
        counts, routes, took = count(client, CANARY_REQUESTS, "reviews", "/reviews/1")
        client.close()
        self.say(f"    {CANARY_REQUESTS} requests in {took:.1f}s: {show_counts(counts, CANARY_REQUESTS)}")
        self.say(f"    x-reviews-route: {dict(routes)}")
        self.expect_share(counts, CANARY_REQUESTS, "v1", 0.90)
        self.expect_share(counts, CANARY_REQUESTS, "v2", 0.10)
        self.expect(counts.get("v1", 0) + counts.get("v2", 0) == CANARY_REQUESTS, "only v1 and v2, all 200")

    def ab(self) -> None:
        self.title(f"2. A/B: 'end-user: jason' always sees v2 (route 'jason-sees-v2'), {AB_REQUESTS} requests")
        self.say("$ curl -s -H 'Host: reviews' -H 'end-user: jason' http://127.0.0.1:19090/reviews/1")
        client = Client()
        counts, routes, _ = count(client, AB_REQUESTS, "reviews", "/reviews/1", {"end-user": "jason"})
        others, _, _ = count(client, AB_REQUESTS, "reviews", "/reviews/1", {"end-user": "ana"})
        client.close()
        self.say(f"    end-user: jason  {show_counts(counts, AB_REQUESTS)}   x-reviews-route: {dict(routes)}")
        self.say(f"    end-user: ana    {show_counts(others, AB_REQUESTS)}   (the canary)")
        self.expect(counts == collections.Counter({"v2": AB_REQUESTS}), "every request of jason went to v2")
        self.expect(routes == collections.Counter({"jason-v2": AB_REQUESTS}),
                    "the route's response header x-reviews-route: jason-v2 was set")

    def fault(self) -> None:
        self.title("3. Fault injection: ratings for jason is delayed 2s (route 'jason-delayed'; "
                   "the fault filter is inserted automatically)")
        self.say("$ time curl -s -i -H 'Host: ratings' -H 'end-user: jason' http://127.0.0.1:19090/ratings/0")
        results = {}
        for user in ("jason", "ana"):
            client = Client()
            began = time.monotonic()
            status, headers, body = client.get("ratings", "/ratings/0", {"end-user": user})
            took = time.monotonic() - began
            client.close()
            results[user] = (status, headers, took)
            self.say(f"    end-user: {user:6s} -> {status} {version_of(body)} in {took:.3f}s, "
                     f"x-txmesh-flags: {headers.get('x-txmesh-flags', '-')}")
        status, headers, took = results["jason"]
        self.expect(status == 200 and took >= MIN_DELAY, f"jason's request took {took:.2f}s >= {MIN_DELAY}s")
        self.expect(headers.get("x-txmesh-flags") == "DI", "flag DI (delay injected) on jason's response")

    def breaker(self) -> None:
        self.title(f"4. Circuit breaking: {BURST} concurrent requests to reviews; its DestinationRule allows "
                   f"http1MaxPendingRequests: 32")
        self.say(f"    ({BURST} connections open first, then one request on each, all at once)")
        counts = burst(BURST, "reviews", "/reviews/1")
        self.say(f"    {show_counts(counts, BURST)}")
        overflow = counts.get("503 UO", 0)
        served = sum(v for k, v in counts.items() if k.startswith("v"))
        self.say(f"    {served} served, {overflow} refused at once by the breaker (503, x-txmesh-flags: UO); "
                 f"nothing queued beyond the limit")
        self.expect(overflow > 0, "some requests overflowed: 503 UO")
        self.expect(served > 0 and served + overflow == BURST, "every other request was served")
        client = Client()
        status, _, _ = client.get("reviews", "/reviews/1")
        client.close()
        self.expect(status == 200, "after the burst, requests are served again")

    def outage(self) -> None:
        self.title("5. Retries and outlier detection: ratings-v1-b (127.0.0.1:19086) is killed; "
                   f"{OUTAGE_REQUESTS} requests to ratings")
        self.say("    ratings: retries {attempts: 3, retryOn: 5xx,connect-failure,reset}; "
                 "outlierDetection {consecutiveGatewayErrors: 3, baseEjectionTime: 15s, maxEjectionPercent: 50}")
        dead = f"{HOST}:19086"
        tries_before, eps = endpoint_stats("ratings.default.svc.cluster.local")
        failures_before = eps.get(dead, {}).get("connect_failures", 0)
        self.children["ratings-v1-b"].stop(signal.SIGKILL)
        self.say(f"$ kill -9 <ratings-v1-b>; then {OUTAGE_REQUESTS} x curl -s -H 'Host: ratings' "
                 f"http://127.0.0.1:19090/ratings/0")
        client = Client()
        counts, _, took = count(client, OUTAGE_REQUESTS, "ratings", "/ratings/0")
        client.close()
        tries_after, eps = endpoint_stats("ratings.default.svc.cluster.local")
        failures = eps.get(dead, {}).get("connect_failures", 0) - failures_before
        tries = tries_after - tries_before
        self.say(f"    {OUTAGE_REQUESTS} requests in {took:.1f}s: {show_counts(counts, OUTAGE_REQUESTS)}")
        self.say(f"    upstream tries: {tries} for {OUTAGE_REQUESTS} requests; connect failures to {dead}: "
                 f"{failures}")
        self.say("    each failed try was retried on 127.0.0.1:19085; after 3 gateway errors in a row "
                 "19086 was ejected, so no request tried it again")
        self.expect(counts == collections.Counter({"v1": OUTAGE_REQUESTS}), "every request succeeded")
        self.expect(1 <= failures <= 3, f"{failures} connect failures (ejected after at most 3)")
        self.expect(tries == OUTAGE_REQUESTS + failures, "one extra try per failure: the retries")
        # Bring the replica back (outlier detection keeps it out until its
        # ejection ends), so the mesh is whole again.
        c = self.children["ratings-v1-b"]
        c.start(self.env)
        problem = wait_ready([c], START_TIMEOUT)
        self.say(f"    ratings-v1-b restarted ({'ready' if problem is None else problem}); it rejoins "
                 "when its 15s ejection ends")

    def rollout(self) -> None:
        self.title(f"6. Rollout: proxy-v3-rollout.yaml (reviews v1 75% / v3 25%), applied by SIGHUP; "
                   f"{ROLLOUT_REQUESTS:,} requests")
        proxy_child = self.children["proxy"]
        before = (admin_json("/config_dump") or {}).get("version")
        use_config("proxy-v3-rollout.yaml")
        os.kill(proxy_child.process.pid, signal.SIGHUP)
        self.say(f"$ ln -sf .../proxy-v3-rollout.yaml {os.path.relpath(STATE_DIR, ROOT)}/proxy.yaml; "
                 f"kill -HUP <proxy>")
        deadline = time.monotonic() + 10
        version = before
        while time.monotonic() < deadline:
            version = (admin_json("/config_dump") or {}).get("version")
            if version != before:
                break
            time.sleep(0.05)
        self.say(f"    config version {before} -> {version} (admin /config_dump)")
        self.expect(version == (before or 0) + 1, "the proxy applied the new config")
        client = Client()
        counts, routes, took = count(client, ROLLOUT_REQUESTS, "reviews", "/reviews/1")
        jason, _, _ = count(client, 20, "reviews", "/reviews/1", {"end-user": "jason"})
        client.close()
        self.say(f"    {ROLLOUT_REQUESTS} requests in {took:.1f}s: {show_counts(counts, ROLLOUT_REQUESTS)}")
        self.say(f"    end-user: jason: {show_counts(jason, 20)}")
        self.expect_share(counts, ROLLOUT_REQUESTS, "v1", 0.75)
        self.expect_share(counts, ROLLOUT_REQUESTS, "v3", 0.25)
        self.expect(counts.get("v1", 0) + counts.get("v3", 0) == ROLLOUT_REQUESTS, "only v1 and v3, all 200")
        self.expect(jason == collections.Counter({"v2": 20}), "jason still sees v2")


# --- main -------------------------------------------------------------------------


def _say(line: str) -> None:
    try:
        print(line, flush=True)
    except OSError:
        pass


def run(check: bool, stay: bool) -> int:
    if importlib.util.find_spec("twisted") is None:
        print(f"walkthrough: {sys.executable} has no Twisted; run it with the virtualenv's Python: "
              f".venv/bin/python {os.path.relpath(__file__)}", file=sys.stderr)
        return 1
    busy = busy_ports(PORTS)
    if busy:
        print(f"walkthrough: port(s) {', '.join(map(str, busy))} on {HOST} are in use (Bookinfo needs "
              f"{PORTS[0]}-{PORTS[-1]}); see: ss -ltnp | grep ':190'", file=sys.stderr)
        return 1
    children = {name: backend(name, version, port) for name, version, port in BACKENDS}
    children["proxy"] = proxy()
    env = child_env()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    began = time.monotonic()
    try:
        prepare_state()
        print(f"walkthrough: starting {', '.join(children)} (logs in {os.path.relpath(STATE_DIR)}/)")
        sys.stdout.flush()
        for c in children.values():
            c.start(env)
        problem = wait_ready(list(children.values()), START_TIMEOUT)
        if problem is not None:
            print(f"walkthrough: {problem}", file=sys.stderr)
            return 1
        print(f"walkthrough: ready in {time.monotonic() - began:.1f}s\n\n"
              f"  app ─► :{OUTBOUND} txmesh-proxy outbound (Istio routes from examples/bookinfo/*.yaml)\n"
              "            ├─ productpage v1 :19080   details v1 :19081\n"
              "            ├─ reviews v1 :19082   v2 :19083   v3 :19084\n"
              "            └─ ratings v1 :19085, :19086 (two replicas)\n"
              f"  admin: http://127.0.0.1:{ADMIN}/ (/ready /clusters /config_dump /stats/prometheus)")
        walk = Walkthrough(check, children, env)
        walk.run()
        took = time.monotonic() - began
        if check:
            if walk.failures:
                print(f"\nwalkthrough --check: FAILED ({len(walk.failures)}) in {took:.1f}s")
                for f in walk.failures:
                    print(f"  {f}")
                for c in children.values():
                    print(f"--- {c.name} ({c.log})\n{tail(c.log)}")
                return 1
            print(f"\nwalkthrough --check: OK in {took:.1f}s")
            return 0
        print(f"\nwalkthrough: done in {took:.1f}s")
        if stay:
            print("walkthrough: the mesh stays up (proxy-v3-rollout.yaml in force); Ctrl-C stops it.")
            sys.stdout.flush()
            while True:
                for c in children.values():
                    if not c.alive():
                        print(f"walkthrough: {c.name} exited unexpectedly; its log:\n{tail(c.log)}",
                              file=sys.stderr)
                        return 1
                time.sleep(0.5)
        return 0
    except Stop as e:
        _say(f"\nwalkthrough: {e} received")
        return 0 if not check else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _say("walkthrough: stopping all processes...")
        for c in children.values():
            if c.alive():
                _signal_group(c.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 6
        for c in children.values():
            if c.process is not None:
                try:
                    c.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.stop(signal.SIGKILL)
        _say("walkthrough: stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true",
                       help="assert each step's numbers; exit 0 if all hold, 1 if not")
    group.add_argument("--stay", action="store_true", help="keep the mesh up after the steps, until Ctrl-C")
    args = parser.parse_args(argv)
    return run(args.check, args.stay)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
