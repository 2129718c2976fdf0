"""
Tests for L{txmesh.proxy.router}: virtual-host selection by authority, and
route matching by path, headers and method.  Pure values in, pure values
out: no reactor.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.model import HeaderMatch, Route, RouteMatch, VirtualHost
from txmesh.proxy.router import RouteTable, header_matches, route_matches
from txmesh.proxy.stream import Headers, RequestHead


def head(path: bytes = b"/", authority: bytes = b"example.com", method: bytes = b"GET",
         headers: list[tuple[bytes, bytes]] | None = None) -> RequestHead:
    return RequestHead(method, path, authority, Headers(headers or []))


def vhost(name: str, *domains: str, routes: tuple[Route, ...] | None = None) -> VirtualHost:
    """
    A virtual host whose single catch-all route is named after it.
    """
    if routes is None:
        routes = (Route(name, RouteMatch(), cluster=name),)
    return VirtualHost(name, domains, routes)


class VirtualHostSelectionTests(SynchronousTestCase):
    """
    L{RouteTable.virtual_host}: exact, then suffix wildcards longest first,
    then prefix wildcards longest first, then C{*}.
    """

    def setUp(self):
        self.table = RouteTable([
            vhost("exact", "example.com"),
            vhost("exact-port", "example.com:8080"),
            vhost("suffix", "*.example.com"),
            vhost("longer-suffix", "*.api.example.com"),
            vhost("prefix", "api.*"),
            vhost("longer-prefix", "api.internal.*"),
            vhost("ipv6", "[::1]"),
            vhost("ipv4", "10.0.0.1"),
            vhost("any", "*"),
        ])

    def name(self, authority: bytes) -> str | None:
        vh = self.table.virtual_host(authority)
        return None if vh is None else vh.name

    def test_exact(self):
        self.assertEqual(self.name(b"example.com"), "exact")

    def test_exact_ignores_port(self):
        self.assertEqual(self.name(b"example.com:80"), "exact")
        self.assertEqual(self.name(b"example.com:443"), "exact")

    def test_exact_with_port_wins(self):
        self.assertEqual(self.name(b"example.com:8080"), "exact-port")

    def test_case_insensitive(self):
        self.assertEqual(self.name(b"EXAMPLE.Com"), "exact")
        self.assertEqual(self.name(b"Example.COM:8080"), "exact-port")
        self.assertEqual(self.name(b"WWW.EXAMPLE.COM"), "suffix")
        self.assertEqual(self.name(b"API.other"), "prefix")

    def test_domains_case_insensitive(self):
        table = RouteTable([vhost("upper", "Shop.Example.COM"), vhost("wild", "*.Example.ORG")])
        self.assertEqual(table.virtual_host(b"shop.example.com").name, "upper")
        self.assertEqual(table.virtual_host(b"a.example.org").name, "wild")

    def test_suffix_wildcard(self):
        self.assertEqual(self.name(b"www.example.com"), "suffix")
        self.assertEqual(self.name(b"a.b.example.com:9000"), "suffix")

    def test_suffix_wildcard_needs_a_label(self):
        """
        C{*.example.com} does not match C{example.com} itself (here the exact
        entry takes it), nor the empty label C{.example.com}.
        """
        table = RouteTable([vhost("suffix", "*.example.com")])
        self.assertIsNone(table.virtual_host(b"example.com"))
        self.assertIsNone(table.virtual_host(b".example.com"))
        self.assertIsNone(table.virtual_host(b"badexample.com"))

    def test_longest_suffix_first(self):
        self.assertEqual(self.name(b"v1.api.example.com"), "longer-suffix")

    def test_longest_suffix_first_whatever_the_order(self):
        table = RouteTable([vhost("short", "*.com"), vhost("long", "*.example.com")])
        self.assertEqual(table.virtual_host(b"a.example.com").name, "long")
        self.assertEqual(table.virtual_host(b"a.other.com").name, "short")

    def test_suffix_before_prefix(self):
        # Both "*.example.com" and "api.*" match: suffix wildcards win.
        self.assertEqual(self.name(b"api.example.com"), "suffix")

    def test_prefix_wildcard(self):
        self.assertEqual(self.name(b"api.other"), "prefix")
        self.assertEqual(self.name(b"api.other:8443"), "prefix")

    def test_prefix_wildcard_needs_more(self):
        table = RouteTable([vhost("prefix", "api.*")])
        self.assertIsNone(table.virtual_host(b"api."))
        self.assertIsNone(table.virtual_host(b"apix.com"))

    def test_longest_prefix_first(self):
        self.assertEqual(self.name(b"api.internal.svc"), "longer-prefix")

    def test_ipv6_authority(self):
        self.assertEqual(self.name(b"[::1]:80"), "ipv6")
        self.assertEqual(self.name(b"[::1]"), "ipv6")
        self.assertEqual(self.name(b"[::2]:80"), "any")

    def test_ipv4_authority(self):
        self.assertEqual(self.name(b"10.0.0.1:8080"), "ipv4")
        self.assertEqual(self.name(b"10.0.0.2"), "any")

    def test_any(self):
        self.assertEqual(self.name(b"unknown.test"), "any")
        self.assertEqual(self.name(b""), "any")

    def test_no_match(self):
        table = RouteTable([vhost("exact", "example.com"), vhost("suffix", "*.example.com")])
        self.assertIsNone(table.virtual_host(b"example.org"))
        self.assertIsNone(table.match(head(authority=b"example.org")))

    def test_first_virtual_host_wins_for_same_domain(self):
        table = RouteTable([vhost("first", "example.com", "*"), vhost("second", "example.com", "*")])
        self.assertEqual(table.virtual_host(b"example.com").name, "first")
        self.assertEqual(table.virtual_host(b"other").name, "first")

    def test_virtual_hosts_kept_in_order(self):
        hosts = [vhost("a", "a"), vhost("b", "b")]
        self.assertEqual(RouteTable(hosts).virtual_hosts, tuple(hosts))

    def test_wildcard_domain_with_port(self):
        table = RouteTable([vhost("wild-port", "*.example.com:8080"), vhost("any", "*")])
        self.assertEqual(table.virtual_host(b"a.example.com:8080").name, "wild-port")
        self.assertEqual(table.virtual_host(b"a.example.com:9090").name, "any")



class RouteMatchTests(SynchronousTestCase):
    """
    L{route_matches}: path conditions, headers and methods.
    """

    def test_default_matches_everything(self):
        m = RouteMatch()
        for path in (b"/", b"/a/b", b"/?q", b"*"):
            self.assertEqual(route_matches(m, head(path)), path != b"*", path)

    def test_prefix(self):
        m = RouteMatch(prefix=b"/api/")
        self.assertTrue(route_matches(m, head(b"/api/")))
        self.assertTrue(route_matches(m, head(b"/api/users/1")))
        self.assertFalse(route_matches(m, head(b"/api")))
        self.assertFalse(route_matches(m, head(b"/apix/")))

    def test_prefix_is_not_segment_aware(self):
        # As in Envoy: a prefix is a byte prefix, not a path segment.
        self.assertTrue(route_matches(RouteMatch(prefix=b"/api"), head(b"/apix")))

    def test_prefix_case_sensitive(self):
        self.assertFalse(route_matches(RouteMatch(prefix=b"/api/"), head(b"/API/users")))

    def test_path_exact(self):
        m = RouteMatch(prefix=None, path=b"/healthz")
        self.assertTrue(route_matches(m, head(b"/healthz")))
        self.assertFalse(route_matches(m, head(b"/healthz/")))
        self.assertFalse(route_matches(m, head(b"/healthzz")))
        self.assertFalse(route_matches(m, head(b"/")))

    def test_path_exact_wins_over_default_prefix(self):
        # The model's default prefix does not widen an exact path match.
        self.assertFalse(route_matches(RouteMatch(path=b"/healthz"), head(b"/other")))

    def test_regex(self):
        m = RouteMatch(prefix=None, regex=re.compile(rb"/users/[0-9]+"))
        self.assertTrue(route_matches(m, head(b"/users/42")))
        self.assertFalse(route_matches(m, head(b"/users/42/posts")), "regex must match the whole path")
        self.assertFalse(route_matches(m, head(b"/x/users/42")))
        self.assertFalse(route_matches(m, head(b"/users/abc")))

    def test_regex_wins_over_default_prefix(self):
        self.assertFalse(route_matches(RouteMatch(regex=re.compile(rb"/a")), head(b"/b")))

    def test_query_string_ignored(self):
        self.assertTrue(route_matches(RouteMatch(prefix=None, path=b"/search"), head(b"/search?q=1&x=/y")))
        self.assertTrue(route_matches(RouteMatch(prefix=b"/a/"), head(b"/a/?b")))
        self.assertFalse(route_matches(RouteMatch(prefix=b"/a/"), head(b"/a?/a/")))
        self.assertTrue(route_matches(RouteMatch(prefix=None, regex=re.compile(rb"/s")), head(b"/s?q=1")))
        self.assertFalse(route_matches(RouteMatch(prefix=None, regex=re.compile(rb"/s\?q=1")), head(b"/s?q=1")))

    def test_methods(self):
        m = RouteMatch(methods=(b"GET", b"HEAD"))
        self.assertTrue(route_matches(m, head(method=b"GET")))
        self.assertTrue(route_matches(m, head(method=b"HEAD")))
        self.assertFalse(route_matches(m, head(method=b"POST")))

    def test_methods_and_path_both_required(self):
        m = RouteMatch(prefix=b"/admin", methods=(b"POST",))
        self.assertTrue(route_matches(m, head(b"/admin/x", method=b"POST")))
        self.assertFalse(route_matches(m, head(b"/admin/x", method=b"GET")))
        self.assertFalse(route_matches(m, head(b"/x", method=b"POST")))

    def test_all_header_conditions_required(self):
        m = RouteMatch(headers=(HeaderMatch(b"x-a", exact=b"1"), HeaderMatch(b"x-b", present=True)))
        self.assertTrue(route_matches(m, head(headers=[(b"x-a", b"1"), (b"x-b", b"")])))
        self.assertFalse(route_matches(m, head(headers=[(b"x-a", b"1")])))
        self.assertFalse(route_matches(m, head(headers=[(b"x-b", b"1")])))


class HeaderMatchTests(SynchronousTestCase):
    """
    L{header_matches}.
    """

    def check(self, m: HeaderMatch, headers: list[tuple[bytes, bytes]]) -> bool:
        return header_matches(m, Headers(headers))

    def test_exact(self):
        m = HeaderMatch(b"x-env", exact=b"canary")
        self.assertTrue(self.check(m, [(b"x-env", b"canary")]))
        self.assertFalse(self.check(m, [(b"x-env", b"Canary")]), "values are case-sensitive")
        self.assertFalse(self.check(m, [(b"x-env", b"canary2")]))
        self.assertFalse(self.check(m, []))

    def test_name_case_insensitive(self):
        m = HeaderMatch(b"X-Env", exact=b"canary")
        self.assertTrue(self.check(m, [(b"x-env", b"canary")]))

    def test_prefix(self):
        m = HeaderMatch(b"user-agent", prefix=b"curl/")
        self.assertTrue(self.check(m, [(b"user-agent", b"curl/8.0")]))
        self.assertFalse(self.check(m, [(b"user-agent", b"Mozilla curl/8.0")]))
        self.assertFalse(self.check(m, []))

    def test_regex(self):
        m = HeaderMatch(b"x-version", regex=re.compile(rb"v[0-9]+"))
        self.assertTrue(self.check(m, [(b"x-version", b"v12")]))
        self.assertFalse(self.check(m, [(b"x-version", b"v12-beta")]), "regex must match the whole value")
        self.assertFalse(self.check(m, [(b"x-version", b"xv1")]))
        self.assertFalse(self.check(m, []))

    def test_present(self):
        m = HeaderMatch(b"authorization", present=True)
        self.assertTrue(self.check(m, [(b"authorization", b"Bearer x")]))
        self.assertTrue(self.check(m, [(b"authorization", b"")]), "an empty value is still present")
        self.assertFalse(self.check(m, []))

    def test_absent(self):
        m = HeaderMatch(b"authorization", present=False)
        self.assertTrue(self.check(m, []))
        self.assertFalse(self.check(m, [(b"authorization", b"x")]))

    def test_name_only(self):
        # No condition on the value: the header must be there.
        m = HeaderMatch(b"x-a")
        self.assertTrue(self.check(m, [(b"x-a", b"anything")]))
        self.assertFalse(self.check(m, []))

    def test_invert_exact(self):
        m = HeaderMatch(b"x-env", exact=b"prod", invert=True)
        self.assertFalse(self.check(m, [(b"x-env", b"prod")]))
        self.assertTrue(self.check(m, [(b"x-env", b"dev")]))
        self.assertTrue(self.check(m, []), "invert negates the result, and a missing header does not match")

    def test_invert_prefix(self):
        m = HeaderMatch(b"x-env", prefix=b"prod", invert=True)
        self.assertFalse(self.check(m, [(b"x-env", b"prod-eu")]))
        self.assertTrue(self.check(m, [(b"x-env", b"dev")]))

    def test_invert_regex(self):
        m = HeaderMatch(b"x-id", regex=re.compile(rb"[0-9]{3}"), invert=True)
        self.assertTrue(self.check(m, [(b"x-id", b"1234")]))
        self.assertFalse(self.check(m, [(b"x-id", b"123")]))

    def test_invert_present(self):
        m = HeaderMatch(b"x-debug", present=True, invert=True)
        self.assertTrue(self.check(m, []))
        self.assertFalse(self.check(m, [(b"x-debug", b"1")]))


class RouteTableMatchTests(SynchronousTestCase):
    """
    L{RouteTable.match}: the first matching route of the chosen virtual host.
    """

    def setUp(self):
        self.api_routes = (
            Route("health", RouteMatch(prefix=None, path=b"/healthz"), cluster="health"),
            Route("canary", RouteMatch(prefix=b"/v1/", headers=(HeaderMatch(b"x-canary", exact=b"1"),)),
                  cluster="canary"),
            Route("v1-write", RouteMatch(prefix=b"/v1/", methods=(b"POST", b"PUT")), cluster="writer"),
            Route("v1", RouteMatch(prefix=b"/v1/"), cluster="v1"),
            Route("users", RouteMatch(prefix=None, regex=re.compile(rb"/users/[0-9]+")), cluster="users"),
        )
        self.table = RouteTable([
            VirtualHost("api", ("api.example.com",), self.api_routes),
            vhost("fallback", "*"),
        ])

    def name(self, h: RequestHead) -> str | None:
        route = self.table.match(h)
        return None if route is None else route.name

    def test_first_match_wins(self):
        self.assertEqual(self.name(head(b"/v1/x", b"api.example.com", headers=[(b"x-canary", b"1")])), "canary")
        self.assertEqual(
            self.name(head(b"/v1/x", b"api.example.com", b"POST", headers=[(b"x-canary", b"1")])), "canary")
        self.assertEqual(self.name(head(b"/v1/x", b"api.example.com", b"POST")), "v1-write")
        self.assertEqual(self.name(head(b"/v1/x", b"api.example.com", b"GET")), "v1")

    def test_exact_path_and_regex(self):
        self.assertEqual(self.name(head(b"/healthz?full=1", b"api.example.com")), "health")
        self.assertEqual(self.name(head(b"/users/7", b"API.example.com:443")), "users")

    def test_no_route_in_virtual_host(self):
        self.assertIsNone(self.table.match(head(b"/other", b"api.example.com")))
        self.assertIsNone(self.table.match(head(b"/users/x", b"api.example.com")))

    def test_other_hosts_go_to_fallback(self):
        self.assertEqual(self.name(head(b"/v1/x", b"www.example.com")), "fallback")

    def test_returns_the_route(self):
        self.assertIs(self.table.match(head(b"/healthz", b"api.example.com")), self.api_routes[0])

    def test_empty_table(self):
        self.assertIsNone(RouteTable([]).match(head()))
        self.assertIsNone(RouteTable([]).virtual_host(b"example.com"))

    def test_direct_response_route(self):
        from txmesh.config.model import DirectResponse

        route = Route("teapot", RouteMatch(), direct_response=DirectResponse(418, b"short and stout"))
        table = RouteTable([VirtualHost("v", ("*",), (route,))])
        self.assertIs(table.match(head()), route)


class TrafficMatchTests(SynchronousTestCase):
    """
    Query parameters, ports and source labels (Istio's C{queryParams},
    C{port} and C{sourceLabels}).
    """

    def head(self, path=b"/", authority=b"svc", scheme=b"http"):
        from txmesh.proxy.stream import Headers, RequestHead

        return RequestHead(b"GET", path, authority, Headers(), scheme)

    def test_query_params(self):
        from txmesh.config.model import HeaderMatch, RouteMatch
        from txmesh.proxy.router import route_matches

        m = RouteMatch(query_params=(HeaderMatch(b"user", exact=b"jason bob"),))
        self.assertTrue(route_matches(m, self.head(b"/p?x=1&user=jason+bob")))
        self.assertTrue(route_matches(m, self.head(b"/p?user=jason%20bob#frag")))
        self.assertFalse(route_matches(m, self.head(b"/p?user=jason")))
        self.assertFalse(route_matches(m, self.head(b"/p")))

    def test_port(self):
        from txmesh.config.model import RouteMatch
        from txmesh.proxy.router import route_matches

        m = RouteMatch(port=9080)
        self.assertTrue(route_matches(m, self.head(authority=b"reviews:9080")))
        self.assertFalse(route_matches(m, self.head(authority=b"reviews")))
        self.assertTrue(route_matches(RouteMatch(port=80), self.head(authority=b"reviews")))
        self.assertTrue(route_matches(RouteMatch(port=443), self.head(authority=b"[::1]", scheme=b"https")))

    def test_source_labels_filter_routes(self):
        from txmesh.config.model import Route, RouteMatch, VirtualHost
        from txmesh.proxy.router import RouteTable

        only_v2 = Route("from-v2", RouteMatch(source_labels=(("version", "v2"),)), cluster="a")
        default = Route("default", RouteMatch(), cluster="b")
        vhosts = [VirtualHost("vh", ("*",), (only_v2, default))]
        self.assertEqual(RouteTable(vhosts, {"version": "v2"}).match(self.head()).name, "from-v2")
        self.assertEqual(RouteTable(vhosts, {"version": "v1"}).match(self.head()).name, "default")
        self.assertEqual(RouteTable(vhosts).match(self.head()).name, "default")
