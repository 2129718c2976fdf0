"""
Loading and validating a proxy's static YAML config into
L{txmesh.config.model.ProxyConfig}.

Every problem is reported as a L{ConfigError} naming the file, the dotted
field path and the reason; unknown keys are errors too, so a typo never
silently changes behaviour.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml
from twisted.internet.endpoints import serverFromString

from txmesh.config.durations import parse_duration
from txmesh.config.errors import ConfigError, FilterConfigError
from txmesh.config.istio import IstioConfig, IstioWarning, translate
from txmesh.config.model import (
    DISABLED,
    ClusterConfig,
    DirectResponse,
    Endpoint,
    FilterConfig,
    HeaderMatch,
    ListenerConfig,
    NodeConfig,
    ProxyConfig,
    Route,
    RouteMatch,
    VirtualHost,
)
from txmesh.filters.registry import FilterRegistry

T = TypeVar("T")

ROUTER_FILTER = "router"
FAULT_FILTER = "fault"
LB_POLICIES = ("round_robin", "random", "least_request")
PROTOCOLS = ("http", "tcp")


class _Section:
    """
    A mapping being validated, with its field path, so every error knows
    where it is.
    """

    def __init__(self, source: str | None, path: str, value: Any):
        self.source = source
        self.path = path
        if not isinstance(value, Mapping):
            raise self.error(f"expected a mapping, got {_kind(value)}", path)
        self.value = value
        self.seen: set[str] = set()

    def error(self, reason: str, field: str | None = None) -> ConfigError:
        return ConfigError(self.source, self.path if field is None else field, reason)

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, convert: Callable[[Any], T], default: Any = None, required: bool = False) -> T:
        self.seen.add(key)
        if key not in self.value or self.value[key] is None:
            if required:
                raise self.error("is required", self.field(key))
            return default
        try:
            return convert(self.value[key])
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise self.error(str(e), self.field(key)) from None

    def sub(self, key: str) -> _Section | None:
        self.seen.add(key)
        if self.value.get(key) is None:
            return None
        return _Section(self.source, self.field(key), self.value[key])

    def items(self, key: str, required: bool = False) -> list[tuple[str, Any]]:
        self.seen.add(key)
        value = self.value.get(key)
        if value is None:
            if required:
                raise self.error("is required", self.field(key))
            return []
        if not isinstance(value, list):
            raise self.error(f"expected a list, got {_kind(value)}", self.field(key))
        return [(f"{self.field(key)}[{i}]", v) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(map(str, self.value)) - self.seen)
        if unknown:
            raise self.error(f"unknown field (known: {', '.join(sorted(self.seen))})", self.field(unknown[0]))


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number",
            float: "a number", bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    return value


def _bytes(value: Any) -> bytes:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _string(value).encode("latin-1")


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {_kind(value)}")
    return value


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CTL = re.compile(rb"[\x00-\x1f\x7f]")
_CTL_OR_SPACE = re.compile(rb"[\x00-\x20\x7f]")


def _token(value: Any) -> bytes:
    b = _bytes(value)
    if _TOKEN.fullmatch(b) is None:
        raise ValueError(f"not a valid HTTP token (header name or method): {value!r}")
    return b


def _header_value(value: Any) -> bytes:
    b = _bytes(value)
    if _CTL.search(b.replace(b"\t", b"")) is not None:
        # CR or LF here would write extra headers into every request.
        raise ValueError(f"control characters are not allowed in a header value: {value!r}")
    return b


def _no_space_or_ctl(value: Any) -> bytes:
    b = _bytes(value)
    if _CTL_OR_SPACE.search(b) is not None:
        raise ValueError(f"spaces and control characters are not allowed here: {value!r}")
    return b


def _labels(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping of label name to value, got {_kind(value)}")
    return tuple(sorted((str(k), str(x)) for k, x in value.items()))


def _each(source: str | None, items: list[tuple[str, Any]], convert: Callable[[Any], T]) -> tuple[T, ...]:
    out = []
    for field, value in items:
        try:
            out.append(convert(value))
        except (ValueError, TypeError) as e:
            raise ConfigError(source, field, str(e)) from None
    return tuple(out)


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value
    return convert


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return convert


def _regex(value: Any) -> re.Pattern[bytes]:
    try:
        return re.compile(_bytes(value))
    except re.error as e:
        raise ValueError(f"invalid regular expression: {e}") from None


def _server_endpoint(value: Any) -> str:
    desc = _string(value)
    try:
        # Parsing only: a TCP/UNIX/SSL server endpoint does nothing with
        # its reactor until listen() is called.
        serverFromString(None, desc)
    except Exception as e:
        raise ValueError(f"not a valid Twisted server endpoint string ({e})") from None
    return desc


def _header_pairs(value: Any) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of header name to value, got {_kind(value)}")
    return tuple((_token(k).lower(), _header_value(v)) for k, v in value.items())


def _endpoint(field: str, value: Any, source: str | None) -> Endpoint:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(source, field, f"expected 'host:port', got {value!r}")
        return Endpoint(host.strip("[]"), int(port))
    s = _Section(source, field, value)
    host = s.get("address", _string, required=True)
    port = s.get("port", _int_in(1, 65535), required=True)
    labels = s.get("labels", _labels, ())
    s.done()
    return Endpoint(host, port, labels)


class ConfigLoader:
    """
    Turns YAML documents into L{ProxyConfig}s, resolving filter names
    through a L{FilterRegistry}.
    """

    def __init__(self, registry: FilterRegistry):
        self._registry = registry

    def load_file(self, path: str) -> ProxyConfig:
        """
        @raise ConfigError: if the file cannot be read or is invalid.
        """
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
        return self.load_bytes(text, path)

    def load_bytes(self, text: bytes, source: str | None = None) -> ProxyConfig:
        """
        @raise ConfigError: if C{text} is not valid YAML or not a valid config.
        """
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError(source, "", f"not valid YAML: {where}{getattr(e, 'problem', e)}") from None
        return self.load_document(doc, source)

    def load_document(self, doc: Any, source: str | None = None) -> ProxyConfig:
        """
        @raise ConfigError: if C{doc} is not a valid config.
        """
        top = _Section(source, "", doc if doc is not None else {})
        node = self._node(top.sub("node"))
        admin_address = None
        admin = top.sub("admin")
        if admin is not None:
            admin_address = admin.get("address", _server_endpoint, required=True)
            admin.done()
        clusters = tuple(self._cluster(f, v, source) for f, v in top.items("clusters"))
        names = [c.name for c in clusters]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(source, f"clusters[{i}].name", f"duplicate cluster name {name!r}")
        istio = self._istio(top.sub("istio"), source)
        if istio is not None:
            translated = {c.name for c in istio.clusters}
            for i, name in enumerate(names):
                if name in translated:
                    raise ConfigError(source, f"clusters[{i}].name",
                                      f"cluster name {name!r} is also the name of a cluster translated from the "
                                      f"istio files")
            clusters += istio.clusters
            names += [c.name for c in istio.clusters]
        listeners = tuple(
            self._listener(f, v, source, set(names), istio) for f, v in top.items("listeners", required=True)
        )
        seen: dict[str, str] = {}
        for i, listener in enumerate(listeners):
            for key, what in ((listener.name, "name"), (listener.address, "address")):
                if (what, key) in seen:
                    raise ConfigError(source, f"listeners[{i}].{what}", f"duplicate listener {what} {key!r}")
                seen[(what, key)] = key  # type: ignore[index]
        top.done()
        warnings = tuple(str(w) for w in istio.warnings) if istio is not None else ()
        return ProxyConfig(listeners, clusters, admin_address, node, source, doc, warnings=warnings)

    def _istio(self, s: _Section | None, source: str | None) -> IstioConfig | None:
        """
        Read and translate the Istio YAML files named by the C{istio}
        section; paths are relative to the config file.
        """
        if s is None:
            return None
        items = s.items("files", required=True)
        files = _each(source, items, _string)
        if not files:
            raise s.error("list at least one file", s.field("files"))
        namespace = s.get("namespace", _string, "default")
        domain_suffix = s.get("domain_suffix", _string, "svc.cluster.local")
        partial = s.get("partial", _bool, False)
        s.done()
        base = os.path.dirname(source) if source else ""
        documents: list[tuple[str, int, Any]] = []
        warnings: list[IstioWarning] = []
        for (field, _), name in zip(items, files, strict=True):
            path = os.path.join(base, name)
            try:
                with open(path, "rb") as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(source, field, f"cannot read {path}: {e.strerror}") from None
            number = 0
            try:
                for number, body in enumerate(yaml.safe_load_all(text), start=1):
                    documents.append((path, number, body))
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                reason = f"not valid YAML: {where}{getattr(e, 'problem', e)}"
                if not partial:
                    raise ConfigError(path, "", reason, document=number + 1) from None
                warnings.append(IstioWarning(path, number + 1, "", f"{reason}; this and later documents of the "
                                                                   f"file are skipped"))
        result = translate(documents, namespace, domain_suffix, partial=partial)
        return IstioConfig(result.virtual_hosts, result.clusters, tuple(warnings) + result.warnings)

    def _node(self, s: _Section | None) -> NodeConfig:
        if s is None:
            return NodeConfig()
        d = NodeConfig()
        node = NodeConfig(
            id=s.get("id", _string, d.id),
            workload=s.get("workload", _string, d.workload),
            namespace=s.get("namespace", _string, d.namespace),
            app=s.get("app", _string, d.app),
            version=s.get("version", _string, d.version),
        )
        s.done()
        return node

    def _cluster(self, field: str, value: Any, source: str | None) -> ClusterConfig:
        s = _Section(source, field, value)
        name = s.get("name", _string, required=True)
        endpoints = tuple(_endpoint(f, v, source) for f, v in s.items("endpoints", required=True))
        if not endpoints:
            raise s.error("a cluster needs at least one endpoint", s.field("endpoints"))
        d = ClusterConfig(name, endpoints)
        cluster = ClusterConfig(
            name,
            endpoints,
            connect_timeout=s.get("connect_timeout", parse_duration, d.connect_timeout),
            lb_policy=s.get("lb_policy", _one_of(LB_POLICIES), d.lb_policy),
            max_idle_per_endpoint=s.get("max_idle_per_endpoint", _int_in(0, 100000), d.max_idle_per_endpoint),
            idle_timeout=s.get("idle_timeout", parse_duration, d.idle_timeout),
        )
        s.done()
        return cluster

    def _listener(self, field: str, value: Any, source: str | None, clusters: set[str],
                  istio: IstioConfig | None = None) -> ListenerConfig:
        s = _Section(source, field, value)
        name = s.get("name", _string, required=True)
        address = s.get("address", _server_endpoint, required=True)
        protocol = s.get("protocol", _one_of(PROTOCOLS), "http")
        d = ListenerConfig(name, address)
        common = dict(
            idle_timeout=s.get("idle_timeout", parse_duration, d.idle_timeout),
        )
        if protocol == "tcp":
            cluster = s.get("cluster", _string, required=True)
            if cluster not in clusters:
                raise s.error(f"unknown cluster {cluster!r}", s.field("cluster"))
            filters = tuple(self._filter(f, v, source, network=True) for f, v in s.items("network_filters"))
            s.done()
            return ListenerConfig(name, address, "tcp", cluster=cluster, network_filters=filters, **common)

        vhosts = [self._vhost(f, v, source, clusters) for f, v in s.items("virtual_hosts")]
        if "routes" in s.value:
            routes = tuple(self._route(f, v, source, clusters) for f, v in s.items("routes"))
            vhosts.append(VirtualHost("default", ("*",), routes))
        if s.get("istio_routes", _bool, False):
            if istio is None:
                raise s.error("needs a top-level 'istio' section", s.field("istio_routes"))
            vhosts.extend(istio.virtual_hosts)
        if not vhosts:
            raise s.error("an http listener needs 'routes' or 'virtual_hosts'", s.field("routes"))
        filters = [self._filter(f, v, source, network=False) for f, v in s.items("http_filters")]
        for i, f in enumerate(filters[:-1]):
            if f.name == ROUTER_FILTER:
                raise s.error("the router must be the last filter", f"{s.field('http_filters')}[{i}]")
        if not filters or filters[-1].name != ROUTER_FILTER:
            filters.append(self._filter(s.field("http_filters"), {"name": ROUTER_FILTER}, source, network=False))
        has_faults = any(r.fault is not None for vh in vhosts for r in vh.routes)
        if has_faults and all(f.name != FAULT_FILTER for f in filters) and self._registry.http(FAULT_FILTER):
            # Routes with fault injection need the fault filter, as Istio's
            # sidecars always have it: put it just before the router.
            filters.insert(len(filters) - 1,
                           self._filter(s.field("http_filters"), {"name": FAULT_FILTER}, source, network=False))
        default_host = s.get("default_host", _bytes)
        listener = ListenerConfig(
            name, address, "http",
            virtual_hosts=tuple(vhosts),
            http_filters=tuple(filters),
            request_headers_timeout=s.get("request_headers_timeout", parse_duration, d.request_headers_timeout),
            max_request_headers_bytes=s.get(
                "max_request_headers_bytes", _int_in(1024, 1 << 20), d.max_request_headers_bytes),
            default_host=default_host,
            **common,
        )
        s.done()
        return listener

    def _vhost(self, field: str, value: Any, source: str | None, clusters: set[str]) -> VirtualHost:
        s = _Section(source, field, value)
        name = s.get("name", _string, required=True)
        domains = _each(source, s.items("domains", required=True), _string)
        routes = tuple(self._route(f, v, source, clusters) for f, v in s.items("routes", required=True))
        s.done()
        return VirtualHost(name, domains, routes)

    def _route(self, field: str, value: Any, source: str | None, clusters: set[str]) -> Route:
        s = _Section(source, field, value)
        name = s.get("name", _string, field.rsplit(".", 1)[-1])
        m = s.sub("match")
        match = self._match(m) if m is not None else RouteMatch()
        cluster = s.get("cluster", _string)
        direct = None
        ds = s.sub("direct_response")
        if ds is not None:
            direct = DirectResponse(ds.get("status", _int_in(100, 999), required=True),
                                    ds.get("body", lambda v: str(v).encode("utf-8"), b""))
            ds.done()
        if (cluster is None) == (direct is None):
            raise s.error("a route needs exactly one of 'cluster' or 'direct_response'", s.field("cluster"))
        if cluster is not None and cluster not in clusters:
            raise s.error(f"unknown cluster {cluster!r}", s.field("cluster"))
        overrides = []
        fs = s.sub("filters")
        if fs is not None:
            for fname, raw in fs.value.items():
                ffield = fs.field(str(fname))
                factory = self._registry.http(fname)
                if factory is None:
                    raise ConfigError(source, ffield, self._unknown_filter(fname, network=False))
                if fname == ROUTER_FILTER:
                    raise ConfigError(source, ffield, "the router cannot be configured or disabled per route")
                overrides.append((fname, DISABLED if raw is None else self._parse_filter(factory, raw, ffield, source)))
        route = Route(
            name=name,
            match=match,
            cluster=cluster,
            direct_response=direct,
            timeout=s.get("timeout", parse_duration, 15.0),
            prefix_rewrite=s.get("prefix_rewrite", _no_space_or_ctl),
            host_rewrite=s.get("host_rewrite", _no_space_or_ctl),
            request_headers_to_add=s.get("request_headers_to_add", _header_pairs, ()),
            response_headers_to_add=s.get("response_headers_to_add", _header_pairs, ()),
            filter_overrides=tuple(overrides),
        )
        if route.prefix_rewrite is not None and route.match.regex is not None:
            raise s.error("prefix_rewrite needs a prefix or path match, not a regex", s.field("prefix_rewrite"))
        s.done()
        return route

    def _match(self, s: _Section) -> RouteMatch:
        kinds = [k for k in ("prefix", "path", "regex") if s.value.get(k) is not None]
        if len(kinds) > 1:
            raise s.error(f"set only one of prefix, path, regex (got {', '.join(kinds)})", s.field(kinds[1]))
        prefix = s.get("prefix", _bytes)
        path = s.get("path", _bytes)
        regex = s.get("regex", _regex)
        for key, v in (("prefix", prefix), ("path", path)):
            if v is not None and not v.startswith(b"/"):
                raise s.error("must start with '/'", s.field(key))
        if not kinds:
            prefix = b"/"
        headers = tuple(self._header_match(f, v, s.source) for f, v in s.items("headers"))
        methods = tuple(m.upper() for m in _each(s.source, s.items("methods"), _token))
        s.done()
        return RouteMatch(prefix=prefix, path=path, regex=regex, headers=headers, methods=methods)

    def _header_match(self, field: str, value: Any, source: str | None) -> HeaderMatch:
        s = _Section(source, field, value)
        name = s.get("name", _token, required=True).lower()
        kinds = [k for k in ("exact", "prefix", "regex", "present") if s.value.get(k) is not None]
        if len(kinds) > 1:
            raise s.error(f"set only one of exact, prefix, regex, present (got {', '.join(kinds)})",
                          s.field(kinds[1]))
        hm = HeaderMatch(
            name=name,
            exact=s.get("exact", _bytes),
            prefix=s.get("prefix", _bytes),
            regex=s.get("regex", _regex),
            present=s.get("present", _bool) if kinds == ["present"] or not kinds else None,
            invert=s.get("invert", _bool, False),
        )
        if not kinds:
            hm = HeaderMatch(name=name, present=True, invert=hm.invert)
        s.done()
        return hm

    def _unknown_filter(self, name: Any, network: bool) -> str:
        known = self._registry.network_names() if network else self._registry.http_names()
        kind = "network" if network else "HTTP"
        return f"unknown {kind} filter {name!r} (installed: {', '.join(known) or 'none'})"

    def _parse_filter(self, factory: Any, raw: Any, field: str, source: str | None) -> Any:
        if not isinstance(raw, Mapping):
            raise ConfigError(source, field, f"filter config must be a mapping, got {_kind(raw)}")
        try:
            return factory.parse_config(raw)
        except FilterConfigError as e:
            raise ConfigError(source, f"{field}.{e.field}" if e.field else field, e.reason) from None
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(source, field, f"invalid filter config: {e}") from None

    def _filter(self, field: str, value: Any, source: str | None, network: bool) -> FilterConfig:
        s = _Section(source, field, value)
        name = s.get("name", _string, required=True)
        factory = self._registry.network(name) if network else self._registry.http(name)
        if factory is None:
            raise s.error(self._unknown_filter(name, network), s.field("name"))
        s.seen.add("config")
        config = self._parse_filter(factory, s.value.get("config") or {}, s.field("config"), source)
        s.done()
        return FilterConfig(name, factory, config)
