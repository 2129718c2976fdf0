"""
txmesh's own configuration model: immutable C{attrs} values that the proxy
runs from.  YAML (and, later, the pilot's channel and Istio documents) are
translated into these; nothing above the loader sees raw dicts.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import attrs


@attrs.frozen(cache_hash=True)
class Endpoint:
    """
    One upstream address.

    @ivar host: IP address or host name.
    @ivar port: TCP port.
    @ivar labels: endpoint labels (version, zone, ...).
    @ivar service_account: the identity of the workload behind it, as
        service discovery knows it: C{<namespace>/<service account>} (of
        the mesh's trust domain) or a whole SPIFFE ID; empty when unknown.
        Only the pilot reads it, to name the identities an C{ISTIO_MUTUAL}
        cluster accepts (L{UpstreamTLS.subject_alt_names}); it is not part
        of a proxy's config.
    """

    host: str
    port: int
    labels: tuple[tuple[str, str], ...] = ()
    weight: int = 1
    locality: str = ""
    service_account: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def label(self, name: str) -> str | None:
        """
        @return: the value of label C{name}, or C{None}.
        """
        for k, v in self.labels:
            if k == name:
                return v
        return None


@attrs.frozen
class HashPolicy:
    """
    What a consistent-hash load balancer hashes on (Istio's
    C{consistentHash}): exactly one of C{header}, C{cookie}, C{query_param}
    or C{source_ip}.

    @ivar algorithm: C{ring_hash} or C{maglev}.
    @ivar table_size: ring size (ring hash) or table size (maglev, prime).
    """

    header: bytes | None = None
    cookie: bytes | None = None
    query_param: bytes | None = None
    source_ip: bool = False
    algorithm: str = "ring_hash"
    table_size: int = 1024


@attrs.frozen
class CircuitBreakerConfig:
    """
    DestinationRule C{connectionPool} limits; 0 means unlimited.

    @ivar max_connections: open connections to the cluster.
    @ivar max_pending_requests: requests waiting for a connection.
    @ivar max_requests: requests in flight.
    @ivar max_requests_per_connection: requests before a connection is retired.
    @ivar max_retries: retries always allowed in flight at once; beyond it
        the retry budget (20% of active requests) decides, as Envoy's
        C{min_retry_concurrency}.
    """

    max_connections: int = 0
    max_pending_requests: int = 0
    max_requests: int = 0
    max_requests_per_connection: int = 0
    max_retries: int = 3


@attrs.frozen
class OutlierDetectionConfig:
    """
    Passive health: eject hosts that fail (Istio's C{outlierDetection}).

    @ivar consecutive_5xx: 5xx responses (and resets) in a row that eject; 0 disables.
    @ivar consecutive_gateway_errors: 502/503/504 (and resets) in a row that eject; 0 disables.
    @ivar interval: seconds between ejection sweeps.
    @ivar base_ejection_time: seconds; the n-th ejection lasts n times this.
    @ivar max_ejection_percent: at most this share of hosts is ejected at once.
    """

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


@attrs.frozen
class HealthCheckConfig:
    """
    Active health checking.

    @ivar kind: C{http} (GET C{path}, 2xx is healthy), C{tcp} (connect) or
        C{grpc} (C{grpc.health.v1.Health/Check} over h2c; C{SERVING} is
        healthy).
    @ivar grpc_service: the service name a C{grpc} check asks about; empty
        asks about the server as a whole.
    """

    kind: str = "http"
    path: bytes = b"/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3
    grpc_service: str = ""


@attrs.frozen
class UpstreamTLS:
    """
    TLS origination to a cluster's endpoints (Istio's DestinationRule
    C{tls.mode: SIMPLE}): the upstream's certificate is verified against
    C{ca_certificate} (or the system's roots) for the name C{sni} (or the
    endpoint's host).

    @ivar ca_certificate: path of the PEM CA bundle, or C{None} for the
        system's trust store.
    @ivar ca_certificate_pem: its contents when loaded (so a changed file
        changes the config).
    @ivar mode: C{SIMPLE} (the above), C{MUTUAL} (the above, presenting
        C{client_certificate}) or C{ISTIO_MUTUAL}: mutual TLS with
        the proxy's workload certificate, the peer checked against the mesh
        trust bundle and, if given, C{subject_alt_names}.
    @ivar subject_alt_names: the SPIFFE IDs an C{ISTIO_MUTUAL} peer may
        have; empty for any of the trust domain.
    @ivar client_certificate: with C{mode: MUTUAL}, the path of the client
        certificate (chain, leaf first) presented to the upstream.
    @ivar private_key: its key's path.
    @ivar client_certificate_pem: the certificate file's contents when loaded.
    @ivar private_key_pem: the key file's contents when loaded.
    """

    ca_certificate: str | None = None
    ca_certificate_pem: bytes = attrs.field(default=b"", repr=False)
    sni: str | None = None
    mode: str = "SIMPLE"
    subject_alt_names: tuple[str, ...] = ()
    client_certificate: str | None = None
    private_key: str | None = None
    client_certificate_pem: bytes = attrs.field(default=b"", repr=False)
    private_key_pem: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class SubsetConfig:
    """
    A named subset of a cluster's endpoints, selected by labels (Istio's
    DestinationRule C{subsets}).
    """

    name: str
    labels: tuple[tuple[str, str], ...]
    lb_policy: str | None = None


@attrs.frozen
class ClusterConfig:
    """
    A named group of upstream endpoints and how to talk to them.

    @ivar connect_timeout: seconds to wait for a TCP connection.
    @ivar lb_policy: C{round_robin}, C{random}, C{least_request} or
        C{consistent_hash} (with C{hash_policy}).
    @ivar subsets: label-selected subsets that routes may name.
    @ivar http2: talk h2c (HTTP/2 with prior knowledge) to the endpoints,
        multiplexing requests on one connection per endpoint.
    @ivar locality_failover: prefer endpoints in the proxy's own locality,
        failing over to others when none is healthy.
    @ivar max_idle_per_endpoint: idle keep-alive connections kept per endpoint.
    @ivar idle_timeout: seconds an idle pooled connection is kept open.
    """

    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 5.0
    lb_policy: str = "round_robin"
    max_idle_per_endpoint: int = 128
    idle_timeout: float = 60.0
    hash_policy: HashPolicy | None = None
    subsets: tuple[SubsetConfig, ...] = ()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    outlier_detection: OutlierDetectionConfig | None = None
    health_check: HealthCheckConfig | None = None
    locality_failover: bool = False
    tls: UpstreamTLS | None = None
    http2: bool = False


@attrs.frozen
class HeaderMatch:
    """
    A condition on one request header.  Exactly one of C{exact}, C{prefix},
    C{regex} or C{present} is set; C{invert} negates the result.
    """

    name: bytes
    exact: bytes | None = None
    prefix: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    present: bool | None = None
    invert: bool = False


@attrs.frozen
class RouteMatch:
    """
    What a request must look like to take a route: one of C{prefix},
    C{path} (exact) or C{regex} on the path, plus header conditions and
    methods (all must hold).
    """

    prefix: bytes | None = b"/"
    path: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    methods: tuple[bytes, ...] = ()
    query_params: tuple[HeaderMatch, ...] = ()
    port: int | None = None
    source_labels: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class DirectResponse:
    """
    A route answered by the proxy itself.
    """

    status: int
    body: bytes = b""
    # The access log's response flag for this reply (e.g. C{NR} for a
    # capture listener's BlackHoleCluster); empty for an ordinary one.
    flag: str = ""


@attrs.frozen
class HeaderOps:
    """
    Header changes: C{set} replaces, C{add} appends, C{remove} deletes.
    """

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: tuple[bytes, ...] = ()


@attrs.frozen
class WeightedDestination:
    """
    One destination of a route, with its share of traffic.

    @ivar subset: a subset of the cluster (DestinationRule C{subsets}).
    @ivar weight: relative weight; a route's weights sum to 100 when more
        than one destination is given.
    """

    cluster: str
    weight: int = 100
    subset: str | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


@attrs.frozen
class RetryPolicy:
    """
    When and how often to try again (Istio's C{retries}).

    @ivar attempts: retries after the first try (Istio counts the same way).
    @ivar per_try_timeout: seconds per try; 0 means only the route timeout.
    @ivar retry_on: conditions: C{5xx}, C{gateway-error}, C{connect-failure},
        C{reset}, C{retriable-4xx}, C{refused-stream}, and gRPC status names
        (C{cancelled}, C{deadline-exceeded}, C{unavailable},
        C{resource-exhausted}, C{internal}).
    @ivar backoff_base: seconds; jittered exponential backoff starts here.
    @ivar backoff_max: seconds; cap of the backoff.
    @ivar max_buffered_body: a request body up to this many bytes is kept
        so it can be replayed; larger bodies disable retries once streamed.
    """

    attempts: int = 2
    per_try_timeout: float = 0.0
    # Istio's default policy: connection failures, refused streams, gRPC
    # unavailable/cancelled, and 503 as the one retriable status code.
    retry_on: frozenset[str] = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                                          "retriable-status-codes", "503"})
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    max_buffered_body: int = 64 * 1024


@attrs.frozen
class FaultPolicy:
    """
    Fault injection (Istio's C{fault}): delay and/or abort a share of requests.
    """

    delay: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0
    abort_grpc_status: int | None = None
    abort_percent: float = 0.0


@attrs.frozen
class MirrorPolicy:
    """
    Send a fire-and-forget copy of requests to another destination.
    """

    cluster: str
    subset: str | None = None
    percent: float = 100.0


@attrs.frozen
class Redirect:
    """
    Answer with a redirect instead of forwarding (Istio's C{redirect}).
    """

    uri: bytes | None = None
    authority: bytes | None = None
    scheme: bytes | None = None
    port: int | None = None
    code: int = 301


@attrs.frozen
class Route:
    """
    One routing rule.

    @ivar cluster: destination cluster name (unless C{direct_response}).
    @ivar timeout: seconds for the whole upstream exchange; 0 disables.
    @ivar prefix_rewrite: replaces the matched prefix before forwarding.
    @ivar host_rewrite: replaces the C{Host}/authority before forwarding.
    @ivar filter_overrides: per-route filter config by filter name; a value
        of L{DISABLED} turns that filter off on this route.
    @ivar destinations: weighted destinations (canary splits); when empty,
        C{cluster} is the single destination.
    @ivar retry: retry policy, or C{None} for no retries.
    @ivar request_headers: header set/add/remove on the request.
    @ivar response_headers: header set/add/remove on the response.
    @ivar max_request_bytes: limit on an HTTP/1 request body on this route,
        counted as it flows (413 beyond it); the listener's own limit, if
        lower, still applies.  C{None} for the listener's alone.
    """

    name: str
    match: RouteMatch
    cluster: str | None = None
    direct_response: DirectResponse | None = None
    timeout: float = 15.0
    prefix_rewrite: bytes | None = None
    host_rewrite: bytes | None = None
    request_headers_to_add: tuple[tuple[bytes, bytes], ...] = ()
    response_headers_to_add: tuple[tuple[bytes, bytes], ...] = ()
    filter_overrides: tuple[tuple[str, Any], ...] = ()
    destinations: tuple[WeightedDestination, ...] = ()
    redirect: Redirect | None = None
    retry: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirror: MirrorPolicy | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()
    hash_policy: HashPolicy | None = None
    max_request_bytes: int | None = None


@attrs.frozen
class VirtualHost:
    """
    Routes for a set of domains (C{Host} values); C{"*"} matches any,
    C{"*.example.com"} a suffix, C{"api.*"} a prefix.
    """

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


class _Disabled:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DISABLED"


DISABLED: Any = _Disabled()
"""
A route's filter override that turns the filter off for that route.
"""


@attrs.frozen
class FilterConfig:
    """
    One configured filter in a chain.

    @ivar name: the factory's plugin name.
    @ivar factory: the L{IHTTPFilterFactory} or L{INetworkFilterFactory}.
    @ivar config: what the factory's C{parse_config} returned.
    """

    name: str
    factory: Any = attrs.field(eq=False)
    config: Any = None


@attrs.frozen
class ListenerTLS:
    """
    Downstream TLS termination on a listener.

    @ivar certificate: path of the PEM certificate (chain, leaf first).
    @ivar private_key: path of the PEM private key.
    @ivar certificate_pem: the certificate file's contents when loaded, so a
        reload that changed the file changes this value.
    @ivar private_key_pem: the key file's contents when loaded.
    @ivar alpn: protocols offered in ALPN, in order of preference.
    @ivar min_version: lowest TLS version accepted, C{"1.2"} or C{"1.3"}.
    @ivar client_ca_pem: CA certificates that client certificates must
        chain to (Istio's gateway C{MUTUAL}); empty for no client
        certificate.
    @ivar server_names: the SNI patterns (C{bookinfo.example.com},
        C{*.example.com}, C{*}) this certificate serves, for an entry of
        C{sni}.
    @ivar sni: other certificates on the same port, each chosen when the
        client's SNI matches its C{server_names} (a gateway's servers);
        this one serves the rest.
    """

    certificate: str
    private_key: str
    certificate_pem: bytes = attrs.field(default=b"", repr=False)
    private_key_pem: bytes = attrs.field(default=b"", repr=False)
    alpn: tuple[bytes, ...] = (b"h2", b"http/1.1")
    min_version: str = "1.2"
    client_ca_pem: bytes = attrs.field(default=b"", repr=False)
    server_names: tuple[str, ...] = ()
    sni: tuple[ListenerTLS, ...] = ()


def _connect_ports(instance: Any, attribute: Any, value: tuple[int, ...]) -> None:
    for port in value:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"forward_proxy.connect_ports: {port!r} is not a TCP port (1-65535)")


@attrs.frozen
class ForwardProxyConfig:
    """
    An HTTP listener's forward-proxy mode (apps configured with
    C{HTTP_PROXY}/C{HTTPS_PROXY}): absolute-form requests are accepted and
    routed by their host, and C{CONNECT} opens TCP tunnels.

    @ivar connect_ports: the ports C{CONNECT} may tunnel to; others get 403.
    @ivar allow_hosts: shell-style patterns (C{*}, C{*.example.com},
        C{10.0.0.*}, an exact name) of the hosts that requests no route
        matches (and C{CONNECT}s) may reach; others get 403.
    """

    connect_ports: tuple[int, ...] = attrs.field(default=(443,), validator=_connect_ports)
    allow_hosts: tuple[str, ...] = ("*",)

    def allows_host(self, host: str) -> bool:
        """
        @param host: a host name or IP address, without port or brackets.
        @return: whether C{allow_hosts} lets the proxy reach C{host}.
        """
        host = host.lower()
        return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in self.allow_hosts)


@attrs.frozen
class SNIRoute:
    """
    Where a C{tcp} listener sends a TLS connection it does not terminate,
    by the server name of the client's ClientHello (a gateway's TLS
    C{PASSTHROUGH}).

    @ivar server_names: patterns: C{name}, C{*.domain} or C{*}.
    @ivar cluster: the cluster the connection is relayed to.
    """

    server_names: tuple[str, ...]
    cluster: str


CAPTURE_MODES = ("ALLOW_ANY", "REGISTRY_ONLY")


@attrs.frozen
class CaptureConfig:
    """
    A transparent capture listener (the outbound port C{txmesh iptables}
    redirects to): each connection's first bytes choose HTTP (the
    listener's routes) or an L4 relay to the original destination.

    @ivar mode: C{ALLOW_ANY} (what matches no route goes to its original
        destination) or C{REGISTRY_ONLY} (it is refused: HTTP gets 502
        with flag C{NR}, other traffic is closed).
    @ivar sniff_timeout: seconds to wait for the client's first bytes
        before treating the connection as opaque TCP (server-first
        protocols send nothing).
    """

    mode: str = attrs.field(default="ALLOW_ANY", validator=attrs.validators.in_(CAPTURE_MODES))
    sniff_timeout: float = 0.1


@attrs.frozen
class ListenerConfig:
    """
    One listening port and what it carries.

    @ivar address: a Twisted server endpoint string,
        e.g. C{tcp:15001:interface=127.0.0.1}.
    @ivar protocol: C{http} (HTTP/1.1 L7 proxy) or C{tcp} (L4 proxy).
    @ivar cluster: the upstream cluster of a C{tcp} listener.
    @ivar idle_timeout: seconds a connection may be idle before it is closed.
    @ivar request_headers_timeout: seconds a client has to send a complete
        request head (slowloris defence).
    @ivar max_request_headers_bytes: limit on the request head; beyond it 431.
    @ivar max_request_headers: limit on the number of header fields in an
        HTTP/1 request head; beyond it 431.
    @ivar max_request_bytes: limit on an HTTP/1 request body, counted as it
        flows; beyond it 413.  0 for no limit.  A route may set a lower
        one of its own.
    @ivar request_body_timeout: seconds an HTTP/1 request body may go
        without a byte from the client before a 408; 0 disables.
    @ivar max_connections: open client connections beyond which new ones
        are closed at once; 0 for no limit.
    @ivar max_concurrent_streams: HTTP/2 streams one client connection
        may have open (C{SETTINGS_MAX_CONCURRENT_STREAMS}); more are
        refused with C{REFUSED_STREAM}.
    @ivar max_requests_per_second: requests one client connection may
        send per second (a token bucket holding one second's worth); the
        excess gets C{429} with flag C{RL}.  0 for no limit.
    @ivar allow_bare_lf: accept a bare LF ending an HTTP/1 header line
        (never the request line or a chunk line).
    @ivar default_host: authority used for HTTP/1.0 requests with no C{Host}.
    @ivar tls: TLS termination, or C{None} for plaintext (then C{scheme} is
        C{http}; with TLS it is C{https}).
    @ivar mtls: mutual TLS with the workload certificate (Istio's
        PeerAuthentication): C{STRICT} (mutual TLS only), C{PERMISSIVE}
        (mutual TLS or plaintext, per connection), or C{None}.
    @ivar access_log: a C{tcp} listener's access log (the C{access_log}
        filter's parsed config: one line per connection), or C{None}.
    @ivar capture: transparent capture of an C{http} listener (see
        L{CaptureConfig}), or C{None}.
    @ivar forward_proxy: forward-proxy mode of an C{http} listener, or
        C{None} (a reverse proxy only: absolute-form targets get 400).
    @ivar sni_routes: a C{tcp} listener's routes by TLS server name; its
        C{cluster}, if any, takes connections no route matches (others are
        closed).
    """

    name: str
    address: str
    protocol: str = "http"
    virtual_hosts: tuple[VirtualHost, ...] = ()
    http_filters: tuple[FilterConfig, ...] = ()
    network_filters: tuple[FilterConfig, ...] = ()
    cluster: str | None = None
    idle_timeout: float = 300.0
    request_headers_timeout: float = 30.0
    max_request_headers_bytes: int = 64 * 1024
    max_request_headers: int = 100
    max_request_bytes: int = 0
    request_body_timeout: float = 60.0
    max_connections: int = 0
    max_requests_per_second: float = 0.0
    max_concurrent_streams: int = 100
    allow_bare_lf: bool = False
    default_host: bytes | None = None
    scheme: bytes = b"http"
    tls: ListenerTLS | None = None
    mtls: str | None = None
    access_log: Any = None
    forward_proxy: ForwardProxyConfig | None = None
    capture: CaptureConfig | None = None
    sni_routes: tuple[SNIRoute, ...] = ()


@attrs.frozen
class NodeConfig:
    """
    Who this proxy is: the workload it stands beside.
    """

    id: str = "txmesh-proxy"
    workload: str = "unknown"
    namespace: str = "default"
    app: str = "unknown"
    version: str = "unknown"
    labels: tuple[tuple[str, str], ...] = ()
    locality: str = ""


@attrs.frozen
class PilotConfig:
    """
    Where the proxy gets its listeners and clusters from (the bootstrap
    file's C{pilot} section).

    @ivar addresses: Twisted client endpoint strings of the pilot replicas,
        e.g. C{tcp:127.0.0.1:15010}, tried in turn.
    @ivar inbound_port: the port the proxy takes inbound traffic on, told to
        the pilot as node label C{txmesh.io/inbound-port}.
    @ivar app_port: the port the workload listens on, told to the pilot as
        node label C{txmesh.io/app-port}.
    @ivar outbound_address: server endpoint string of this proxy's outbound
        listener when it is not the mesh's (several proxies on one host),
        told to the pilot as node label C{txmesh.io/outbound-address}.
    @ivar insecure: a plaintext channel (only to a pilot run with
        C{--insecure}, for development).
    @ivar ca_pem: the mesh root the pilot's certificate must chain to.
    @ivar server_name: the name the pilot's certificate must carry; by
        default the host of each address.
    @ivar token: the join token sent in the hello (C{txmesh token create}).
    @ivar backoff_base: seconds; ceiling of the first reconnect wait, or
        C{None} for the proxy's default.
    @ivar backoff_max: seconds; cap of the reconnect waits, or C{None}.
    @ivar keepalive_interval: seconds of quiet before pinging the pilot.
    @ivar keepalive_timeout: seconds of silence before reconnecting.
    @ivar trust_domain: the mesh's SPIFFE trust domain.
    @ivar service_account: the workload's service account, for its SPIFFE
        ID; C{None} for the join token's, else C{default}.
    @ivar identity_dir: where the workload key and certificate are kept
        across restarts (a join token is good once), or C{None}.
    """

    addresses: tuple[str, ...]
    inbound_port: int | None = None
    app_port: int | None = None
    outbound_address: str | None = None
    insecure: bool = False
    ca_pem: bytes = attrs.field(default=b"", repr=False)
    server_name: str | None = None
    token: str = attrs.field(default="", repr=False)
    backoff_base: float | None = None
    backoff_max: float | None = None
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0
    trust_domain: str = "cluster.local"
    service_account: str | None = None
    identity_dir: str | None = None


def _overload_fraction(instance: Any, attribute: Any, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be a fraction in (0, 1], not {value!r}")


def _overload_seconds(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


@attrs.frozen
class OverloadConfig:
    """
    The overload manager (the config's C{overload} section): what the proxy
    measures about itself and when it sheds load.  See
    L{txmesh.proxy.overload}.

    @ivar interval: seconds between measurements; the event-loop lag is how
        late such a measurement runs.
    @ivar cooldown: seconds a state lasts after the last measurement that
        called for it, so one good reading does not end it.
    @ivar memory_limit: the process's memory budget in bytes (its resident
        set), or C{None}: memory is measured but never sheds load.
    @ivar memory_shed_requests: fraction of C{memory_limit} from which new
        requests get C{503 OL}.
    @ivar memory_refuse_connections: fraction of C{memory_limit} from which
        new connections are also refused.
    @ivar lag_shed_requests: event-loop lag in seconds from which new
        requests get C{503 OL}, or C{None} (lag never sheds load).
    @ivar lag_refuse_connections: event-loop lag in seconds from which new
        connections are also refused, or C{None}.
    """

    interval: float = attrs.field(default=0.1, validator=_overload_seconds)
    cooldown: float = 1.0
    memory_limit: int | None = None
    memory_shed_requests: float = attrs.field(default=0.8, validator=_overload_fraction)
    memory_refuse_connections: float = attrs.field(default=0.95, validator=_overload_fraction)
    lag_shed_requests: float | None = attrs.field(default=None, validator=_overload_seconds)
    lag_refuse_connections: float | None = attrs.field(default=None, validator=_overload_seconds)

    def __attrs_post_init__(self) -> None:
        if self.cooldown < 0:
            raise ValueError(f"cooldown must not be negative, not {self.cooldown!r}")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ValueError(f"memory_limit must be a positive number of bytes, not {self.memory_limit!r}")
        if self.memory_refuse_connections < self.memory_shed_requests:
            raise ValueError("memory_refuse_connections must be at least memory_shed_requests")
        if (self.lag_shed_requests is None) != (self.lag_refuse_connections is None):
            raise ValueError("lag_shed_requests and lag_refuse_connections are set together")
        if self.lag_refuse_connections is not None and self.lag_refuse_connections < self.lag_shed_requests:
            raise ValueError("lag_refuse_connections must be at least lag_shed_requests")


@attrs.frozen
class ProxyConfig:
    """
    Everything a proxy runs from.

    @ivar source: where it was loaded from (for messages and C{/config_dump}).
    @ivar raw: the document as loaded, for C{/config_dump}.
    @ivar included_files: other files the config was read from (its Istio
        documents), watched for changes like the config file itself.
    @ivar warnings: things in the config that are valid but not (fully)
        applied, e.g. unsupported Istio fields, for the service to log.
    @ivar pilot: where to get listeners and clusters from, or C{None} to run
        from this config alone.
    @ivar overload: the overload manager's config, or C{None}: no
        measurements, load is never shed.
    """

    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    admin_address: str | None = None
    node: NodeConfig = NodeConfig()
    source: str | None = None
    raw: Any = attrs.field(default=None, eq=False, repr=False)
    warnings: tuple[str, ...] = ()
    included_files: tuple[str, ...] = ()
    pilot: PilotConfig | None = None
    overload: OverloadConfig | None = None

    def cluster(self, name: str) -> ClusterConfig | None:
        """
        @return: the cluster called C{name}, or C{None}.
        """
        for c in self.clusters:
            if c.name == name:
                return c
        return None
