"""
txmesh's Twisted plugins: the C{txmesh-proxy} twistd command and the
built-in filters (found by name through L{twisted.plugin.getPlugins}).
"""

from __future__ import annotations

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

    synopsis = "--config FILE [options]"
    longdesc = (
        "Run a txmesh sidecar proxy from a static YAML config file: HTTP/1.1 and "
        "TCP listeners, routes, clusters and filters, plus an admin endpoint. "
        "SIGHUP (or --watch) reloads the file; an invalid file is refused and the "
        "running config keeps serving."
    )
    optParameters = [
        ["config", "c", None, "The proxy's YAML config file (required)."],
        ["watch", "w", 0.0, "Seconds between checks of the config file for changes (0: only on SIGHUP).", float],
        ["drain-timeout", None, 5.0, "Seconds in-flight requests get to finish at shutdown.", float],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.yaml")})

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


@implementer(IServiceMaker, IPlugin)
class ProxyServiceMaker:
    """
    Makes the C{txmesh-proxy} service.
    """

    tapname = "txmesh-proxy"
    description = "txmesh data plane: a sidecar HTTP/1.1 and TCP proxy with Python filters."
    options = ProxyOptions

    def makeService(self, options: ProxyOptions) -> object:
        from twisted.internet import reactor

        from txmesh.config.errors import ConfigError
        from txmesh.proxy.service import ProxyService

        service = ProxyService(
            options["config"], reactor,
            watch_interval=options["watch"], drain_timeout=options["drain-timeout"],
        )
        try:
            service.load_initial()
        except ConfigError as e:
            sys.stderr.write(f"txmesh-proxy: invalid config: {e}\n")
            raise SystemExit(2) from None
        return service


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
