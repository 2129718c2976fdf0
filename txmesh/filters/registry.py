"""
Finding filter factories by name among installed Twisted plugins.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.plugin import getPlugins

from txmesh.filters.api import IHTTPFilterFactory, INetworkFilterFactory


class FilterRegistry:
    """
    Filter factories by name, for HTTP and network filters.

    Built from plugins with L{from_plugins}, or from explicit factories
    (tests, embedding).
    """

    def __init__(
        self,
        http: Iterable[object] = (),
        network: Iterable[object] = (),
    ):
        self._http = {f.name: f for f in http}
        self._network = {f.name: f for f in network}

    @classmethod
    def from_plugins(cls, extra_http: Iterable[object] = (), extra_network: Iterable[object] = ()) -> FilterRegistry:
        """
        Collect every L{IHTTPFilterFactory} and L{INetworkFilterFactory}
        plugin installed under any C{twisted/plugins/} directory on
        C{sys.path}; txmesh's own built-ins are among them.
        """
        import twisted.plugins

        http = list(getPlugins(IHTTPFilterFactory, twisted.plugins)) + list(extra_http)
        network = list(getPlugins(INetworkFilterFactory, twisted.plugins)) + list(extra_network)
        return cls(http, network)

    def http(self, name: str) -> object | None:
        """
        @return: the HTTP filter factory called C{name}, or C{None}.
        """
        return self._http.get(name)

    def network(self, name: str) -> object | None:
        """
        @return: the network filter factory called C{name}, or C{None}.
        """
        return self._network.get(name)

    def http_factories(self) -> list[object]:
        """
        @return: every HTTP filter factory, by name.
        """
        return [self._http[name] for name in sorted(self._http)]

    def http_names(self) -> list[str]:
        """
        @return: sorted names of known HTTP filters.
        """
        return sorted(self._http)

    def network_names(self) -> list[str]:
        """
        @return: sorted names of known network filters.
        """
        return sorted(self._network)
