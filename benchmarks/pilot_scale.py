#!/usr/bin/env python3
"""
Control-plane scale benchmark: one real pilot, N channel clients.

For each N of C{--proxies} (default 100 and 1000) it starts a fresh

  pilot   twistd -n txmesh-pilot --poll-interval 0.05, with a generated config
          dir: C{--services} (default 20) services, each a ServiceEntry (two
          endpoints, versions v1/v2), a DestinationRule (two subsets, traffic
          policy) and a VirtualService (a header route and a weighted v1/v2
          route), one file per service under istio/

and, in this process, N lightweight channel clients (a small Twisted
protocol on L{txmesh.pilot.messages}: C{Hello} with a unique node id, C{Ack}
for every C{Push}, C{Pong} for every C{Ping}), connected in batches.

It reports:

- pilot RSS per connected proxy: (VmRSS with N connected and ACKed - VmRSS
  before any connected) / N;
- push convergence: C{--changes} times (default 5), rewrite one
  VirtualService's weights (and bump its mtime) and time from the write to the
  moment the last client received the new push and wrote its ACK. The figure
  includes the pilot noticing the change (poll every 0.05 s, then its 0.1 s
  debounce), rebuilding every snapshot, pushing, and the clients' decoding;
  the time to the first client's receipt is reported too, to split it;
- synced: after each change, how many proxies C{GET /proxies} on the pilot's
  operator API shows C{SYNCED} at the new version (the lowest count of the
  changes).

It is a measurement, not a test: it exits 0 whether or not the goals
(convergence <= 1 s, RSS <= 1 MB per proxy) are met, and non-zero if it could
not measure (pilot did not start, a wait ran out, C{--timeout} passed).

    .venv/bin/python benchmarks/pilot_scale.py                     # N = 100, 1000
    .venv/bin/python benchmarks/pilot_scale.py --proxies 5 --changes 2 --timeout 60
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http1 import (  # noqa: E402
    ROOT,
    VENV_BIN,
    Proc,
    Unavailable,
    free_port,
    harness,
    http_get,
    last_lines,
    wait_port,
)

GOAL_CONVERGENCE_S = 1.0  # the last proxy ACKs a change within 1 s of the write
GOAL_RSS_PER_PROXY_MB = 1.0  # pilot memory per connected proxy

POLL_INTERVAL = 0.05  # the pilot's --poll-interval
PILOT_DEBOUNCE = 0.1  # PilotService.debounce (not an option)


# -- the channel: the one place for endpoint strings, TLS and credentials -----


def pilot_supports(flag: str) -> bool:
    """
    @return: whether C{twistd txmesh-pilot --help} lists C{flag}.
    """
    try:
        p = subprocess.run(
            [str(VENV_BIN / "twistd"), "txmesh-pilot", "--help"],
            check=False, capture_output=True, text=True, timeout=30, cwd=ROOT,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return flag in p.stdout


class Channel:
    """
    How the pilot listens and how the clients connect: by default the real
    channel (TLS with the pilot's CA-issued certificate, a join token in
    every hello); with C{--insecure}, plain TCP and no credential.
    """

    def __init__(self, insecure: bool = False) -> None:
        self.insecure = insecure
        self._tokens = None
        self._tls = None

    def pilot_args(self, port: int) -> list[str]:
        args = ["--listen", f"tcp:{port}:interface=127.0.0.1:backlog=1024"]
        return args + (["--insecure"] if self.insecure else [])

    def prepare(self, config_dir: Path) -> None:
        """
        Once the pilot made its CA: trust its root and make a join token.
        """
        if self.insecure:
            return
        from txmesh.pilot.ca import client_tls_options
        from txmesh.pilot.channel_security import ca_directory, token_authority

        ca = ca_directory(str(config_dir))
        self._tls = client_tls_options("127.0.0.1", (Path(ca) / "root-cert.pem").read_bytes())
        self._tokens = token_authority(ca)

    def credential(self) -> str:
        """
        @return: a fresh join token (each is good once), or nothing on the
            plaintext channel.
        """
        if self._tokens is None:
            return ""
        return self._tokens.create("default", "bench", time.time(), 3600)

    def client_endpoint(self, reactor, port: int):
        from twisted.internet.endpoints import clientFromString, wrapClientTLS

        endpoint = clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}:timeout=10")
        return endpoint if self._tls is None else wrapClientTLS(self._tls, endpoint)

    def describe(self) -> str:
        return "plain TCP (--insecure), no credential" if self.insecure else "TLS 1.2+, join token"


# -- the generated config ------------------------------------------------------------

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
    - {{address: 10.1.{i}.1, ports: {{http: 8080}}, labels: {{version: v1}}, locality: region-a/zone-1}}
    - {{address: 10.1.{i}.2, ports: {{http: 8080}}, labels: {{version: v2}}, locality: region-a/zone-2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {name}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    connectionPool:
      tcp: {{maxConnections: 100, connectTimeout: 250ms}}
      http: {{http2MaxRequests: 1000, maxRequestsPerConnection: 100}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}}
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  http:
    - name: canary-users
      match: [{{headers: {{x-canary: {{exact: "true"}}}}}}]
      route: [{{destination: {{host: {name}, subset: v2}}}}]
      timeout: 2s
    - name: default
      route:
        - {{destination: {{host: {name}, subset: v1}}, weight: {w1}}}
        - {{destination: {{host: {name}, subset: v2}}, weight: {w2}}}
      timeout: 5s
      retries: {{attempts: 2, perTryTimeout: 1s, retryOn: "5xx,connect-failure,reset"}}
"""

# The weights of the changed service: the initial ones, then one per change,
# each different from the one before.
INITIAL_WEIGHTS = (100, 0)


def change_weights(k: int) -> tuple[int, int]:
    w2 = 10 * (k % 9 + 1)
    return 100 - w2, w2


def write_service(istio: Path, i: int, weights: tuple[int, int]) -> Path:
    path = istio / f"svc-{i:02d}.yaml"
    path.write_text(SERVICE.format(name=f"svc-{i:02d}", i=i, w1=weights[0], w2=weights[1]))
    return path


def bump_mtime(path: Path) -> None:
    # A rewrite of the same size within the clock's granularity must still be
    # seen: move the mtime forward explicitly, as the pilot's tests do.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def make_config(tmp: Path, services: int) -> Path:
    config = tmp / "config"
    (config / "istio").mkdir(parents=True)
    for i in range(services):
        write_service(config / "istio", i, INITIAL_WEIGHTS)
    return config


# -- the clients ---------------------------------------------------------------------


class Fleet:
    """
    N channel clients and what they received, in the benchmark process.
    """

    def __init__(self, reactor, channel: Channel, port: int, run_id: str):
        self.reactor = reactor
        self.channel = channel
        self.port = port
        self.run_id = run_id
        self.clients: list = []
        self.errors: list[str] = []

    def connect(self, index: int):
        from twisted.internet.protocol import Factory

        protocol = make_client_protocol(self, f"bench-{self.run_id}-{index:05d}", f"client-{index % 20}")
        d = self.channel.client_endpoint(self.reactor, self.port).connect(Factory.forProtocol(lambda: protocol))
        self.clients.append(protocol)

        def failed(f):
            self.errors.append(f"{protocol.node_id}: connect failed: {f.getErrorMessage()}")

        d.addErrback(failed)
        return d

    def close(self) -> None:
        for c in self.clients:
            if c.transport is not None:
                c.transport.abortConnection()


def make_client_protocol(fleet: Fleet, node_id: str, workload: str):
    from twisted.internet.protocol import Protocol

    from txmesh.pilot.messages import (
        Ack,
        ChannelDecoder,
        ChannelProtocolError,
        Hello,
        Node,
        Ping,
        Pong,
        Push,
        Refused,
        encode,
    )

    class BenchClient(Protocol):
        """
        One proxy's channel: hello, ACK every push, answer pings. Records
        (monotonic time after the ACK was written, version) of every push.
        """

        def __init__(self) -> None:
            self.node_id = node_id
            self.decoder = ChannelDecoder()
            self.pushes: list[tuple[float, str]] = []
            self.bytes_received = 0
            self.first_push_bytes = 0
            self.connected = False
            self.lost = False

        def connectionMade(self) -> None:
            self.connected = True
            node = Node(id=node_id, namespace="default", workload=workload, app="client", version="v1")
            self.transport.write(encode(Hello(node=node, credential=fleet.channel.credential())))

        def dataReceived(self, data: bytes) -> None:
            self.bytes_received += len(data)
            try:
                messages = self.decoder.receive_data(data)
            except ChannelProtocolError as e:
                fleet.errors.append(f"{node_id}: {e.reason}")
                self.transport.abortConnection()
                return
            for m in messages:
                if isinstance(m, Push):
                    self.transport.write(encode(Ack(nonce=m.nonce, version=m.version)))
                    self.pushes.append((time.monotonic(), m.version))
                    if len(self.pushes) == 1:
                        self.first_push_bytes = self.bytes_received - self.decoder.buffered
                elif isinstance(m, Ping):
                    self.transport.write(encode(Pong(id=m.id)))
                elif isinstance(m, Refused):
                    fleet.errors.append(f"{node_id}: refused: {m.reason}")

        def connectionLost(self, reason=None) -> None:
            self.lost = True

        @property
        def version(self) -> str | None:
            return self.pushes[-1][1] if self.pushes else None

    return BenchClient()


# -- the run -------------------------------------------------------------------------


class Failed(Exception):
    """The measurement could not be made (a bounded wait ran out, the pilot died...)."""


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise Failed(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Pilot scale: push convergence and RSS per proxy at N proxies.")
    ap.add_argument("--proxies", default="100,1000", help="comma-separated N values (default 100,1000)")
    ap.add_argument("--services", type=int, default=20, help="services in the generated config (default 20)")
    ap.add_argument("--changes", type=int, default=5, help="route changes timed per N (default 5)")
    ap.add_argument("--batch", type=int, default=100, help="clients connected at a time (default 100)")
    ap.add_argument("--timeout", type=float, default=300.0, help="overall bound in seconds (default 300)")
    ap.add_argument("--wait", type=float, default=60.0,
                    help="bound on any one wait (pilot start, a batch, a change), seconds (default 60)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, pilot logs)")
    ap.add_argument("--insecure", action="store_true", help="plaintext channel without credentials")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "pilot_scale.json",
                    help="where to write JSON results (default benchmarks/results/pilot_scale.json)")
    args = ap.parse_args(argv)
    try:
        args.ns = [int(x) for x in args.proxies.split(",") if x.strip()]
    except ValueError:
        ap.error("--proxies: comma-separated integers")
    if not args.ns or min(args.ns) < 1 or args.changes < 1 or args.batch < 1 or args.services < 1:
        ap.error("--proxies, --changes, --batch and --services must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return harness("pilot-scale", args, False, run)


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    from twisted.internet import reactor

    started = time.monotonic()
    deadline = started + args.timeout
    nofile = raise_nofile()
    need = max(args.ns) + 64
    if nofile[0] < need:
        print(f"warning: RLIMIT_NOFILE is {nofile[0]}, {need} needed for N={max(args.ns)}", file=sys.stderr)
    channel = Channel(insecure=args.insecure)
    print(f"pilot scale: N={','.join(map(str, args.ns))}, {args.services} services, {args.changes} changes, "
          f"channel {channel.describe()}, RLIMIT_NOFILE {nofile[0]}, timeout {args.timeout:.0f} s")

    outcome: dict = {"results": [], "error": None, "interrupted": None}

    def interrupt(signum):
        outcome["interrupted"] = signum
        if reactor.running:
            reactor.stop()

    # The reactor runs without its own signal handlers; these stop it, and the
    # harness (KeyboardInterrupt below) cleans up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: reactor.callFromThread(interrupt, signum))

    def body():
        from twisted.internet import defer

        @defer.inlineCallbacks
        def go():
            try:
                for n in args.ns:
                    result = yield measure(reactor, args, channel, tmp, procs, n, deadline)
                    outcome["results"].append(result)
            except Exception as e:  # noqa: BLE001 - reported, then the process exits non-zero
                outcome["error"] = f"{type(e).__name__}: {e}"
            finally:
                if reactor.running:
                    reactor.stop()

        go()

    def overall_timeout():
        outcome["error"] = f"overall timeout of {args.timeout:.0f} s passed"
        if reactor.running:
            reactor.stop()

    timer = reactor.callLater(args.timeout, overall_timeout)
    reactor.callWhenRunning(body)
    reactor.run(installSignalHandlers=False)
    if timer.active():
        timer.cancel()
    if outcome["interrupted"] is not None:
        raise KeyboardInterrupt(f"signal {outcome['interrupted']}")

    results = outcome["results"]
    for r in results:
        print(line_for(r))
    if results:
        worst = max(results, key=lambda r: r["convergence_s"]["max"])
        worst_rss = max(results, key=lambda r: r["rss_per_proxy_mb"])
        conv_met = all(r["convergence_s"]["max"] <= GOAL_CONVERGENCE_S for r in results)
        rss_met = all(r["rss_per_proxy_mb"] <= GOAL_RSS_PER_PROXY_MB for r in results)
        print(f"goal convergence <= {GOAL_CONVERGENCE_S:g} s: {'met' if conv_met else 'NOT met'} "
              f"(worst max {worst['convergence_s']['max']:.2f} s at N={worst['n']})")
        print(f"goal RSS <= {GOAL_RSS_PER_PROXY_MB:g} MB per proxy: {'met' if rss_met else 'NOT met'} "
              f"(worst {worst_rss['rss_per_proxy_mb']:.3f} MB at N={worst_rss['n']})")
        goals = {"convergence_le_1s": conv_met, "rss_le_1mb_per_proxy": rss_met}
    else:
        goals = None
    if outcome["error"]:
        print(f"pilot_scale.py: FAILED: {outcome['error']}", file=sys.stderr)
    write_json(args, channel, results, goals, outcome["error"], time.monotonic() - started)
    return 1 if outcome["error"] else 0


def line_for(r: dict) -> str:
    c = r["convergence_s"]
    return (f"pilot N={r['n']}: convergence median {c['median']:.2f} s (max {c['max']:.2f} s), "
            f"RSS per proxy {r['rss_per_proxy_mb']:.3f} MB, synced {r['synced_min']}/{r['n']}")


def measure(reactor, args, channel: Channel, tmp: Path, procs: list, n: int, deadline: float):
    """
    One N: a fresh pilot and config, N clients, RSS, then the timed changes.
    @return: a Deferred firing with the result dict.
    """
    from twisted.internet import defer, task, threads

    def bound(seconds: float | None = None) -> float:
        return min(time.monotonic() + (seconds or args.wait), deadline)

    @defer.inlineCallbacks
    def wait_until(pred, what: str, seconds: float | None = None, step: float = 0.005):
        until = bound(seconds)
        while not pred():
            if not pilot.alive():
                raise Failed(f"the pilot exited with {pilot.popen.returncode} while waiting for {what}: "
                             f"{last_lines(pilot.output())}")
            if fleet.errors:
                raise Failed(f"while waiting for {what}: {fleet.errors[0]} ({len(fleet.errors)} client errors)")
            if time.monotonic() > until:
                raise Failed(f"timed out waiting for {what}")
            yield task.deferLater(reactor, step, lambda: None)

    @defer.inlineCallbacks
    def proxies_view():
        status, body = yield threads.deferToThread(http_get, f"http://127.0.0.1:{api_port}/proxies", 10.0)
        if status != 200:
            raise Failed(f"GET /proxies: {status}")
        return json.loads(body)

    @defer.inlineCallbacks
    def go():
        nonlocal pilot
        work = tmp / f"n{n}"
        work.mkdir()
        config = make_config(work, args.services)
        port, api = free_port(), free_port()
        nonlocal api_port
        api_port = api
        argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "txmesh-pilot", "--config-dir", str(config),
                *channel.pilot_args(port), "--api", f"tcp:{api}:interface=127.0.0.1",
                "--poll-interval", str(POLL_INTERVAL), "--metrics", "none"]
        pilot = Proc(f"pilot-n{n}", argv, work / "pilot.log", cwd=ROOT)
        procs.append(pilot)
        try:
            yield threads.deferToThread(wait_port, pilot, port, min(args.wait, max(deadline - time.monotonic(), 1)))
            yield threads.deferToThread(wait_port, pilot, api, 10)
        except Unavailable as e:
            raise Failed(str(e)) from None
        channel.prepare(config)
        status = yield threads.deferToThread(http_get, f"http://127.0.0.1:{api}/status", 10.0)
        doc = json.loads(status[1])
        if not doc["config"]["ok"]:
            raise Failed(f"the pilot refused the generated config: {doc['config']['error']}")
        # Let the pilot settle after startup before the baseline.
        yield task.deferLater(reactor, 0.5, lambda: None)
        rss0 = rss_kb(pilot.pid)
        cpu0 = cpu_seconds(pilot.pid)

        # Connect in batches; each batch must have ACKed its first push.
        fleet.port = port
        t_connect = time.monotonic()
        for start in range(0, n, args.batch):
            batch = [fleet.connect(i) for i in range(start, min(start + args.batch, n))]
            yield defer.DeferredList(batch)
            members = fleet.clients[start:start + args.batch]
            yield wait_until(lambda members=members: all(c.pushes for c in members),
                             f"clients {start}..{start + len(members) - 1} to get their first push")
        connect_s = time.monotonic() - t_connect
        cpu_connecting = cpu_seconds(pilot.pid) - cpu0
        # The ACKs reach the pilot: all SYNCED, then the RSS with N connected.
        view = yield synced_view(n, {c.node_id: c.version for c in fleet.clients})
        rss_n = rss_kb(pilot.pid)
        push_bytes = statistics.median(c.first_push_bytes for c in fleet.clients)
        print(f"  N={n}: {n} connected and ACKed in {connect_s:.2f} s; first push ~{push_bytes / 1024:.1f} kB; "
              f"pilot RSS {rss0 / 1024:.1f} -> {rss_n / 1024:.1f} MB; synced {view}/{n}")

        changes = []
        istio = config / "istio"
        target = args.services // 2
        for k in range(1, args.changes + 1):
            # Quiet period: the previous change is fully settled.
            yield task.deferLater(reactor, 0.3, lambda: None)
            before = {c.node_id: c.version for c in fleet.clients}
            counts = [len(c.pushes) for c in fleet.clients]
            cpu_before = cpu_seconds(pilot.pid)
            t0 = time.monotonic()
            path = write_service(istio, target, change_weights(k))
            bump_mtime(path)

            def converged(counts=counts):
                return all(len(c.pushes) > counts[i] for i, c in enumerate(fleet.clients))

            yield wait_until(converged, f"change {k} to reach all {n} clients", step=0.002)
            times = [c.pushes[counts[i]][0] for i, c in enumerate(fleet.clients)]
            if any(c.pushes[counts[i]][1] == before[c.node_id] for i, c in enumerate(fleet.clients)):
                raise Failed(f"change {k}: a client got a push of the version it had")
            last, first = max(times) - t0, min(times) - t0
            synced = yield synced_view(n, {c.node_id: c.version for c in fleet.clients})
            cpu = cpu_seconds(pilot.pid) - cpu_before
            changes.append({"change": k, "weights": list(change_weights(k)), "last_ack_s": round(last, 4),
                            "first_receipt_s": round(first, 4), "synced": synced,
                            "pilot_cpu_s": round(cpu, 3)})
            print(f"  N={n} change {k}: first push {first:.3f} s, last ACK {last:.3f} s after the write; "
                  f"pilot CPU {cpu:.2f} s; synced {synced}/{n}")

        lasts = [c["last_ack_s"] for c in changes]
        firsts = [c["first_receipt_s"] for c in changes]
        result = {
            "n": n,
            "services": args.services,
            "connect_all_s": round(connect_s, 3),
            "first_push_bytes_median": push_bytes,
            "pilot_rss_kb_before": rss0,
            "pilot_rss_kb_connected": rss_n,
            "rss_per_proxy_mb": round((rss_n - rss0) / 1024 / n, 4),
            "pilot_cpu_s_connecting": round(cpu_connecting, 3),
            "convergence_s": {"median": round(statistics.median(lasts), 4), "max": round(max(lasts), 4),
                              "min": round(min(lasts), 4)},
            "first_receipt_s": {"median": round(statistics.median(firsts), 4), "max": round(max(firsts), 4)},
            "detection_floor_s": {"poll_interval": POLL_INTERVAL, "debounce": PILOT_DEBOUNCE},
            "synced_min": min(c["synced"] for c in changes),
            "changes": changes,
        }
        return result

    @defer.inlineCallbacks
    def synced_view(n: int, versions: dict):
        """
        Poll GET /proxies until every client shows SYNCED at the version it
        received (the ACKs are in flight), bounded; return how many did.
        """
        until = bound(10.0)
        while True:
            proxies = yield proxies_view()
            count = sum(1 for p in proxies
                        if p["status"] == "SYNCED" and p["acked_version"] == versions.get(p["id"]))
            if count >= n or time.monotonic() > until:
                return count
            yield task.deferLater(reactor, 0.05, lambda: None)

    pilot: Proc | None = None
    api_port = 0
    fleet = Fleet(reactor, channel, 0, f"n{n}")
    d = go()

    def cleanup(result):
        fleet.close()
        if pilot is not None:
            # Stopped now (not only at exit) so the next N gets the CPU to itself.
            return threads.deferToThread(pilot.stop).addCallback(lambda _: result)
        return result

    d.addBoth(cleanup)
    return d


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "?"
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "mem_total_kb": mem_kb,
        "python": platform.python_version(),
        "twisted": twisted_version,
    }


def write_json(args, channel: Channel, results: list, goals, error, elapsed: float) -> None:
    doc = {
        "benchmark": "pilot_scale",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "proxies": args.ns, "services": args.services, "changes": args.changes, "batch": args.batch,
            "poll_interval_s": POLL_INTERVAL, "pilot_debounce_s": PILOT_DEBOUNCE,
            "channel": channel.describe(), "timeout_s": args.timeout,
        },
        "goals": {"convergence_s": GOAL_CONVERGENCE_S, "rss_per_proxy_mb": GOAL_RSS_PER_PROXY_MB,
                  "met": goals},
        "results": results,
        "error": error,
        "elapsed_s": round(elapsed, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"json: {args.json}")


if __name__ == "__main__":
    sys.exit(main())
