"""
txmesh's Twisted plugins: the C{txmesh-proxy} twistd command and the
built-in filters (found by name through L{twisted.plugin.getPlugins}).
"""

from __future__ import annotations

import os
import sys

from twisted.application.reactors import Reactor
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import alsoProvides, implementer

from txmesh.filters.router import RouterFactory
from txmesh.observability.metrics import MetricsFactory


class ProxyOptions(usage.Options):
    """
    Options of C{twistd txmesh-proxy}.
    """

    synopsis = "--config FILE [options]  |  --pilot ADDRESS --pilot-ca FILE --pilot-token-file FILE [options]"
    longdesc = (
        "Run a txmesh sidecar proxy from a static YAML config file: HTTP/1.1 and "
        "TCP listeners, routes, clusters and filters, plus an admin endpoint. "
        "SIGHUP (or --watch) reloads the file; an invalid file is refused and the "
        "running config keeps serving. With --pilot the proxy gets its listeners "
        "and clusters from a txmesh-pilot instead (no file needed; a file given "
        "too is the bootstrap: node, admin, static resources)."
    )
    optParameters = [
        ["config", "c", None, "The proxy's YAML config file (required without --pilot)."],
        ["watch", "w", 0.0, "Seconds between checks of the config file for changes (0: only on SIGHUP).", float],
        ["drain-timeout", None, 5.0, "Seconds in-flight requests get to finish at shutdown.", float],
        ["concurrency", None, 1, "Worker processes accepting on the same ports (SO_REUSEPORT); the parent "
         "reads the config (or holds the pilot channel and the workload certificate) and serves the admin "
         "endpoint with their metrics summed. 1: no extra process. TCP listeners on fixed ports.", int],
        ["pilot-ca", None, None, "With --pilot: the mesh root file (the pilot's ca/root-cert.pem)."],
        ["pilot-token-file", None, None, "With --pilot: the join token file (txmesh token create)."],
        ["node-id", None, None, "With --pilot: this proxy's node id [default: the file's, or the host name]."],
        ["namespace", None, None, "With --pilot: this proxy's namespace [default: the file's, or default]."],
        ["workload", None, None, "With --pilot: the workload beside this proxy."],
        ["admin", None, None, "With --pilot: the admin endpoint [default: the file's, or "
         "tcp:15000:interface=127.0.0.1]."],
        ["service-account", None, None, "With --pilot: the workload's service account (its SPIFFE ID) "
         "[default: the join token's, else default]."],
        ["inbound-port", None, None, "With --pilot: the port the proxy takes inbound traffic on.", int],
        ["app-port", None, None, "With --pilot: the port the app listens on beside the proxy.", int],
        ["app-protocol", None, None, "With --pilot: what the app speaks: http (HTTP/1.1, the default), "
         "http2 or grpc."],
    ]
    optFlags = [
        ["pilot-insecure", None, "With --pilot: plaintext channel (only to a pilot run with --insecure)."],
        ["router", None, "With --pilot: run as an ingress or egress gateway, serving the Istio Gateways whose "
         "selector matches this proxy's labels (see --label)."],
        ["capture", None, "With --pilot: the workload's traffic is redirected here by iptables (txmesh "
         "iptables); the pushed outbound listener recovers each connection's original destination."],
        ["reuse-port", None, "Bind TCP listeners with SO_REUSEPORT, so a replacement proxy can start on the same "
         "ports while this one drains after SIGTERM (a restart without refused connections)."],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.yaml")})

    def __init__(self) -> None:
        super().__init__()
        self["pilot"] = []
        self["label"] = []

    def opt_label(self, label: str) -> None:
        """
        With --pilot: a node label KEY=VALUE (e.g. istio=ingressgateway, for
        a Gateway's selector); repeat for several.
        """
        key, eq, value = label.partition("=")
        if not eq or not key:
            raise usage.UsageError(f"--label {label!r}: write KEY=VALUE")
        self["label"].append((key, value))

    def opt_pilot(self, address: str) -> None:
        """
        A pilot replica to get config from: an endpoint string
        (tcp:pilot:15010) or HOST:PORT; repeat for several.
        """
        self["pilot"].append(address)

    def postOptions(self) -> None:
        if not self["config"] and not self["pilot"]:
            raise usage.UsageError("--config FILE or --pilot ADDRESS is required")
        if self["app-protocol"] not in (None, "http", "http2", "grpc"):
            raise usage.UsageError(f"--app-protocol: http, http2 or grpc, not {self['app-protocol']!r}")
        if self["pilot"] and not (self["pilot-ca"] or self["pilot-insecure"] or self["config"]):
            raise usage.UsageError("--pilot needs --pilot-ca FILE (the mesh root) or --pilot-insecure")
        if self["concurrency"] < 1:
            raise usage.UsageError(f"--concurrency: at least 1, not {self['concurrency']}")


@implementer(IServiceMaker, IPlugin)
class ProxyServiceMaker:
    """
    Makes the C{txmesh-proxy} service.
    """

    tapname = "txmesh-proxy"
    description = "txmesh data plane: a sidecar HTTP/1.1 and TCP proxy with Python filters."
    options = ProxyOptions

    def makeService(self, options: ProxyOptions) -> object:
        reactor = _proxy_reactor()

        from txmesh.config.errors import ConfigError
        from txmesh.proxy.service import ProxyService

        document = None
        if options["pilot"]:
            document = _pilot_bootstrap(options)
        if options["concurrency"] > 1:
            return _worker_pool(options, reactor, document)
        service = ProxyService(
            options["config"] or "<command line>", reactor,
            watch_interval=options["watch"], drain_timeout=options["drain-timeout"], document=document,
            reuse_port=bool(options["reuse-port"]),
        )
        try:
            service.load_initial()
        except ConfigError as e:
            sys.stderr.write(f"txmesh-proxy: invalid config: {e}\n")
            raise SystemExit(2) from None
        return service


def _proxy_reactor() -> object:
    """
    The reactor C{txmesh-proxy} runs on: L{txmesh.reactor.TxmeshReactor}
    (batched writes, lean dispatch) unless twistd was given one with C{-r}
    or the platform has no epoll.
    """
    if "twisted.internet.reactor" not in sys.modules:
        try:
            from txmesh.reactor import install
        except ImportError:  # no epoll: not Linux
            pass
        else:
            install()
    from twisted.internet import reactor

    return reactor


def _worker_pool(options: ProxyOptions, reactor: object, document: dict | None) -> object:
    """
    The parent of C{--concurrency N} worker processes (see
    L{txmesh.proxy.workers}).
    """
    from txmesh.config.errors import ConfigError
    from txmesh.proxy.workers import WorkerPool
    from txmesh.reactor import TxmeshReactor

    pool = WorkerPool(options["config"] or "<command line>", reactor, options["concurrency"],
                      watch_interval=options["watch"], drain_timeout=options["drain-timeout"], document=document,
                      reactor_name="txmesh" if isinstance(reactor, TxmeshReactor) else "default")
    try:
        pool.load_initial()
    except ConfigError as e:
        sys.stderr.write(f"txmesh-proxy: invalid config: {e}\n")
        raise SystemExit(2) from None
    return pool


def _pilot_bootstrap(options: ProxyOptions) -> dict:
    """
    The bootstrap document for C{--pilot}: the config file's, if any, with
    the pilot and node options merged in.
    """
    import socket

    import yaml

    from txmesh.proxy.bootstrap import PilotOptions, bootstrap_document

    base = None
    if options["config"]:
        try:
            with open(options["config"], encoding="utf-8") as f:
                base = yaml.safe_load(f)
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            sys.stderr.write(f"txmesh-proxy: invalid config: {options['config']}: {e}\n")
            raise SystemExit(2) from None
    def absolute(path: str | None) -> str | None:
        # Paths in the file are relative to it; paths on the command line are not.
        return None if path is None else os.path.abspath(path)

    pilot = PilotOptions(
        options["pilot"], absolute(options["pilot-ca"]), absolute(options["pilot-token-file"]),
        bool(options["pilot-insecure"]),
        options["node-id"], options["namespace"], options["workload"], options["admin"],
        options["service-account"], options["inbound-port"], options["app-port"],
        tuple(options["label"]), bool(options["router"]), bool(options["capture"]), options["app-protocol"],
    )
    return bootstrap_document(base, pilot, socket.gethostname())


txmeshProxy = ProxyServiceMaker()

router = RouterFactory()
alsoProvides(router, IPlugin)
metrics = MetricsFactory()
alsoProvides(metrics, IPlugin)

txmeshReactor = Reactor(
    "txmesh", "txmesh.reactor",
    "epoll with lean event dispatch, for txmesh-proxy (Linux).",
)

from txmesh.filters.fault import FaultFactory  # noqa: E402  (appended: the fault filter)

fault = FaultFactory()
alsoProvides(fault, IPlugin)



class PilotOptions(usage.Options):
    """
    Options of C{twistd txmesh-pilot}.
    """

    synopsis = "--config-dir DIR [options]"
    longdesc = (
        "Run a txmesh pilot: watch Istio documents (DIR/istio/*.yaml) and service "
        "registrations (DIR/services/*.yaml, optional), push each connected proxy its "
        "config over the pilot channel, and serve a JSON operator API (/proxies, "
        "/proxies/<id>/config, /services, /status). An invalid change is refused and "
        "the last good config keeps being served."
    )
    optParameters = [
        ["config-dir", "d", None, "Directory holding mesh.yaml, istio/ and services/ (required)."],
        ["listen", "l", "tcp:15010:interface=127.0.0.1", "Endpoint string the proxies connect to (TLS)."],
        ["api", "a", "tcp:15011:interface=127.0.0.1", "Endpoint string of the operator API."],
        ["api-token-file", None, None, "File holding the bearer token the operator API requires "
         "(required when the API listens beyond loopback)."],
        ["ca-dir", None, None, "The CA and join-token key directory [default: CONFIG_DIR/ca]."],
        ["server-names", None, "", "Comma-separated extra DNS names / IP addresses for the pilot's "
         "certificate (localhost, 127.0.0.1, ::1, txmesh-pilot and the host name are always in)."],
        ["keepalive", None, "15,45", "Channel keepalive INTERVAL,TIMEOUT in seconds."],
        ["api-admins", None, "", "With --api-tls: comma-separated SPIFFE IDs of operators whose client "
         "certificate (txmesh cert create) is enough without the token."],
        ["audit-log", None, None, "Append a JSON line per refused proxy and per certificate decision to this "
         "file ('-': standard output)."],
        ["poll-interval", None, 0.2, "Seconds between checks of the config files.", float],
        ["metrics", None, "tcp:15014:interface=127.0.0.1", "Endpoint string serving Prometheus metrics at "
         "GET /metrics ('none': off)."],
    ]
    optFlags = [
        ["insecure", None, "Plaintext channel admitting any proxy without a credential (development only)."],
        ["api-tls", None, "Serve the operator API over TLS with the pilot's certificate (mesh CA)."],
    ]
    compData = usage.Completions(optActions={"config-dir": usage.CompleteDirs(), "ca-dir": usage.CompleteDirs()})

    def postOptions(self) -> None:
        if not self["config-dir"]:
            raise usage.UsageError("--config-dir DIR is required")
        if not os.path.isdir(self["config-dir"]):
            raise usage.UsageError(f"--config-dir {self['config-dir']}: not a directory")
        try:
            interval, timeout = (float(v) for v in self["keepalive"].split(","))
        except ValueError:
            raise usage.UsageError(f"--keepalive {self['keepalive']}: expected INTERVAL,TIMEOUT in seconds") from None
        if not 0 < interval <= timeout:
            raise usage.UsageError("--keepalive: need 0 < INTERVAL <= TIMEOUT")
        self["keepalive"] = (interval, timeout)
        if self["metrics"].strip().lower() in ("", "none"):
            self["metrics"] = None
        self["api-token"] = None
        if self["api-token-file"]:
            try:
                with open(self["api-token-file"], encoding="utf-8") as f:
                    self["api-token"] = f.read().strip()
            except OSError as e:
                raise usage.UsageError(f"--api-token-file {self['api-token-file']}: {e.strerror}") from None
            if not self["api-token"]:
                raise usage.UsageError(f"--api-token-file {self['api-token-file']}: the file is empty")


@implementer(IServiceMaker, IPlugin)
class PilotServiceMaker:
    """
    Makes the C{txmesh-pilot} service.
    """

    tapname = "txmesh-pilot"
    description = "txmesh control plane: pushes proxy config built from Istio documents."
    options = PilotOptions

    def makeService(self, options: PilotOptions) -> object:
        from datetime import timedelta

        from twisted.internet import reactor

        from txmesh.config.errors import ConfigError
        from txmesh.observability.audit import AuditLog
        from txmesh.pilot.ca import CAError
        from txmesh.pilot.channel_security import ca_directory, load_channel_security
        from txmesh.pilot.mesh_config import load_pilot_settings
        from txmesh.pilot.service import PilotService

        config_dir = options["config-dir"]
        security = None
        try:
            if not options["insecure"]:
                settings = load_pilot_settings(config_dir)
                names = [n.strip() for n in options["server-names"].split(",") if n.strip()]
                reviewer = None
                if settings.kubernetes_auth is not None:
                    from txmesh.pilot.token_review import reviewer_from_settings

                    reviewer = reviewer_from_settings(settings.source, settings.kubernetes_auth, reactor)
                security = load_channel_security(options["ca-dir"] or ca_directory(config_dir),
                                                 settings.mesh.trust_domain, reactor, names,
                                                 timedelta(seconds=settings.workload_cert_ttl), reviewer)
            audit = AuditLog.open(options["audit-log"]) if options["audit-log"] else None
            return PilotService(
                config_dir, reactor, options["listen"], options["api"],
                poll_interval=options["poll-interval"], security=security,
                api_token=options["api-token"], keepalive=options["keepalive"], audit=audit,
                api_tls=bool(options["api-tls"]),
                api_admins=tuple(a.strip() for a in options["api-admins"].split(",") if a.strip()),
                metrics_listen=options["metrics"],
            )
        except (ConfigError, CAError, ValueError, OSError) as e:
            raise SystemExit(f"txmesh-pilot: {e}") from None


txmeshPilot = PilotServiceMaker()
