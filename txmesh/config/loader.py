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

import attrs
import yaml

from txmesh.config.durations import parse_duration
from txmesh.config.errors import ConfigError, FilterConfigError
from txmesh.config.istio import IstioConfig, IstioWarning, translate
from txmesh.config.model import (
    CAPTURE_MODES,
    DISABLED,
    CaptureConfig,
    CircuitBreakerConfig,
    ClusterConfig,
    DirectResponse,
    Endpoint,
    FaultPolicy,
    FilterConfig,
    ForwardProxyConfig,
    HashPolicy,
    HeaderMatch,
    HeaderOps,
    HealthCheckConfig,
    ListenerConfig,
    ListenerTLS,
    MirrorPolicy,
    NodeConfig,
    OutlierDetectionConfig,
    OverloadConfig,
    PilotConfig,
    ProxyConfig,
    Redirect,
    RetryPolicy,
    Route,
    RouteMatch,
    SNIRoute,
    SubsetConfig,
    UpstreamTLS,
    VirtualHost,
    WeightedDestination,
)
from txmesh.config.section import Section as _Section
from txmesh.config.values import boolean as _bool
from txmesh.config.values import client_endpoint as _client_endpoint
from txmesh.config.values import header_value as _header_value
from txmesh.config.values import int_in as _int_in
from txmesh.config.values import kind_of as _kind
from txmesh.config.values import labels as _labels
from txmesh.config.values import one_of as _one_of
from txmesh.config.values import percent as _percent
from txmesh.config.values import regex as _regex
from txmesh.config.values import server_endpoint as _server_endpoint
from txmesh.config.values import string as _string
from txmesh.filters.registry import FilterRegistry
from txmesh.proxy.retry import KNOWN_CONDITIONS
from txmesh.proxy.tls import (
    ALPN_PROTOCOLS,
    MIN_VERSIONS,
    TLSConfigError,
    client_options,
    load_certificates,
    server_options,
)

T = TypeVar("T")


def watched_mtimes(path: str, config: ProxyConfig | None) -> tuple[float | None, ...]:
    """
    @return: the modification times of the config file C{path} and of the
        files C{config} was read from besides it (its Istio documents), for
        C{--watch} to compare; C{None} for a file that cannot be read.
    """
    times: list[float | None] = []
    for name in (path, *(config.included_files if config is not None else ())):
        try:
            times.append(os.stat(name).st_mtime)
        except OSError:
            times.append(None)
    return tuple(times)


def _request_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1_000_000:
        raise ValueError(f"expected requests per second from 0 (no limit) to 1000000, got {value!r}")
    return float(value)

ROUTER_FILTER = "router"
FAULT_FILTER = "fault"
ACCESS_LOG_FILTER = "access_log"
LB_POLICIES = ("round_robin", "random", "least_request", "consistent_hash")
PROTOCOLS = ("http", "tcp")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
UPSTREAM_TLS_MODES = ("SIMPLE", "MUTUAL", "ISTIO_MUTUAL")


def _spiffe_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of SPIFFE IDs, got {_kind(value)}")
    for item in value:
        if not isinstance(item, str) or not item.startswith("spiffe://"):
            raise ValueError(f"expected SPIFFE IDs (spiffe://trust-domain/ns/NS/sa/SA), got {item!r}")
    return tuple(value)


def _positive_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, not {value!r}")
    return float(value)


# The event-loop lag thresholds of an overload section's event_loop_lag
# that does not give them: generous, as a lag of half a second already
# delays every request by as much.
DEFAULT_LAG_SHED_REQUESTS = 0.5
DEFAULT_LAG_REFUSE_CONNECTIONS = 2.0

_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?\s*$")
_BYTE_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def _byte_size(value: Any) -> int:
    """
    A memory size: a number of bytes, or a string with a Kubernetes suffix
    (C{512Mi}, C{2Gi}, C{1500M}); at least 1Mi.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _BYTE_SIZE.match(value) if isinstance(value, str) else None
        if m is None:
            raise ValueError(f"expected a number of bytes or a size like '512Mi' or '2Gi', got {value!r}")
        size = int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])
    if size < 1 << 20:
        raise ValueError(f"must be at least 1Mi (1048576 bytes), got {value!r}")
    return size


def _memory_share(value: Any) -> float:
    """
    A share of a memory limit: a percent, as a number (C{80}) or written
    with its sign (C{'80%'}), from 10 to 100; as a fraction.
    """
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.endswith("%"):
        try:
            value = float(text[:-1])
        except ValueError:
            raise ValueError(f"expected a percent like 80 or '80%', got {text!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a percent like 80 or '80%', got {_kind(value)}")
    if not 10 <= value <= 100:
        # Below 10% the proxy would shed load at a size it always has: a
        # fraction (0.8) written where a percent (80) was meant.
        raise ValueError(f"must be a percent from 10 to 100, got {value!r}")
    return value / 100


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def _overload_interval(value: Any) -> float:
    seconds = parse_duration(value)
    if not 0.001 <= seconds <= 60:
        raise ValueError(f"must be from 1ms to 1m, got {value!r}")
    return seconds


def _bytes(value: Any) -> bytes:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _string(value).encode("latin-1")


_EPHEMERAL_PORT = re.compile(r"(tcp6?|ssl):(port=)?0(:|$)")

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CTL_OR_SPACE = re.compile(rb"[\x00-\x20\x7f]")


def _token(value: Any) -> bytes:
    b = _bytes(value)
    if _TOKEN.fullmatch(b) is None:
        raise ValueError(f"not a valid HTTP token (header name or method): {value!r}")
    return b


def _no_space_or_ctl(value: Any) -> bytes:
    b = _bytes(value)
    if _CTL_OR_SPACE.search(b) is not None:
        raise ValueError(f"spaces and control characters are not allowed here: {value!r}")
    return b


def _host_pattern(value: Any) -> str:
    pattern = _string(value)
    if pattern.startswith("[") and pattern.endswith("]"):
        pattern = pattern[1:-1]  # an IPv6 literal as written in a URL
    elif pattern.count(":") == 1:
        raise ValueError(f"give a host without a port, got {value!r}")
    if not pattern or _CTL_OR_SPACE.search(pattern.encode("utf-8")) is not None:
        raise ValueError(f"expected a host name, an IP address or a pattern like '*.example.com', got {value!r}")
    return pattern


def _each(source: str | None, items: list[tuple[str, Any]], convert: Callable[[Any], T]) -> tuple[T, ...]:
    out = []
    for field, value in items:
        try:
            out.append(convert(value))
        except (ValueError, TypeError) as e:
            raise ConfigError(source, field, str(e)) from None
    return tuple(out)


def _one_of_int(choices: tuple[int, ...]) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if value not in choices or isinstance(value, bool):
            raise ValueError(f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    return convert


def _header_pairs(value: Any) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of header name to value, got {_kind(value)}")
    return tuple((_token(k).lower(), _header_value(v)) for k, v in value.items())


def _request_header_pairs(value: Any) -> tuple[tuple[bytes, bytes], ...]:
    pairs = _header_pairs(value)
    if any(name == b"host" for name, _ in pairs):
        # A second Host header would reach the upstream; the authority has
        # its own setting.
        raise ValueError("the Host header is set with host_rewrite, not as a header")
    return pairs


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
    weight = s.get("weight", _int_in(1, 1 << 16), 1)
    locality = s.get("locality", _string, "")
    s.done()
    return Endpoint(host, port, labels, weight, locality)


def _subset_of(cluster: ClusterConfig) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        name = _string(value)
        known = [subset.name for subset in cluster.subsets]
        if name not in known:
            raise ValueError(f"cluster {cluster.name!r} has no subset {name!r} "
                             f"(subsets: {', '.join(known) or 'none'})")
        return name
    return convert


def _retry_on(value: Any) -> frozenset[str]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected a list (or comma-separated string) of retry conditions")
    out = set()
    for item in items:
        item = str(item).strip()
        if item not in KNOWN_CONDITIONS and not (item.isdigit() and 100 <= int(item) <= 599):
            raise ValueError(f"unknown retry condition {item!r} (known: {', '.join(sorted(KNOWN_CONDITIONS))}, "
                             f"or a status code)")
        out.add(item)
    return frozenset(out)


class ConfigLoader:
    """
    Turns YAML documents into L{ProxyConfig}s, resolving filter names
    through a L{FilterRegistry}.
    """

    def __init__(self, registry: FilterRegistry):
        self.registry = registry
        self._included: tuple[str, ...] = ()

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
        pilot = self._pilot(top.sub("pilot"))
        overload = self._overload(top.sub("overload"))
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
            clusters += tuple(self._with_ca(c, source) for c in istio.clusters)
            names += [c.name for c in istio.clusters]
        listeners = tuple(
            self._listener(f, v, source, {c.name: c for c in clusters}, istio)
            # With a pilot, listeners may come from it alone.
            for f, v in top.items("listeners", required=pilot is None)
        )
        seen: dict[str, str] = {}
        for i, listener in enumerate(listeners):
            for key, what in ((listener.name, "name"), (listener.address, "address")):
                if what == "address" and _EPHEMERAL_PORT.match(key):
                    continue  # port 0: each listener gets its own port
                if (what, key) in seen:
                    raise ConfigError(source, f"listeners[{i}].{what}", f"duplicate listener {what} {key!r}")
                seen[(what, key)] = key  # type: ignore[index]
        top.done()
        warnings = tuple(str(w) for w in istio.warnings) if istio is not None else ()
        included, self._included = self._included, ()
        return ProxyConfig(listeners, clusters, admin_address, node, source, doc, warnings=warnings,
                           included_files=included if istio is not None else (), pilot=pilot,
                           overload=overload)

    def _overload(self, s: _Section | None) -> OverloadConfig | None:
        """
        The C{overload} section: C{interval}, C{cooldown}, and optional
        C{memory} (C{limit}, C{shed_requests}, C{refuse_connections} as
        percentages of the limit) and C{event_loop_lag} (C{shed_requests},
        C{refuse_connections} as durations) thresholds.
        """
        if s is None:
            return None
        d = OverloadConfig()
        interval = s.get("interval", _overload_interval, d.interval)
        cooldown = s.get("cooldown", parse_duration, d.cooldown)
        memory_limit = None
        memory_shed, memory_refuse = d.memory_shed_requests, d.memory_refuse_connections
        memory = s.sub("memory")
        if memory is not None:
            memory_limit = memory.get("limit", _byte_size, required=True)
            memory_shed = memory.get("shed_requests", _memory_share, memory_shed)
            memory_refuse = memory.get("refuse_connections", _memory_share, memory_refuse)
            if memory_refuse < memory_shed:
                raise memory.error(f"must be at least shed_requests (by default it is "
                                   f"{d.memory_refuse_connections:.0%})", memory.field("refuse_connections"))
            memory.done()
        lag_shed = lag_refuse = None
        lag = s.sub("event_loop_lag")
        if lag is not None:
            lag_shed = lag.get("shed_requests", _positive_duration, DEFAULT_LAG_SHED_REQUESTS)
            lag_refuse = lag.get("refuse_connections", _positive_duration, DEFAULT_LAG_REFUSE_CONNECTIONS)
            if lag_refuse < lag_shed:
                raise lag.error(f"must be at least shed_requests (by default it is "
                                f"{DEFAULT_LAG_REFUSE_CONNECTIONS:g}s)", lag.field("refuse_connections"))
            lag.done()
        s.done()
        return OverloadConfig(interval=interval, cooldown=cooldown, memory_limit=memory_limit,
                              memory_shed_requests=memory_shed, memory_refuse_connections=memory_refuse,
                              lag_shed_requests=lag_shed, lag_refuse_connections=lag_refuse)

    def _pilot(self, s: _Section | None) -> PilotConfig | None:
        if s is None:
            return None
        items = s.items("addresses", required=True)
        addresses = _each(s.source, items, _client_endpoint)
        if not addresses:
            raise s.error("list at least one pilot address", s.field("addresses"))
        insecure = s.get("insecure", _bool, default=False)
        ca_pem = b""
        if not insecure:
            ca_pem = self._read_pem(s, "ca_file", required=True)
        token = s.get("token", _string, default="")
        token_file = s.get("token_file", _string)
        if token_file is not None:
            if token:
                raise s.error("give token or token_file, not both", s.field("token_file"))
            path = os.path.join(os.path.dirname(s.source) if s.source else "", token_file)
            try:
                with open(path, encoding="utf-8") as f:
                    token = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise s.error(f"cannot read {path}: {getattr(e, 'strerror', None) or e}",
                              s.field("token_file")) from None
        pilot = PilotConfig(
            addresses=addresses,
            inbound_port=s.get("inbound_port", _int_in(1, 65535)),
            app_port=s.get("app_port", _int_in(1, 65535)),
            outbound_address=s.get("outbound_address", _server_endpoint),
            insecure=insecure,
            ca_pem=ca_pem,
            server_name=s.get("server_name", _string),
            token=token,
            backoff_base=s.get("backoff_base", _positive_seconds),
            backoff_max=s.get("backoff_max", _positive_seconds),
            keepalive_interval=s.get("keepalive_interval", _positive_seconds, default=15.0),
            keepalive_timeout=s.get("keepalive_timeout", _positive_seconds, default=45.0),
            trust_domain=s.get("trust_domain", _string, default="cluster.local"),
            service_account=s.get("service_account", _string),
            identity_dir=self._relative(s, s.get("identity_dir", _string)),
        )
        if pilot.keepalive_timeout < pilot.keepalive_interval:
            raise s.error("must be at least keepalive_interval", s.field("keepalive_timeout"))
        s.done()
        return pilot

    @staticmethod
    def _relative(s: _Section, path: str | None) -> str | None:
        """
        @return: C{path} relative to the config file's directory.
        """
        if path is None:
            return None
        return os.path.join(os.path.dirname(s.source) if s.source else "", path)

    def _read_pem(self, s: _Section, key: str, required: bool = False) -> bytes:
        """
        Read the certificates in the file C{s[key]} names (relative to the
        config file), checked.
        """
        name = s.get(key, _string, required=required)
        if name is None:
            return b""
        path = os.path.join(os.path.dirname(s.source) if s.source else "", name)
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise s.error(f"cannot read {path}: {e.strerror}", s.field(key)) from None
        try:
            load_certificates(pem, key)
        except TLSConfigError as e:
            raise s.error(f"{path}: {e.reason}", s.field(key)) from None
        return pem

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
        self._included = tuple(os.path.join(base, name) for name in files)
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
            labels=s.get("labels", _labels, ()),
            locality=s.get("locality", _string, ""),
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
            hash_policy=self._hash_policy(s.sub("hash_policy")),
            subsets=tuple(self._subset(f, v, source, endpoints) for f, v in s.items("subsets")),
            circuit_breaker=self._circuit_breaker(s.sub("circuit_breaker")),
            outlier_detection=self._outlier(s.sub("outlier_detection")),
            health_check=self._health_check(s.sub("health_check")),
            locality_failover=s.get("locality_failover", _bool, False),
            http2=s.get("http2", _bool, False),
            tls=self._upstream_tls(s.sub("tls")),
        )
        if cluster.lb_policy == "consistent_hash" and cluster.hash_policy is None:
            raise s.error("consistent_hash needs a hash_policy", s.field("lb_policy"))
        hp = cluster.hash_policy
        if hp is not None and hp.algorithm == "maglev" and hp.table_size < len(endpoints):
            raise s.error(f"a maglev table needs at least one slot per endpoint ({len(endpoints)})",
                          s.field("hash_policy.table_size"))
        s.done()
        return cluster

    def _with_ca(self, cluster: ClusterConfig, source: str | None) -> ClusterConfig:
        """
        Read the CA file a translated DestinationRule names (relative to
        the proxy config file).
        """
        tls = cluster.tls
        if tls is not None and tls.mode == "MUTUAL" and not tls.client_certificate_pem:
            where = f"istio: DestinationRule for {cluster.name}: trafficPolicy.tls"
            tls = self._client_pair(tls, source, f"{where}.clientCertificate", f"{where}.privateKey")
            cluster = attrs.evolve(cluster, tls=tls)
        if tls is None or tls.ca_certificate is None or tls.ca_certificate_pem:
            return cluster
        path = os.path.join(os.path.dirname(source) if source else "", tls.ca_certificate)
        field = f"istio: DestinationRule for {cluster.name}: trafficPolicy.tls.caCertificates"
        try:
            with open(path, "rb") as f:
                pem = f.read()
            load_certificates(pem, "ca_certificate")
        except OSError as e:
            raise ConfigError(source, field, f"cannot read {path}: {e.strerror}") from None
        except TLSConfigError as e:
            raise ConfigError(source, field, f"{path}: {e.reason}") from None
        return attrs.evolve(cluster, tls=attrs.evolve(tls, ca_certificate_pem=pem))

    def _upstream_tls(self, s: _Section | None) -> UpstreamTLS | None:
        """
        Read a cluster's C{tls} section (TLS origination); the CA file is
        relative to the config file and checked here.
        """
        if s is None:
            return None
        mode = s.get("mode", _one_of(UPSTREAM_TLS_MODES), "SIMPLE")
        if mode == "ISTIO_MUTUAL":
            names = tuple(s.get("subject_alt_names", _spiffe_ids, ()))
            for key in ("ca_certificate", "sni"):
                if s.value.get(key) is not None:
                    raise s.error("ISTIO_MUTUAL uses the mesh trust bundle and SPIFFE IDs; leave it out",
                                  s.field(key))
            s.done()
            return UpstreamTLS(mode=mode, subject_alt_names=names)
        pem = self._read_pem(s, "ca_certificate")
        tls = UpstreamTLS(s.get("ca_certificate", _string), pem, s.get("sni", _string), mode)
        if mode == "MUTUAL":
            tls = attrs.evolve(tls, client_certificate=s.get("client_certificate", _string, required=True),
                               private_key=s.get("private_key", _string, required=True))
            tls = self._client_pair(tls, s.source, s.field("client_certificate"), s.field("private_key"))
        else:
            for key in ("client_certificate", "private_key"):
                if s.value.get(key) is not None:
                    raise s.error("only with mode: MUTUAL", s.field(key))
        s.done()
        return tls

    def _client_pair(self, tls: UpstreamTLS, source: str | None, cert_field: str, key_field: str) -> UpstreamTLS:
        """
        Read and check a C{MUTUAL} cluster's client certificate and key
        (paths relative to the config file).
        """
        base = os.path.dirname(source) if source else ""
        pems = {}
        for name, field in ((tls.client_certificate, cert_field), (tls.private_key, key_field)):
            path = os.path.join(base, name)
            try:
                with open(path, "rb") as f:
                    pems[field] = f.read()
            except OSError as e:
                raise ConfigError(source, field, f"cannot read {path}: {e.strerror}") from None
        cert_pem, key_pem = pems[cert_field], pems[key_field]
        try:
            client_options("check", [], b"", None, cert_pem, key_pem)
        except TLSConfigError as e:
            raise ConfigError(source, cert_field if e.part != "private_key" else key_field, e.reason) from None
        return attrs.evolve(tls, client_certificate_pem=cert_pem, private_key_pem=key_pem)

    def _hash_policy(self, s: _Section | None) -> HashPolicy | None:
        if s is None:
            return None
        keys = [k for k in ("header", "cookie", "query_param", "source_ip") if s.value.get(k)]
        if len(keys) != 1:
            raise s.error("set exactly one of header, cookie, query_param, source_ip", s.path)
        d = HashPolicy()
        policy = HashPolicy(
            header=s.get("header", lambda v: _token(v).lower()),
            cookie=s.get("cookie", _bytes),
            query_param=s.get("query_param", _bytes),
            source_ip=s.get("source_ip", _bool, False),
            algorithm=s.get("algorithm", _one_of(("ring_hash", "maglev")), d.algorithm),
            table_size=s.get("table_size", _int_in(1, 1 << 20), d.table_size),
        )
        s.done()
        return policy

    def _subset(self, field: str, value: Any, source: str | None, endpoints: tuple[Endpoint, ...]) -> SubsetConfig:
        s = _Section(source, field, value)
        subset = SubsetConfig(
            name=s.get("name", _string, required=True),
            labels=s.get("labels", _labels, required=True),
            lb_policy=s.get("lb_policy", _one_of(LB_POLICIES)),
        )
        if not any(all(ep.label(k) == v for k, v in subset.labels) for ep in endpoints):
            raise s.error("no endpoint of the cluster has these labels", s.field("labels"))
        s.done()
        return subset

    def _circuit_breaker(self, s: _Section | None) -> CircuitBreakerConfig:
        if s is None:
            return CircuitBreakerConfig()
        limit = _int_in(0, 1 << 30)
        breaker = CircuitBreakerConfig(
            max_connections=s.get("max_connections", limit, 0),
            max_pending_requests=s.get("max_pending_requests", limit, 0),
            max_requests=s.get("max_requests", limit, 0),
            max_requests_per_connection=s.get("max_requests_per_connection", limit, 0),
            max_retries=s.get("max_retries", limit, CircuitBreakerConfig().max_retries),
        )
        s.done()
        return breaker

    def _outlier(self, s: _Section | None) -> OutlierDetectionConfig | None:
        if s is None:
            return None
        d = OutlierDetectionConfig()
        count = _int_in(0, 1 << 20)
        outlier = OutlierDetectionConfig(
            consecutive_5xx=s.get("consecutive_5xx", count, d.consecutive_5xx),
            consecutive_gateway_errors=s.get("consecutive_gateway_errors", count, d.consecutive_gateway_errors),
            interval=s.get("interval", parse_duration, d.interval),
            base_ejection_time=s.get("base_ejection_time", parse_duration, d.base_ejection_time),
            max_ejection_percent=s.get("max_ejection_percent", _int_in(0, 100), d.max_ejection_percent),
        )
        if outlier.interval <= 0:
            raise s.error("must be positive", s.field("interval"))
        s.done()
        return outlier

    def _health_check(self, s: _Section | None) -> HealthCheckConfig | None:
        if s is None:
            return None
        d = HealthCheckConfig()
        check = HealthCheckConfig(
            kind=s.get("kind", _one_of(("http", "tcp", "grpc")), d.kind),
            path=s.get("path", _no_space_or_ctl, d.path),
            interval=s.get("interval", parse_duration, d.interval),
            timeout=s.get("timeout", parse_duration, d.timeout),
            healthy_threshold=s.get("healthy_threshold", _int_in(1, 1000), d.healthy_threshold),
            unhealthy_threshold=s.get("unhealthy_threshold", _int_in(1, 1000), d.unhealthy_threshold),
            grpc_service=s.get("grpc_service", _string, d.grpc_service),
        )
        for key in ("interval", "timeout"):
            if getattr(check, key) <= 0:
                raise s.error("must be positive", s.field(key))
        if not check.path.startswith(b"/"):
            raise s.error("must start with '/'", s.field("path"))
        s.done()
        return check

    def _listener(self, field: str, value: Any, source: str | None, clusters: Mapping[str, ClusterConfig],
                  istio: IstioConfig | None = None) -> ListenerConfig:
        s = _Section(source, field, value)
        name = s.get("name", _string, required=True)
        address = s.get("address", _server_endpoint, required=True)
        protocol = s.get("protocol", _one_of(PROTOCOLS), "http")
        d = ListenerConfig(name, address)
        mtls = s.get("mtls", _one_of(MTLS_MODES))
        common = dict(
            idle_timeout=s.get("idle_timeout", parse_duration, d.idle_timeout),
            mtls=None if mtls == "DISABLE" else mtls,
        )
        if common["mtls"] is not None and s.value.get("tls") is not None:
            raise s.error("give tls (a certificate of your own) or mtls (the workload certificate), not both",
                          s.field("mtls"))
        if protocol == "tcp":
            sni_routes = tuple(self._sni_route(f, v, source, clusters) for f, v in s.items("sni_routes"))
            # With sni_routes (even none), connections no route takes are
            # closed unless a cluster takes them.
            cluster = s.get("cluster", _string, required="sni_routes" not in s.value)
            if cluster is not None and cluster not in clusters:
                raise s.error(f"unknown cluster {cluster!r}", s.field("cluster"))
            filters = tuple(self._filter(f, v, source, network=True) for f, v in s.items("network_filters"))
            access_log = None
            if s.value.get("access_log") is not None:
                factory = self.registry.http(ACCESS_LOG_FILTER)
                if factory is None:
                    raise s.error("the access_log filter plugin is not installed", s.field("access_log"))
                s.seen.add("access_log")
                access_log = self._parse_filter(factory, s.value["access_log"], s.field("access_log"), source)
            s.done()
            return ListenerConfig(name, address, "tcp", cluster=cluster, network_filters=filters,
                                  access_log=access_log, sni_routes=sni_routes, **common)

        vhosts = [self._vhost(f, v, source, clusters) for f, v in s.items("virtual_hosts")]
        if "routes" in s.value:
            routes = tuple(self._route(f, v, source, clusters) for f, v in s.items("routes"))
            vhosts.append(VirtualHost("default", ("*",), routes))
        if s.get("istio_routes", _bool, False):
            if istio is None:
                raise s.error("needs a top-level 'istio' section", s.field("istio_routes"))
            vhosts.extend(istio.virtual_hosts)
        forward_proxy = self._forward_proxy(s.sub("forward_proxy"))
        capture = self._capture(s.sub("capture"))
        if capture is not None and (s.value.get("tls") is not None or common["mtls"] is not None):
            raise s.error("a capture listener reads the client's first bytes in the clear: no tls or mtls",
                          s.field("capture"))
        if not vhosts and forward_proxy is None and capture is None:
            raise s.error("an http listener needs 'routes' or 'virtual_hosts'", s.field("routes"))
        filters = [self._filter(f, v, source, network=False) for f, v in s.items("http_filters")]
        for i, f in enumerate(filters[:-1]):
            if f.name == ROUTER_FILTER:
                raise s.error("the router must be the last filter", f"{s.field('http_filters')}[{i}]")
        if not filters or filters[-1].name != ROUTER_FILTER:
            filters.append(self._filter(s.field("http_filters"), {"name": ROUTER_FILTER}, source, network=False))
        has_faults = any(r.fault is not None for vh in vhosts for r in vh.routes)
        if has_faults and all(f.name != FAULT_FILTER for f in filters) and self.registry.http(FAULT_FILTER):
            # Routes with fault injection need the fault filter, as Istio's
            # sidecars always have it: put it just before the router.
            filters.insert(len(filters) - 1,
                           self._filter(s.field("http_filters"), {"name": FAULT_FILTER}, source, network=False))
        default_host = s.get("default_host", _bytes)
        tls = self._tls(s.sub("tls"))
        listener = ListenerConfig(
            name, address, "http",
            virtual_hosts=tuple(vhosts),
            http_filters=tuple(filters),
            request_headers_timeout=s.get("request_headers_timeout", parse_duration, d.request_headers_timeout),
            max_request_headers_bytes=s.get(
                "max_request_headers_bytes", _int_in(1024, 1 << 20), d.max_request_headers_bytes),
            max_request_headers=s.get("max_request_headers", _int_in(1, 10000), d.max_request_headers),
            max_request_bytes=s.get("max_request_bytes", _int_in(0, 1 << 62), d.max_request_bytes),
            request_body_timeout=s.get("request_body_timeout", parse_duration, d.request_body_timeout),
            max_connections=s.get("max_connections", _int_in(0, 1 << 30), d.max_connections),
            max_requests_per_second=s.get("max_requests_per_second", _request_rate, d.max_requests_per_second),
            max_concurrent_streams=s.get("max_concurrent_streams", _int_in(1, 1 << 31 - 1),
                                         d.max_concurrent_streams),
            allow_bare_lf=s.get("allow_bare_lf", _bool, d.allow_bare_lf),
            default_host=default_host,
            tls=tls,
            scheme=b"https" if tls is not None else b"http",
            forward_proxy=forward_proxy,
            capture=capture,
            **common,
        )
        s.done()
        return listener

    def _forward_proxy(self, s: _Section | None) -> ForwardProxyConfig | None:
        """
        Read a listener's C{forward_proxy} section (C{{}} turns the mode on
        with the defaults).
        """
        if s is None:
            return None
        d = ForwardProxyConfig()
        connect_ports = d.connect_ports
        if s.value.get("connect_ports") is not None:
            connect_ports = _each(s.source, s.items("connect_ports"), _int_in(1, 65535))
        allow_hosts = d.allow_hosts
        if s.value.get("allow_hosts") is not None:
            allow_hosts = _each(s.source, s.items("allow_hosts"), _host_pattern)
        s.done()
        return ForwardProxyConfig(connect_ports, allow_hosts)

    def _capture(self, s: _Section | None) -> CaptureConfig | None:
        """
        Read a listener's C{capture} section (C{{}} turns capture on with
        the defaults).
        """
        if s is None:
            return None
        d = CaptureConfig()
        mode = s.get("mode", _one_of(CAPTURE_MODES), d.mode)
        sniff_timeout = s.get("sniff_timeout", parse_duration, d.sniff_timeout)
        if not 0 < sniff_timeout <= 10:
            raise s.error(f"must be more than 0s and at most 10s, not {sniff_timeout}s", s.field("sniff_timeout"))
        s.done()
        return CaptureConfig(mode, sniff_timeout)

    def _tls(self, s: _Section | None) -> ListenerTLS | None:
        """
        Read a listener's C{tls} section: the certificate and key (files
        relative to the config file, or inline PEM as the pilot pushes
        them), a client CA for mutual TLS, and more certificates chosen by
        SNI.  Everything is read and checked here, so a bad file refuses
        the config instead of failing handshakes.
        """
        if s is None:
            return None
        alpn_items = s.items("alpn")
        alpn = _each(s.source, alpn_items, lambda v: _one_of(p.decode() for p in ALPN_PROTOCOLS)(v).encode())
        if s.value.get("alpn") is None:
            alpn = ALPN_PROTOCOLS
        elif not alpn:
            raise s.error("list at least one protocol (or leave alpn out for h2 and http/1.1)", s.field("alpn"))
        min_version = s.get("min_version", lambda v: _one_of(MIN_VERSIONS)(str(v)), "1.2")
        sni = tuple(self._tls_certificate(_Section(s.source, f, v), alpn, min_version, sni=True)
                    for f, v in s.items("sni"))
        tls = self._tls_certificate(s, alpn, min_version, sni=False)
        return attrs.evolve(tls, sni=sni)

    def _tls_certificate(self, s: _Section, alpn: tuple[bytes, ...], min_version: str, sni: bool) -> ListenerTLS:
        """
        Read one certificate of a C{tls} section (the section itself, or an
        entry of its C{sni} list, which also names its C{server_names}).
        """
        base = os.path.dirname(s.source) if s.source else ""
        pems: dict[str, tuple[str, bytes]] = {}
        paths: dict[str, str] = {}
        for key, required in (("certificate", True), ("private_key", True), ("client_ca", False)):
            inline = s.get(key + "_pem", _string)
            name = s.get(key, _string)
            if inline is not None and name is not None:
                raise s.error(f"give {key} (a file) or {key}_pem (the PEM text), not both", s.field(key))
            if inline is not None:
                pems[key] = ("<inline>", inline.encode("ascii", "replace"))
                continue
            if name is None:
                if required:
                    raise s.error(f"is required (a PEM file, or {key}_pem with the PEM text)", s.field(key))
                continue
            path = os.path.join(base, name)
            try:
                with open(path, "rb") as f:
                    pems[key] = (name, f.read())
                paths[key] = path
            except OSError as e:
                raise s.error(f"cannot read {path}: {e.strerror}", s.field(key)) from None
        server_names: tuple[str, ...] = ()
        if sni:
            server_names = _each(s.source, s.items("server_names", required=True), _string)
            if not server_names:
                raise s.error("list the SNI names this certificate serves", s.field("server_names"))
        s.done()
        client_ca = pems.get("client_ca", ("", b""))[1]
        tls = ListenerTLS(pems["certificate"][0], pems["private_key"][0], pems["certificate"][1],
                          pems["private_key"][1], alpn, min_version, client_ca, server_names)
        try:
            server_options(tls.certificate_pem, tls.private_key_pem, tls.alpn, tls.min_version,
                           client_ca_pem=client_ca or None)
        except TLSConfigError as e:
            where = f" ({paths[e.part]})" if e.part in paths else ""
            raise s.error(e.reason + where, s.field(e.part)) from None
        return tls

    def _sni_route(self, field: str, value: Any, source: str | None,
                   clusters: Mapping[str, ClusterConfig]) -> SNIRoute:
        s = _Section(source, field, value)
        names = _each(source, s.items("server_names", required=True), _string)
        if not names:
            raise s.error("list the TLS server names this route takes", s.field("server_names"))
        cluster = s.get("cluster", _string, required=True)
        if cluster not in clusters:
            raise s.error(f"unknown cluster {cluster!r}", s.field("cluster"))
        s.done()
        return SNIRoute(names, cluster)

    def _vhost(self, field: str, value: Any, source: str | None, clusters: Mapping[str, ClusterConfig]) -> VirtualHost:
        s = _Section(source, field, value)
        name = s.get("name", _string, required=True)
        domains = _each(source, s.items("domains", required=True), _string)
        routes = tuple(self._route(f, v, source, clusters) for f, v in s.items("routes", required=True))
        s.done()
        return VirtualHost(name, domains, routes)

    def _route(self, field: str, value: Any, source: str | None, clusters: Mapping[str, ClusterConfig]) -> Route:
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
        destinations = tuple(self._destination(f, v, source, clusters)
                             for f, v in s.items("weighted_clusters"))
        redirect = self._redirect(s.sub("redirect"))
        given = [k for k, v in (("cluster", cluster), ("weighted_clusters", destinations or None),
                                ("direct_response", direct), ("redirect", redirect)) if v is not None]
        if len(given) != 1:
            raise s.error("a route needs exactly one of 'cluster', 'weighted_clusters', 'direct_response' "
                          f"or 'redirect' (got {', '.join(given) or 'none'})", s.field("cluster"))
        if cluster is not None and cluster not in clusters:
            raise s.error(f"unknown cluster {cluster!r}", s.field("cluster"))
        subset = s.get("subset", _subset_of(clusters[cluster]) if cluster in clusters else _string)
        if subset is not None:
            if cluster is None:
                raise s.error("subset goes with 'cluster' (weighted_clusters name their own)", s.field("subset"))
            destinations = (WeightedDestination(cluster, 100, subset),)
        if len(destinations) > 1 and sum(d.weight for d in destinations) != 100:
            raise s.error(f"weights must sum to 100, not {sum(d.weight for d in destinations)}",
                          s.field("weighted_clusters"))
        overrides = []
        fs = s.sub("filters")
        if fs is not None:
            for fname, raw in fs.value.items():
                ffield = fs.field(str(fname))
                factory = self.registry.http(fname)
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
            request_headers_to_add=s.get("request_headers_to_add", _request_header_pairs, ()),
            response_headers_to_add=s.get("response_headers_to_add", _header_pairs, ()),
            filter_overrides=tuple(overrides),
            destinations=destinations,
            redirect=redirect,
            retry=self._retry(s.sub("retry")),
            fault=self._fault(s.sub("fault")),
            mirror=self._mirror(s.sub("mirror"), clusters),
            request_headers=self._header_ops(s.sub("request_headers"), request=True),
            response_headers=self._header_ops(s.sub("response_headers")),
            hash_policy=self._hash_policy(s.sub("hash_policy")),
            max_request_bytes=s.get("max_request_bytes", _int_in(1, 1 << 62)),
        )
        if route.prefix_rewrite is not None and route.match.regex is not None:
            raise s.error("prefix_rewrite needs a prefix or path match, not a regex", s.field("prefix_rewrite"))
        s.done()
        return route

    def _destination(self, field: str, value: Any, source: str | None,
                     clusters: Mapping[str, ClusterConfig]) -> WeightedDestination:
        s = _Section(source, field, value)
        cluster = s.get("cluster", _string, required=True)
        if cluster not in clusters:
            raise s.error(f"unknown cluster {cluster!r}", s.field("cluster"))
        dest = WeightedDestination(
            cluster=cluster,
            weight=s.get("weight", _int_in(0, 100), required=True),
            subset=s.get("subset", _subset_of(clusters[cluster])),
            request_headers=self._header_ops(s.sub("request_headers"), request=True),
            response_headers=self._header_ops(s.sub("response_headers")),
        )
        s.done()
        return dest

    def _header_ops(self, s: _Section | None, request: bool = False) -> HeaderOps:
        if s is None:
            return HeaderOps()
        pairs = _request_header_pairs if request else _header_pairs
        ops = HeaderOps(
            set=s.get("set", pairs, ()),
            add=s.get("add", pairs, ()),
            remove=tuple(_token(v).lower() for _, v in s.items("remove")),
        )
        if request and b"host" in ops.remove:
            raise s.error("the Host header cannot be removed", s.field("remove"))
        s.done()
        return ops

    def _redirect(self, s: _Section | None) -> Redirect | None:
        if s is None:
            return None
        redirect = Redirect(
            uri=s.get("uri", _no_space_or_ctl),
            authority=s.get("authority", _no_space_or_ctl),
            scheme=s.get("scheme", lambda v: _one_of(("http", "https"))(v).encode("ascii")),
            port=s.get("port", _int_in(1, 65535)),
            code=s.get("code", _one_of_int((301, 302, 303, 307, 308)), 301),
        )
        s.done()
        return redirect

    def _retry(self, s: _Section | None) -> RetryPolicy | None:
        if s is None:
            return None
        d = RetryPolicy()
        retry = RetryPolicy(
            attempts=s.get("attempts", _int_in(0, 100), d.attempts),
            per_try_timeout=s.get("per_try_timeout", parse_duration, d.per_try_timeout),
            retry_on=s.get("retry_on", _retry_on, d.retry_on),
            backoff_base=s.get("backoff_base", parse_duration, d.backoff_base),
            backoff_max=s.get("backoff_max", parse_duration, d.backoff_max),
            max_buffered_body=s.get("max_buffered_body", _int_in(0, 1 << 30), d.max_buffered_body),
        )
        s.done()
        return retry

    def _fault(self, s: _Section | None) -> FaultPolicy | None:
        if s is None:
            return None
        delay = s.get("delay", parse_duration, 0.0)
        abort_status = s.get("abort_status", _int_in(200, 599), 0)
        abort_grpc_status = s.get("abort_grpc_status", _int_in(1, 16))
        if abort_status and abort_grpc_status is not None:
            raise s.error("set only one of abort_status and abort_grpc_status", s.field("abort_grpc_status"))
        aborts = bool(abort_status or abort_grpc_status)
        # As in Istio and the fault filter's own config, a fault given
        # without a percentage applies to every request.
        fault = FaultPolicy(
            delay=delay,
            delay_percent=s.get("delay_percent", _percent, 100.0 if delay else 0.0),
            abort_status=abort_status,
            abort_grpc_status=abort_grpc_status,
            abort_percent=s.get("abort_percent", _percent, 100.0 if aborts else 0.0),
        )
        if fault.abort_percent and not aborts:
            raise s.error("abort_percent needs abort_status or abort_grpc_status", s.field("abort_percent"))
        if fault.delay_percent and not fault.delay:
            raise s.error("delay_percent needs a delay", s.field("delay_percent"))
        s.done()
        return fault

    def _mirror(self, s: _Section | None, clusters: Mapping[str, ClusterConfig]) -> MirrorPolicy | None:
        if s is None:
            return None
        name = s.get("cluster", _string, required=True)
        if name not in clusters:
            raise s.error(f"unknown cluster {name!r}", s.field("cluster"))
        mirror = MirrorPolicy(
            cluster=name,
            subset=s.get("subset", _subset_of(clusters[name])),
            percent=s.get("percent", _percent, 100.0),
        )
        s.done()
        return mirror

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
        query_params = tuple(self._header_match(f, v, s.source, lower=False) for f, v in s.items("query_params"))
        port = s.get("port", _int_in(1, 65535))
        source_labels = s.get("source_labels", _labels, ())
        s.done()
        return RouteMatch(prefix=prefix, path=path, regex=regex, headers=headers, methods=methods,
                          query_params=query_params, port=port, source_labels=source_labels)

    def _header_match(self, field: str, value: Any, source: str | None, lower: bool = True) -> HeaderMatch:
        s = _Section(source, field, value)
        name = s.get("name", _token if lower else _bytes, required=True)
        if lower:
            name = name.lower()
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
        known = self.registry.network_names() if network else self.registry.http_names()
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
        factory = self.registry.network(name) if network else self.registry.http(name)
        if factory is None:
            raise s.error(self._unknown_filter(name, network), s.field("name"))
        s.seen.add("config")
        config = self._parse_filter(factory, s.value.get("config") or {}, s.field("config"), source)
        s.done()
        return FilterConfig(name, factory, config)
