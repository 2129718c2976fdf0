#!/usr/bin/env python3
"""
Mutual TLS benchmark: what the workload certificate costs, as ratios
measured in one run.

1. Handshakes, in this process on loopback (one reactor plays both ends):
   N sequential and N concurrent (C{--concurrency} at a time) connections,
   each connect + handshake + a 1-byte echo (so the server has accepted the
   client), then abort; three kinds:

     mtls     L{MeshServerCreator} / L{MeshClientCreator} (both certificates)
     tls      L{txmesh.proxy.tls.server_options} / C{client_options}
              (server certificate only, host name checked)
     plain    TCP

2. Request throughput through two real sidecars, C{wrk -t1 -c10}:

     wrk -> client proxy :A --ISTIO_MUTUAL--> server proxy :B (mtls: STRICT) -> nginx app
     wrk -> client proxy :A2 ---plaintext---> server proxy :B2               -> nginx app

   Both paths run through the same two C{twistd txmesh-proxy} processes,
   each bootstrapped with a real pilot (C{twistd txmesh-pilot}) for its
   workload certificate (join token from C{txmesh token create}) plus static
   listeners and clusters. Proxies on CPU 0, wrk and the app on CPU 1.

3. CSR signings per second at the CA, in this process: C{--signings} fresh
   CSRs made first, then only the signing timed
   (L{CertificateAuthority.sign_csr}, and L{ChannelSecurity.sign}, which
   also checks what the CSR asks for).

It is a measurement: it exits 0 when it measured, non-zero when it could
not (a process did not start, C{--timeout} passed).

    .venv/bin/python benchmarks/mtls.py
    .venv/bin/python benchmarks/mtls.py --handshakes 20 --signings 20 --duration 1 --runs 1 --warmup 0
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from http1 import (  # noqa: E402
    LOAD_CPU,
    NGINX,
    NGINX_APP,
    PAYLOAD,
    PROXY_CPU,
    ROOT,
    VENV_BIN,
    WRK,
    Proc,
    Unavailable,
    free_port,
    harness,
    http_get,
    last_lines,
    pin,
    pinning_available,
    run_wrk,
    start_nginx,
    wait_port,
    write_result,
)

TRUST_DOMAIN = "cluster.local"


class Timeout(Exception):
    """C{--timeout} passed."""


# -- 1. handshakes, in process -----------------------------------------------------


def measure_handshakes(args, tmp: Path) -> dict:
    """
    @return: C{{kind: {"sequential": per s, "concurrent": per s}}}.
    """
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from txmesh.pilot.ca import CertificateAuthority, spiffe_id
    from txmesh.proxy.mesh_tls import MeshClientCreator, MeshServerCreator
    from txmesh.proxy.tls import client_options, server_options
    from txmesh.proxy.workload_identity import WorkloadIdentity

    now = datetime.datetime.now(datetime.timezone.utc)
    ca = CertificateAuthority.load_or_create(str(tmp / "handshake-ca"), TRUST_DOMAIN, now)

    def identity(account: str) -> WorkloadIdentity:
        ident = WorkloadIdentity(spiffe_id(TRUST_DOMAIN, "default", account))
        chain = ca.sign_csr(ident.new_request(), ident.spiffe_id, now, datetime.timedelta(hours=1))
        ident.install(chain, ca.trust_bundle_pem, now.timestamp())
        return ident

    server_id, client_id = identity("server"), identity("client")
    issued = ca.issue_server_certificate([], ["127.0.0.1"], now, datetime.timedelta(hours=1))

    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    class Ping(Protocol):
        def __init__(self) -> None:
            self.done = defer.Deferred()

        def connectionMade(self) -> None:
            self.transport.write(b"x")

        def dataReceived(self, data: bytes) -> None:
            if not self.done.called:
                self.done.callback(None)
                self.transport.abortConnection()

        def connectionLost(self, reason=None) -> None:
            if not self.done.called:
                self.done.errback(reason)

    echo = Factory.forProtocol(Echo)
    echo.noisy = False
    kinds = {
        "mtls": (TLSMemoryBIOFactory(MeshServerCreator(server_id), False, echo),
                 MeshClientCreator(client_id, allowed=[server_id.spiffe_id])),
        "tls": (TLSMemoryBIOFactory(server_options(issued.full_chain_pem, issued.private_key_pem, alpn=()),
                                    False, echo),
                client_options("127.0.0.1", (), ca.root_pem)),
        "plain": (echo, None),
    }
    results: dict = {}
    state: dict = {"error": None}

    @defer.inlineCallbacks
    def one(port: int, creator) -> defer.Deferred:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        if creator is not None:
            endpoint = wrapClientTLS(creator, endpoint)
        p = yield connectProtocol(endpoint, Ping())
        yield p.done

    @defer.inlineCallbacks
    def run_all() -> defer.Deferred:
        ports = []
        try:
            for kind, (server_factory, creator) in kinds.items():
                port = reactor.listenTCP(0, server_factory, backlog=1024, interface="127.0.0.1")
                ports.append(port)
                number = port.getHost().port
                for _ in range(min(10, args.handshakes)):  # warm up (contexts built, code paths hot)
                    yield one(number, creator)
                t0 = time.perf_counter()
                for _ in range(args.handshakes):
                    yield one(number, creator)
                sequential = args.handshakes / (time.perf_counter() - t0)

                per_worker = max(1, args.handshakes // args.concurrency)

                @defer.inlineCallbacks
                def worker(number=number, creator=creator, per_worker=per_worker):
                    for _ in range(per_worker):
                        yield one(number, creator)

                t0 = time.perf_counter()
                yield defer.gatherResults([worker() for _ in range(args.concurrency)], consumeErrors=True)
                concurrent = per_worker * args.concurrency / (time.perf_counter() - t0)
                results[kind] = {"sequential": sequential, "concurrent": concurrent}
                print(f"handshakes {kind:5s}: sequential {sequential:,.0f}/s, "
                      f"{args.concurrency} concurrent {concurrent:,.0f}/s")
        except Exception as e:  # reported below, after the reactor stopped
            state["error"] = f"{type(e).__name__}: {e}"
        finally:
            for port in ports:
                yield port.stopListening()
            if reactor.running:
                reactor.stop()

    def timed_out() -> None:
        state["error"] = "timeout"
        if reactor.running:
            reactor.stop()

    deadline = reactor.callLater(max(args.deadline - time.monotonic(), 1), timed_out)
    reactor.callWhenRunning(run_all)
    reactor.run(installSignalHandlers=False)
    if deadline.active():
        deadline.cancel()
    if state["error"] == "timeout":
        raise Timeout("the handshake measurement ran out of --timeout")
    if state["error"]:
        raise RuntimeError(f"handshake measurement failed: {state['error']}")
    return results


# -- 2. CSR signing ------------------------------------------------------------------


def measure_signing(args, tmp: Path) -> dict:
    from txmesh.pilot.ca import spiffe_id
    from txmesh.pilot.channel_security import load_channel_security
    from txmesh.proxy.workload_identity import WorkloadIdentity

    class WallClock:
        def seconds(self) -> float:
            return time.time()

    security = load_channel_security(str(tmp / "signing-ca"), TRUST_DOMAIN, WallClock())
    identity = spiffe_id(TRUST_DOMAIN, "default", "bench")
    csrs = [WorkloadIdentity(identity).new_request() for _ in range(2 * args.signings)]
    now = datetime.datetime.now(datetime.timezone.utc)
    ttl = datetime.timedelta(hours=24)

    t0 = time.perf_counter()
    for csr in csrs[:args.signings]:
        security.ca.sign_csr(csr, identity, now, ttl)
    sign_csr = args.signings / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for csr in csrs[args.signings:]:
        security.sign(csr, identity)
    channel_sign = args.signings / (time.perf_counter() - t0)
    print(f"CSR signings: CertificateAuthority.sign_csr {sign_csr:,.0f}/s, "
          f"ChannelSecurity.sign {channel_sign:,.0f}/s ({args.signings} CSRs each)")
    return {"sign_csr_per_s": sign_csr, "channel_sign_per_s": channel_sign}


# -- 3. two sidecars ------------------------------------------------------------------

PROXY = """\
node: {{id: {name}, workload: {name}, namespace: default}}
admin: {{address: "tcp:{admin}:interface=127.0.0.1"}}
pilot:
  addresses: ["tcp:127.0.0.1:{pilot}"]
  ca_file: {ca_file}
  token_file: {token_file}
  outbound_address: "tcp:{outbound}:interface=127.0.0.1"
  backoff_base: 0.1
  backoff_max: 0.5
listeners:
{listeners}
clusters:
{clusters}
"""

LISTENER = """\
  - name: {name}
    address: "tcp:{port}:interface=127.0.0.1"
    protocol: http
{extra}    http_filters: [{{name: metrics}}, {{name: tracing}}, {{name: router}}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{name: all, match: {{prefix: /}}, cluster: {cluster}}}]
"""

CLUSTER = """\
  - name: {name}
    endpoints: ["127.0.0.1:{port}"]
{extra}"""


def start_pilot(tmp: Path, procs: list) -> tuple[Path, int]:
    config = tmp / "pilot"
    (config / "istio").mkdir(parents=True)
    port, api = free_port(), free_port()
    argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "txmesh-pilot", "--config-dir", str(config),
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--api", f"tcp:{api}:interface=127.0.0.1",
            "--metrics", "none"]
    pilot = Proc("pilot", argv, tmp / "pilot.log", cwd=ROOT, env=child_env())
    procs.append(pilot)
    wait_port(pilot, port, 20)
    return config, port


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def join_token(config: Path, account: str) -> Path:
    made = subprocess.run([str(VENV_BIN / "txmesh"), "token", "create", "--config-dir", str(config),
                           "-n", "default", "-s", account],
                          capture_output=True, text=True, timeout=30, check=False, env=child_env())
    if made.returncode != 0:
        raise Unavailable(f"txmesh token create failed: {last_lines(made.stderr)}")
    path = config.parent / f"{account}.token"
    path.write_text(made.stdout.strip() + "\n")
    return path


def start_proxy(tmp: Path, name: str, body: str, pinning: bool, procs: list) -> Proc:
    conf = tmp / f"{name}.yaml"
    conf.write_text(body)
    argv = pin(PROXY_CPU, [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "-r", "txmesh", "txmesh-proxy",
                           "--config", str(conf)], pinning)
    proc = Proc(name, argv, tmp / f"{name}.log", cwd=ROOT, env=child_env())
    procs.append(proc)
    return proc


def wait_ok(url: str, procs: list, deadline: float) -> None:
    """
    Retry C{url} until it answers 200 with the app's payload (the proxies
    have their certificates and routes), bounded by C{deadline}.
    """
    last = "no answer"
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise Unavailable(f"{p.name} exited: {last_lines(p.output())}")
        try:
            status, body = http_get(url, timeout=1.0)
            if status == 200 and body == PAYLOAD:
                return
            last = f"{status} {body[:80]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise Unavailable(f"{url} not answering 200 in time (last: {last})")


def start_sidecars(args, pinning: bool, tmp: Path, procs: list) -> dict:
    """
    Start the app, a pilot and the two sidecars, and wait until both paths
    answer and the STRICT listener refuses plaintext.

    @return: C{{"client": Proc, "server": Proc, "urls": {"mtls": url,
        "plain": url}, "app_port": port}}.
    """
    app_port = free_port()
    procs.append(start_nginx("app", tmp, LOAD_CPU, NGINX_APP.format(port=app_port, payload=PAYLOAD.decode()),
                             app_port, pinning))
    config, pilot_port = start_pilot(tmp, procs)
    ca_file = config / "ca" / "root-cert.pem"
    ports = {k: free_port() for k in ("a_mtls", "a_plain", "b_mtls", "b_plain")}

    server_listeners = (
        LISTENER.format(name="inbound-mtls", port=ports["b_mtls"], extra="    mtls: STRICT\n", cluster="app")
        + LISTENER.format(name="inbound-plain", port=ports["b_plain"], extra="", cluster="app"))
    server = start_proxy(tmp, "server-proxy", PROXY.format(
        name="server", admin=free_port(), pilot=pilot_port, ca_file=ca_file,
        token_file=join_token(config, "server"), outbound=free_port(), listeners=server_listeners,
        clusters=CLUSTER.format(name="app", port=app_port, extra="")), pinning, procs)
    client_listeners = (
        LISTENER.format(name="outbound-mtls", port=ports["a_mtls"], extra="", cluster="server-mtls")
        + LISTENER.format(name="outbound-plain", port=ports["a_plain"], extra="", cluster="server-plain"))
    client_clusters = (
        CLUSTER.format(name="server-mtls", port=ports["b_mtls"], extra="    tls: {mode: ISTIO_MUTUAL}\n")
        + CLUSTER.format(name="server-plain", port=ports["b_plain"], extra=""))
    client = start_proxy(tmp, "client-proxy", PROXY.format(
        name="client", admin=free_port(), pilot=pilot_port, ca_file=ca_file,
        token_file=join_token(config, "client"), outbound=free_port(), listeners=client_listeners,
        clusters=client_clusters), pinning, procs)

    urls = {"mtls": f"http://127.0.0.1:{ports['a_mtls']}/", "plain": f"http://127.0.0.1:{ports['a_plain']}/"}
    ready_by = min(time.monotonic() + 30, args.deadline)
    for url in urls.values():
        wait_ok(url, [server, client], ready_by)
    # The STRICT listener must refuse what is not mutual TLS, or the "mtls"
    # figures would measure plaintext.
    try:
        status, _ = http_get(f"http://127.0.0.1:{ports['b_mtls']}/", timeout=2.0)
    except OSError:
        status = None
    if status is not None:
        raise Unavailable(f"the STRICT listener answered a plaintext request with {status}")
    print("proxies: both have their workload certificates; mTLS and plaintext paths answer 200; "
          "the STRICT listener refuses plaintext")
    return {"client": client, "server": server, "urls": urls, "app_port": app_port}


def measure_proxies(args, pinning: bool, tmp: Path, procs: list) -> dict:
    sidecars = start_sidecars(args, pinning, tmp, procs)
    client, server, urls = sidecars["client"], sidecars["server"], sidecars["urls"]

    if args.warmup:
        for url in urls.values():
            run_wrk(url, args.connections, args.warmup, pinning)
    raw: dict = {"mtls": [], "plain": []}
    for rnd in range(args.runs):
        for kind in (("plain", "mtls") if rnd % 2 == 0 else ("mtls", "plain")):
            if time.monotonic() + args.duration + 5 > args.deadline:
                raise Timeout("the proxy measurement would outrun --timeout")
            cpu0 = client.cpu_seconds() + server.cpu_seconds()
            t0 = time.monotonic()
            res = run_wrk(urls[kind], args.connections, args.duration, pinning)
            res["proxies_cpu"] = (client.cpu_seconds() + server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            raw[kind].append(res)
            errors = res["non2xx"] + res["socket_errors"]
            print(f"  run {rnd + 1}/{args.runs} {kind:5s} {res['rps']:>9,.0f} req/s  p50 {res['p50_us']:,.0f} us  "
                  f"p99 {res['p99_us']:,.0f} us" + (f"  ERRORS {errors}" if errors else ""))
    summary = {}
    for kind, runs in raw.items():
        summary[kind] = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50_us": statistics.median(r["p50_us"] for r in runs),
            "p99_us": statistics.median(r["p99_us"] for r in runs),
            "proxies_cpu": statistics.median(r["proxies_cpu"] for r in runs),
            "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs),
        }
    return {"summary": summary, "raw": raw}


# -- main ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Mutual TLS benchmark: handshakes, proxied req/s, CSR signing.")
    ap.add_argument("--handshakes", type=int, default=300, help="connections per kind and mode (default 300)")
    ap.add_argument("--concurrency", type=int, default=10, help="connections at once in the concurrent mode")
    ap.add_argument("--signings", type=int, default=300, help="CSRs signed per method (default 300)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--runs", type=int, default=3, help="wrk rounds, mTLS and plaintext alternating (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load per path (default 1)")
    ap.add_argument("--connections", type=int, default=10, help="wrk -c (default 10)")
    ap.add_argument("--timeout", type=float, default=180, help="give up after this many seconds (default 180)")
    ap.add_argument("--no-proxies", action="store_true", help="skip the two-sidecar wrk measurement")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "mtls.json",
                    help="where to write JSON results (default benchmarks/results/mtls.json)")
    args = ap.parse_args(argv)
    for name in ("handshakes", "concurrency", "signings", "duration", "runs", "connections"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.deadline = time.monotonic() + args.timeout
    if not args.no_proxies:
        for tool in (WRK, NGINX):
            if not os.path.exists(tool):
                sys.exit(f"mtls.py: {tool} not found (or run with --no-proxies)")
    pinning = pinning_available(not args.no_pin and shutil.which("taskset") is not None)
    try:
        return harness("mtls", args, pinning, run)
    except Timeout as e:
        print(f"mtls.py: timed out: {e}", file=sys.stderr)
        return 2
    except Unavailable as e:
        print(f"mtls.py: could not measure: {e}", file=sys.stderr)
        return 1


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    handshakes = measure_handshakes(args, tmp)

    def on_alarm(signum, frame):
        raise Timeout(f"--timeout {args.timeout:.0f}s passed")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.deadline - time.monotonic())))
    try:
        signing = measure_signing(args, tmp)
        proxies = None if args.no_proxies else measure_proxies(args, pinning, tmp, procs)
    finally:
        signal.alarm(0)

    ratios = {
        "handshake_sequential_mtls/tls": ratio(handshakes["mtls"]["sequential"], handshakes["tls"]["sequential"]),
        "handshake_sequential_mtls/plain": ratio(handshakes["mtls"]["sequential"],
                                                 handshakes["plain"]["sequential"]),
        "handshake_concurrent_mtls/tls": ratio(handshakes["mtls"]["concurrent"], handshakes["tls"]["concurrent"]),
        "handshake_concurrent_mtls/plain": ratio(handshakes["mtls"]["concurrent"],
                                                 handshakes["plain"]["concurrent"]),
    }
    print()
    print(f"handshakes per second (connect + handshake + 1-byte echo, both ends in one process, "
          f"{args.handshakes} each, concurrent {args.concurrency} at a time):")
    for kind, r in handshakes.items():
        print(f"  {kind:5s} sequential {r['sequential']:>8,.0f}/s   concurrent {r['concurrent']:>8,.0f}/s")
    if proxies is not None:
        s = proxies["summary"]
        ratios["rps_mtls/plain"] = ratio(s["mtls"]["rps"], s["plain"]["rps"])
        ratios["p50_mtls/plain"] = ratio(s["mtls"]["p50_us"], s["plain"]["p50_us"])
        ratios["p99_mtls/plain"] = ratio(s["mtls"]["p99_us"], s["plain"]["p99_us"])
        print(f"two sidecars, wrk -t1 -c{args.connections}, median of {args.runs} x {args.duration}s:")
        for kind in ("plain", "mtls"):
            k = s[kind]
            print(f"  {kind:5s} {k['rps']:>9,.0f} req/s  p50 {k['p50_us']:>7,.0f} us  p99 {k['p99_us']:>7,.0f} us  "
                  f"proxies CPU {k['proxies_cpu']:.2f}  errors {k['errors']}")
    print(f"CSR signings per second: sign_csr {signing['sign_csr_per_s']:,.0f}/s, "
          f"ChannelSecurity.sign {signing['channel_sign_per_s']:,.0f}/s")
    print("ratios (same run):")
    for key, value in ratios.items():
        print(f"  {key:34s} {'n/a' if value is None else format(value, '.3f')}")

    result = {
        "benchmark": "mtls",
        "started": started.isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "params": {k: getattr(args, k) for k in ("handshakes", "concurrency", "signings", "duration", "runs",
                                                  "warmup", "connections", "timeout", "no_proxies")}
        | {"pinning": pinning, "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU},
        "handshakes_per_s": handshakes,
        "signing": signing,
        "proxies": proxies,
        "ratios": ratios,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
