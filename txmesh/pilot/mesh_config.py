"""
The pilot's own settings: C{CONFIG_DIR/mesh.yaml} (optional), read at start
and again whenever it changes (see L{txmesh.pilot.service}).  Everything
but the fields in L{RESTART_FIELDS} takes effect while the pilot runs.

    trust_domain: cluster.local          # SPIFFE trust domain
    default_namespace: default
    domain_suffix: svc.cluster.local
    outbound_address: "tcp:15001:interface=127.0.0.1"   # every proxy's outbound listener
    inbound_address: "tcp:{port}:interface=0.0.0.0"     # {port}: the node's inbound port
    app_host: 127.0.0.1
    admin_address: "tcp:15000:interface=127.0.0.1"
    workload_cert_ttl: 24h               # proxies renew at half-life; at least 1m
    root_namespace: istio-system         # security policies here apply mesh-wide
    audit_log: /var/log/txmesh/audit.log # where proxies' authz/jwt filters audit ("-": stdout)
    outbound_traffic_policy: {mode: ALLOW_ANY}  # captured traffic to unknown hosts: or REGISTRY_ONLY
    telemetry:                           # what every proxy reports
      metrics: true                      # Istio's standard metrics (default)
      access_log: {format: json, path: "-"}
      tracing: {collector: "http://zipkin:9411/api/v2/spans", sampling: 1.0}
    registries:                          # discovery sources, merged in this order
      - {type: file, path: services}     # the default when the key is absent
      - {type: dns, names: [{host: db.example.com, port: 5432, kind: A}]}
      - {type: etcd, endpoints: ["http://127.0.0.1:2379"], prefix: /txmesh/services/}
      - {type: kubernetes, api: "https://10.0.0.1:443", token_file: ..., ca_file: ...}
    kubernetes_auth:                     # accept service-account tokens in hellos (optional)
      api: https://kubernetes.default.svc                              # the default
      token_file: /var/run/secrets/kubernetes.io/serviceaccount/token  # the pilot's own (https default)
      ca_file: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt    # (https default)
      audiences: [txmesh-pilot]          # optional: the audiences a token must be for

Without the file (or without C{registries}) the pilot reads service
registrations from C{CONFIG_DIR/services/} when that directory exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import yaml

from txmesh.config import values
from txmesh.config.durations import parse_duration
from txmesh.config.errors import ConfigError
from txmesh.config.model import CAPTURE_MODES
from txmesh.config.section import Section
from txmesh.pilot.registry.base import IRegistry
from txmesh.pilot.snapshot import MeshConfig, Telemetry

MESH_FILE = "mesh.yaml"
REGISTRY_TYPES = ("file", "dns", "etcd", "kubernetes")
RESTART_FIELDS = ("trust_domain", "workload_cert_ttl", "kubernetes_auth")
"""The C{mesh.yaml} fields read only when the pilot starts: the CA and the
channel's credential check are made from them."""

_MESH_FIELDS: dict[str, Callable[[Any], Any]] = {
    "trust_domain": values.string,
    "default_namespace": values.string,
    "domain_suffix": values.string,
    "outbound_address": values.server_endpoint,
    "inbound_address": values.string,
    "app_host": values.string,
    "admin_address": values.server_endpoint,
    "root_namespace": values.string,
    "audit_log": values.string,
}


@attrs.frozen
class PilotSettings:
    """
    What C{mesh.yaml} says.

    @ivar mesh: the mesh settings snapshots are built with (no documents or
        registry view yet).
    @ivar registries: each registry's section, as C{(field, mapping)}; the
        field (C{registries[1]}) names it in errors.
    @ivar source: the file read, or C{None} when there is none.
    @ivar workload_cert_ttl: seconds a workload certificate lasts (proxies
        renew at half-life); at least a minute.
    @ivar kubernetes_auth: how to check Kubernetes service-account tokens,
        or C{None} when the pilot accepts only join tokens.
    """

    mesh: MeshConfig
    registries: tuple[tuple[str, Mapping[str, Any]], ...]
    source: str | None = None
    workload_cert_ttl: float = 24 * 3600.0
    kubernetes_auth: KubernetesAuth | None = None


@attrs.frozen
class KubernetesAuth:
    """
    C{mesh.yaml}'s C{kubernetes_auth}: the API server the pilot sends
    C{TokenReview}s to (see L{txmesh.pilot.token_review}).

    @ivar api: its base URL.
    @ivar token_file: the pilot's own bearer token file, or C{None}.
    @ivar ca_file: the certificates to trust for an C{https} api, or C{None}.
    @ivar audiences: the audiences a proxy's token must be for (empty: the
        API server's own).
    """

    api: str
    token_file: str | None = None
    ca_file: str | None = None
    audiences: tuple[str, ...] = ()


def load_pilot_settings(config_dir: str, defaults: MeshConfig | None = None) -> PilotSettings:
    """
    Read C{config_dir/mesh.yaml}.

    @param defaults: the mesh settings the file's keys override.
    @raise ConfigError: naming the file, the field and the reason.
    """
    mesh = defaults or MeshConfig()
    path = os.path.join(config_dir, MESH_FILE)
    default_registries: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    if os.path.isdir(os.path.join(config_dir, "services")):
        default_registries = (("registries[default]", {"type": "file", "path": "services"}),)
    if not os.path.exists(path):
        return PilotSettings(mesh, default_registries)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(path, "", f"not valid YAML: {e}") from None
    top = Section(path, "", doc if doc is not None else {})
    changes = {key: top.get(key, convert) for key, convert in _MESH_FIELDS.items() if key in top.value}
    if "inbound_address" in changes and "{port}" not in changes["inbound_address"]:
        raise ConfigError(path, "inbound_address", "must contain {port} (the node's inbound port)")
    ttl = top.get("workload_cert_ttl", _certificate_ttl, default=24 * 3600.0)
    telemetry = _telemetry(top.sub("telemetry"))
    if telemetry is not None:
        changes["telemetry"] = telemetry
    policy = top.sub("outbound_traffic_policy")
    if policy is not None:
        changes["outbound_traffic_policy"] = policy.get("mode", values.one_of(CAPTURE_MODES), "ALLOW_ANY")
        policy.done()
    registries: list[tuple[str, Mapping[str, Any]]] = []
    if "registries" in top.value:
        for field, body in top.items("registries"):
            section = Section(path, field, body)
            section.get("type", values.one_of(REGISTRY_TYPES), required=True)
            registries.append((field, body))
    else:
        registries = list(default_registries)
    auth_section = top.sub("kubernetes_auth") if "kubernetes_auth" in top.value else None
    if "kubernetes_auth" in top.value and auth_section is None:
        auth_section = Section(path, "kubernetes_auth", {})  # "kubernetes_auth:" alone: every default
    auth = _kubernetes_auth(auth_section, config_dir) if auth_section is not None else None
    top.done()
    return PilotSettings(attrs.evolve(mesh, **changes), tuple(registries), path, ttl, auth)


def restart_needed(running: PilotSettings, new: PilotSettings) -> tuple[str, ...]:
    """
    @param running: the settings the pilot started with.
    @param new: the settings just read.
    @return: the fields of L{RESTART_FIELDS} whose value in C{new} differs
        from C{running}'s, in that order.
    """
    now = {"trust_domain": (running.mesh.trust_domain, new.mesh.trust_domain),
           "workload_cert_ttl": (running.workload_cert_ttl, new.workload_cert_ttl),
           "kubernetes_auth": (running.kubernetes_auth, new.kubernetes_auth)}
    return tuple(name for name in RESTART_FIELDS if now[name][0] != now[name][1])


def mesh_changes(old: MeshConfig, new: MeshConfig) -> tuple[str, ...]:
    """
    @return: the names of the L{MeshConfig} fields that differ between
        C{old} and C{new}, in declaration order.
    """
    return tuple(f.name for f in attrs.fields(MeshConfig) if getattr(old, f.name) != getattr(new, f.name))


def _kubernetes_auth(section: Section, config_dir: str) -> KubernetesAuth:
    from txmesh.pilot.registry.kubernetes import IN_CLUSTER_API, IN_CLUSTER_CA, IN_CLUSTER_TOKEN, _url

    api = section.get("api", _url, default=IN_CLUSTER_API)
    https = api.startswith("https:")

    def path(value: Any) -> str:
        return os.path.join(config_dir, values.string(value))

    token_file = section.get("token_file", path, default=IN_CLUSTER_TOKEN if https else None)
    ca_file = section.get("ca_file", path, default=IN_CLUSTER_CA if https else None)
    if ca_file is not None and not https:
        raise section.error(f"only used with an https api, and api is {api}", section.field("ca_file"))
    audiences = section.get("audiences", _audiences, default=())
    section.done()
    return KubernetesAuth(api, token_file, ca_file, audiences)


def _audiences(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of audience names, got {values.kind_of(value)}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"audiences are non-empty strings, got {item!r}")
    return tuple(dict.fromkeys(value))


def _telemetry(s: Section | None) -> Telemetry | None:
    """
    Read C{telemetry: {metrics: bool, access_log: {...}, tracing: {...}}};
    the filter sections are checked by the proxies' filters (a bad one is
    NACKed, with the reason, by every proxy).
    """
    if s is None:
        return None
    metrics = s.get("metrics", values.boolean, default=True)
    sections = {}
    for key in ("access_log", "tracing"):
        value = s.value.get(key)
        s.seen.add(key)
        if value is not None and not isinstance(value, Mapping):
            raise s.error(f"expected a mapping (the {key} filter's config)", s.field(key))
        sections[key] = dict(value) if value is not None else None
    s.done()
    return Telemetry(metrics, sections["access_log"], sections["tracing"])


def _certificate_ttl(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 60:
        raise ValueError(f"must be at least 1m (proxies renew at half-life), got {value!r}")
    return seconds


def _file_registry(source: str, field: str, body: Mapping[str, Any], reactor: Any, config_dir: str) -> IRegistry:
    from txmesh.pilot.registry.file import FileRegistry

    section = Section(source, field, body)
    section.get("type", values.string)
    path = section.get("path", values.string, default="services")
    interval = section.get("poll_interval", _positive, default=body.get("_default_poll_interval", 1.0))
    section.seen.add("_default_poll_interval")
    section.done()
    return FileRegistry(os.path.join(config_dir, path), reactor, interval)


def _dns_registry(source: str, field: str, body: Mapping[str, Any], reactor: Any, config_dir: str) -> IRegistry:
    from twisted.names import cache, client, hosts, resolve

    from txmesh.pilot.registry.dns import DNSRegistry

    section = Section(source, field, body)
    section.get("type", values.string)
    names = [item for _, item in section.items("names", required=True)]
    min_ttl = section.get("min_ttl", _positive, default=1.0)
    max_ttl = section.get("max_ttl", _positive, default=300.0)
    section.done()
    try:
        # What client.createResolver() builds, but on the given reactor.
        resolver = resolve.ResolverChain([
            hosts.Resolver(),
            cache.CacheResolver(reactor=reactor),
            client.Resolver(resolv="/etc/resolv.conf", reactor=reactor),
        ])
        return DNSRegistry(names, resolver, reactor, min_ttl, max_ttl)
    except ConfigError as e:
        raise ConfigError(source, f"{field}.{e.field}" if e.field else field, e.reason) from None


def _etcd_registry(source: str, field: str, body: Mapping[str, Any], reactor: Any, config_dir: str) -> IRegistry:
    from txmesh.pilot.registry import etcd

    return etcd.from_config(source, field, body, reactor, config_dir)


def _kubernetes_registry(
    source: str, field: str, body: Mapping[str, Any], reactor: Any, config_dir: str
) -> IRegistry:
    from txmesh.pilot.registry import kubernetes

    return kubernetes.from_config(source, field, body, reactor, config_dir)


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, not {value!r}")
    return float(value)


_FACTORIES: dict[str, Callable[[str, str, Mapping[str, Any], Any, str], IRegistry]] = {
    "file": _file_registry,
    "dns": _dns_registry,
    "etcd": _etcd_registry,
    "kubernetes": _kubernetes_registry,
}


def build_registries(
    settings: PilotSettings, reactor: Any, config_dir: str, poll_interval: float = 1.0
) -> list[IRegistry]:
    """
    Make the registries C{settings} lists (not started).

    @param poll_interval: seconds between checks of a C{file} registry that
        names no C{poll_interval}.
    @raise ConfigError: a registry's section is invalid.
    """
    source = settings.source or os.path.join(config_dir, MESH_FILE)
    made = []
    for field, body in settings.registries:
        if body["type"] == "file":
            body = {**body, "_default_poll_interval": poll_interval}
        made.append(_FACTORIES[body["type"]](source, field, body, reactor, config_dir))
    return made
