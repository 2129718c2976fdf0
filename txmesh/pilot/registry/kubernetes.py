"""
A registry of Kubernetes Services: Services, EndpointSlices and Pods read
from the API server with list + watch, as every Kubernetes controller does.

Each collection is listed once (the list's C{metadata.resourceVersion} is
kept), then watched from that version with C{allowWatchBookmarks=true}:

  - C{ADDED}, C{MODIFIED}, C{DELETED} change the local copy and the version;
  - C{BOOKMARK} moves the version only;
  - C{410 Gone} (an HTTP status, or an C{ERROR} event whose Status has code
    410) means the version was compacted away: the collection is listed
    again;
  - a stream that ends is watched again from the last version, after a
    backoff that grows while nothing arrives;
  - an unreachable API server, an HTTP error or an unreadable answer keeps
    the last view; C{status()} and the log carry the error until the
    collection is read again.

The objects are turned into services by L{build_view}, a pure function.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config import values
from txmesh.config.errors import ConfigError
from txmesh.config.model import Endpoint
from txmesh.pilot.registry.base import IRegistry, RegistryState, ServiceEndpoints, ServicePort, StateBackedRegistry

IN_CLUSTER_API = "https://kubernetes.default.svc"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
REGION_LABEL = "topology.kubernetes.io/region"

#: The collections watched: name, API group path.
RESOURCES = (
    ("services", "/api/v1"),
    ("endpointslices", "/apis/discovery.k8s.io/v1"),
    ("pods", "/api/v1"),
)

# appProtocol values (IANA names and Kubernetes' own) and Istio's port name
# prefixes, to txmesh protocols.
_APP_PROTOCOLS = {
    "http": "HTTP",
    "http2": "HTTP2",
    "h2c": "HTTP2",
    "grpc": "GRPC",
    "grpc-web": "HTTP",
    "https": "HTTPS",
    "tls": "TLS",
    "tcp": "TCP",
    "kubernetes.io/h2c": "HTTP2",
    "kubernetes.io/ws": "HTTP",
    "kubernetes.io/wss": "HTTPS",
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def port_protocol(name: str, app_protocol: str | None = None) -> str:
    """
    The protocol of a Service port, as Istio decides it: C{appProtocol}
    first, then the port name's prefix (C{http}, C{http-web}, C{grpc-api},
    C{tcp-db}, ...), else TCP.

    @param name: the port's name (may be empty).
    @param app_protocol: the port's C{appProtocol}, or C{None}.
    @return: one of L{txmesh.pilot.registry.base.PROTOCOLS}.
    """
    if app_protocol:
        found = _APP_PROTOCOLS.get(app_protocol.lower())
        if found is not None:
            return found
    name = name.lower()
    if name in _APP_PROTOCOLS:
        return _APP_PROTOCOLS[name]
    if name.startswith("grpc-web-"):
        return "HTTP"
    return _APP_PROTOCOLS.get(name.split("-", 1)[0], "TCP")


def _dig(obj: Any, *keys: str, kind: type | tuple[type, ...] = object, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return default
        obj = obj.get(key)
    return obj if obj is not None and isinstance(obj, kind) else default


def object_key(obj: Any) -> tuple[str, str] | None:
    """
    @return: C{(namespace, name)} of an API object, or C{None} when it has
        no name.
    """
    name = _dig(obj, "metadata", "name", kind=str)
    if not name:
        return None
    return (_dig(obj, "metadata", "namespace", kind=str, default=""), name)


def _string_labels(obj: Any) -> dict[str, str]:
    found = _dig(obj, "metadata", "labels", kind=Mapping, default={})
    return {k: v for k, v in found.items() if isinstance(k, str) and k and isinstance(v, str)}


def _locality(endpoint: Mapping[str, Any], pod_labels: Mapping[str, str]) -> str:
    topology = _dig(endpoint, "deprecatedTopology", kind=Mapping, default={})
    zone = _dig(endpoint, "zone", kind=str) or topology.get(ZONE_LABEL) or pod_labels.get(ZONE_LABEL) or ""
    region = topology.get(REGION_LABEL) or pod_labels.get(REGION_LABEL) or ""
    if not isinstance(zone, str) or not isinstance(region, str):
        return ""
    if zone:
        return f"{region}/{zone}"
    return region


def _service_ports(service: Mapping[str, Any]) -> list[tuple[str, ServicePort]]:
    out = []
    for body in _dig(service, "spec", "ports", kind=list, default=[]):
        if not isinstance(body, Mapping):
            continue
        number = body.get("port")
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            continue
        if body.get("protocol", "TCP") != "TCP":
            # UDP and SCTP ports are no business of an L4/L7 TCP proxy.
            continue
        name = body.get("name") if isinstance(body.get("name"), str) else ""
        app = body.get("appProtocol") if isinstance(body.get("appProtocol"), str) else None
        out.append((name, ServicePort(name or str(number), number, port_protocol(name, app))))
    return out


def _slice_endpoints(
    slice_: Mapping[str, Any], port_name: str, pods: Mapping[tuple[str, str], tuple[Mapping[str, str], str]]
) -> list[Endpoint]:
    numbers = []
    for body in _dig(slice_, "ports", kind=list, default=[]):
        if not isinstance(body, Mapping) or body.get("protocol", "TCP") != "TCP":
            continue
        name = body.get("name") or ""
        number = body.get("port")
        # A port of null means "all ports" (a slice without a service port
        # mapping); nothing to connect to.
        if name == port_name and isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 65535:
            numbers.append(number)
    if not numbers:
        return []
    namespace = _dig(slice_, "metadata", "namespace", kind=str, default="")
    out = []
    for endpoint in _dig(slice_, "endpoints", kind=list, default=[]):
        if not isinstance(endpoint, Mapping):
            continue
        if _dig(endpoint, "conditions", "ready", kind=bool, default=True) is False:
            continue
        addresses = _dig(endpoint, "addresses", kind=list, default=[])
        # The API says the addresses are fungible and consumers may use the
        # first only; more than one never happens in practice.
        if not addresses or not isinstance(addresses[0], str) or not addresses[0]:
            continue
        pod_labels: Mapping[str, str] = {}
        account = ""
        ref = _dig(endpoint, "targetRef", kind=Mapping, default={})
        if ref.get("kind") == "Pod" and isinstance(ref.get("name"), str):
            pod_labels, account = pods.get((ref.get("namespace") or namespace, ref["name"]), ({}, ""))
        for number in numbers:
            out.append(
                Endpoint(
                    host=addresses[0],
                    port=number,
                    labels=tuple(sorted(pod_labels.items())),
                    locality=_locality(endpoint, pod_labels),
                    service_account=account,
                )
            )
    return out


def _pod_account(pod: Mapping[str, Any], namespace: str) -> str:
    account = _dig(pod, "spec", "serviceAccountName", kind=str)
    # Unknown (not "default") when absent: a guess would refuse the pod's
    # real identity.
    return f"{namespace}/{account}" if account and namespace else ""


def build_view(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    domain_suffix: str = "cluster.local",
) -> dict[str, ServiceEndpoints]:
    """
    Turn v1 Services, discovery.k8s.io/v1 EndpointSlices and v1 Pods (as
    the API serves them) into the registry's view.

    A Service C{name} in namespace C{ns} becomes host
    C{name.ns.svc.<domain_suffix>} with its TCP ports. Its endpoints come
    from the EndpointSlices labelled C{kubernetes.io/service-name: name} in
    the same namespace: each ready endpoint's (first) address with the
    slice's port of the same name as the service port (the target port, not
    the service port), labelled with the labels of the Pod its C{targetRef}
    names and carrying that Pod's C{spec.serviceAccountName} (as
    C{<namespace>/<account>}), located at C{region/zone}. An ExternalName Service gets its
    external name as the endpoint on each port. Parts of objects that do
    not have the documented shape are skipped.

    @param services: Service objects.
    @param slices: EndpointSlice objects.
    @param pods: Pod objects.
    @param domain_suffix: the cluster's DNS domain.
    @return: host name to L{ServiceEndpoints}.
    """
    pod_labels = {key: (_string_labels(pod), _pod_account(pod, key[0]))
                  for pod in pods if (key := object_key(pod)) is not None}
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for slice_ in slices:
        key = object_key(slice_)
        owner = _string_labels(slice_).get(SERVICE_NAME_LABEL)
        if key is None or not owner:
            continue
        by_service.setdefault((key[0], owner), []).append(slice_)
    out: dict[str, ServiceEndpoints] = {}
    for service in services:
        key = object_key(service)
        if key is None or not key[0]:
            continue
        namespace, name = key
        host = f"{name}.{namespace}.svc.{domain_suffix}"
        ports = _service_ports(service)
        endpoints: list[Endpoint] = []
        external = _dig(service, "spec", "externalName", kind=str)
        if _dig(service, "spec", "type") == "ExternalName" and external:
            endpoints = [Endpoint(host=external, port=p.number) for _, p in ports]
        else:
            owned = sorted(by_service.get(key, []), key=lambda s: object_key(s) or ("", ""))
            for port_name, _ in ports:
                for slice_ in owned:
                    for endpoint in _slice_endpoints(slice_, port_name, pod_labels):
                        # The same endpoint sits in two slices while they
                        # are being rebalanced.
                        if endpoint not in endpoints:
                            endpoints.append(endpoint)
        out[host] = ServiceEndpoints(host, tuple(p for _, p in ports), tuple(endpoints))
    return out


def collection_path(resource: str, namespace: str | None = None) -> str:
    """
    @param resource: one of the names in L{RESOURCES}.
    @param namespace: a namespace, or C{None} for all of them.
    @return: the API path of the collection.
    """
    group = dict(RESOURCES)[resource]
    if namespace is None:
        return f"{group}/{resource}"
    return f"{group}/namespaces/{namespace}/{resource}"


class _Unreadable(Exception):
    """
    The API server answered something that is not what the API documents.
    """


def _status_message(body: bytes) -> str:
    try:
        status = json.loads(body)
    except ValueError:
        return ""
    message = _dig(status, "message", kind=str)
    return f": {message}" if message else ""


class _EventStream(Protocol):
    """
    Split a watch response body into lines and hand them to the watcher in
    batches (one per chunk received).
    """

    def __init__(self, watcher: _Watcher):
        self._watcher = watcher
        self._buffer = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        lines = [line for line in lines if line.strip()]
        self._watcher.events(self, lines)

    def abort(self) -> None:
        """
        Drop the connection; nothing more is delivered.
        """
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.closed:
            return
        self.closed = True
        self._watcher.ended(self, reason)


class _Watcher:
    """
    The list + watch loop of one collection.

    @ivar objects: the collection as last seen, by C{(namespace, name)}.
    @ivar resource_version: the version to watch from.
    @ivar synced: whether a list has succeeded.
    @ivar error: the loop's last error, cleared by the next good answer.
    """

    def __init__(self, registry: KubernetesRegistry, resource: str, namespace: str | None):
        self.resource = resource
        self.path = collection_path(resource, namespace)
        self.objects: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = False
        self.error: str | None = None
        self._registry = registry
        self._running = False
        self._pending: defer.Deferred[Any] | None = None
        self._stream: _EventStream | None = None
        self._call: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._failures = 0

    # Lifecycle

    def start(self) -> None:
        self._running = True
        self._list()

    def stop(self) -> None:
        self._running = False
        for call in (self._call, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._call = self._idle = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.abort()

    def _retry(self, step: Callable[[], None]) -> None:
        reg = self._registry
        delay = min(reg.retry_min * 2**self._failures, reg.retry_max)
        self._failures += 1
        self._call = reg.reactor.callLater(delay, self._fire, step)

    def _fire(self, step: Callable[[], None]) -> None:
        self._call = None
        if self._running:
            step()

    def _failed(self, reason: str, step: Callable[[], None]) -> None:
        self.error = f"{self.path}: {reason}"
        self._registry.watcher_failed(self)
        self._retry(step)

    def _fine(self, reset_backoff: bool = True) -> None:
        if reset_backoff:
            self._failures = 0
        if self.error is not None:
            self.error = None
            self._registry.watcher_recovered(self)

    # List

    def _get(self, params: Mapping[str, str], unbuffered: bool) -> defer.Deferred[Any] | None:
        try:
            headers = self._registry.headers()
        except OSError as e:
            self._failed(f"cannot read the token file: {e.strerror or e}", self._list)
            return None
        url = self._registry.api + self.path + ("?" + urlencode(params) if params else "")
        d = self._registry.client.get(url, headers=headers, unbuffered=unbuffered)
        self._pending = d
        return d

    def _list(self) -> None:
        d = self._get({}, unbuffered=False)
        if d is None:
            return
        d.addCallback(self._listed)
        d.addErrback(self._list_failed)
        d.addErrback(self._bug)

    @defer.inlineCallbacks
    def _listed(self, response: Any) -> Any:
        body = yield response.content()
        self._pending = None
        if not self._running:
            return
        if response.code != 200:
            raise _Unreadable(f"HTTP {response.code}{_status_message(body)}")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise _Unreadable(f"the list is not JSON ({e})") from None
        version = _dig(doc, "metadata", "resourceVersion", kind=str)
        items = _dig(doc, "items", kind=list)
        if not version or items is None:
            raise _Unreadable("the list has no metadata.resourceVersion or no items")
        objects = {}
        for item in items:
            key = object_key(item)
            if key is None:
                raise _Unreadable("a listed object has no metadata.name")
            objects[key] = item
        self.objects = objects
        self.resource_version = version
        self.synced = True
        self._fine()
        self._registry.changed()
        self._watch()

    def _list_failed(self, failure: Failure) -> None:
        self._pending = None
        if not self._running or failure.check(defer.CancelledError):
            return
        self._failed(f"list failed: {_reason(failure)}", self._list)

    # Watch

    def _watch(self) -> None:
        params = {
            "watch": "1",
            "resourceVersion": self.resource_version or "",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._registry.watch_timeout),
        }
        d = self._get(params, unbuffered=True)
        if d is None:
            return
        d.addCallback(self._watching)
        d.addErrback(self._watch_failed)
        d.addErrback(self._bug)

    def _watching(self, response: Any) -> Any:
        self._pending = None
        if not self._running:
            response.deliverBody(_Drop())
            return None
        if response.code == 410:
            response.deliverBody(_Discard())
            self._gone()
            return None
        if response.code != 200:
            d = response.content()
            d.addCallback(lambda body: self._failed(f"watch: HTTP {response.code}{_status_message(body)}", self._watch))
            return d
        # A server that accepts watches and ends them at once must still
        # meet a growing backoff: only events reset it.
        self._fine(reset_backoff=False)
        self._stream = _EventStream(self)
        self._touch()
        response.deliverBody(self._stream)
        return None

    def _watch_failed(self, failure: Failure) -> None:
        self._pending = None
        if not self._running or failure.check(defer.CancelledError):
            return
        self._failed(f"watch failed: {_reason(failure)}", self._watch)

    def _gone(self) -> None:
        self._registry.log.info(
            "registry {name}: {path} resourceVersion {version} is gone (410); listing again",
            name=self._registry.name,
            path=self.path,
            version=self.resource_version,
        )
        self._list()

    def _touch(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        # A half-open connection sends nothing, not even bookmarks: give up
        # on it a while after the server should have ended the watch.
        self._idle = self._registry.reactor.callLater(self._registry.watch_timeout + 30, self._idle_out)

    def _idle_out(self) -> None:
        self._idle = None
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()
            self._failed("watch: nothing received for too long", self._watch)

    def _end_stream(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()

    def events(self, stream: _EventStream, lines: list[bytes]) -> None:
        """
        Apply a batch of watch events.
        """
        if stream is not self._stream or not self._running:
            return
        self._touch()
        changed = False
        try:
            for line in lines:
                outcome = self._apply(line)
                if outcome == "gone":
                    self._end_stream()
                    if changed:
                        self._registry.changed()
                    self._gone()
                    return
                changed = changed or outcome == "changed"
        except _Unreadable as e:
            self._end_stream()
            if changed:
                self._registry.changed()
            # Events may have been lost with the garbage: read it all again.
            self._failed(str(e), self._list)
            return
        if lines:
            self._failures = 0
        if changed:
            self._registry.changed()

    def _apply(self, line: bytes) -> str:
        try:
            event = json.loads(line)
        except ValueError as e:
            raise _Unreadable(f"watch: an event is not JSON ({e})") from None
        kind = _dig(event, "type", kind=str)
        obj = _dig(event, "object", kind=Mapping)
        if kind is None or obj is None:
            raise _Unreadable("watch: an event has no type or no object")
        if kind == "ERROR":
            if obj.get("code") == 410:
                return "gone"
            raise _Unreadable(f"watch: error event: {obj.get('code')} {obj.get('message', '')}".rstrip())
        version = _dig(obj, "metadata", "resourceVersion", kind=str)
        if kind == "BOOKMARK":
            if version:
                self.resource_version = version
            return "same"
        key = object_key(obj)
        if key is None or kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise _Unreadable(f"watch: unreadable {kind} event")
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        if version:
            self.resource_version = version
        return "changed"

    def ended(self, stream: _EventStream, reason: Failure | None) -> None:
        """
        The watch stream ended: watch again from the last version.
        """
        if stream is not self._stream:
            return
        self._stream = None
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._running:
            self._retry(self._watch)

    def _bug(self, failure: Failure) -> None:
        self._registry.log.failure("registry {name}: internal error in {path}", failure=failure,
                                   name=self._registry.name, path=self.path)
        if self._running and self._call is None:
            self._failed(f"internal error: {_reason(failure)}", self._list)


class _Discard(Protocol):
    """
    Read a response body and throw it away.
    """

    def dataReceived(self, data: bytes) -> None:
        pass


class _Drop(Protocol):
    """
    Close a response's connection without reading its body.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _reason(failure: Failure) -> str:
    if failure.check(_Unreadable):
        return failure.getErrorMessage()
    message = failure.getErrorMessage()
    if failure.type.__name__ == "ResponseNeverReceived":
        inner = getattr(failure.value, "reasons", [])
        message = "; ".join(r.getErrorMessage() for r in inner) or message
    return f"{failure.type.__name__}: {message}"


def _https_policy(reactor: Any, ca_file: str) -> Any:
    from twisted.internet import ssl
    from twisted.web.client import BrowserLikePolicyForHTTPS

    with open(ca_file, "rb") as f:
        pem = f.read()
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    if not blocks:
        raise ValueError("holds no PEM certificate")
    try:
        roots = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    except Exception as e:
        raise ValueError(f"holds a certificate that cannot be loaded: {e}") from None
    return BrowserLikePolicyForHTTPS(trustRoot=roots)


@implementer(IRegistry)
class KubernetesRegistry(StateBackedRegistry):
    """
    Services, EndpointSlices and Pods from a Kubernetes API server, listed
    and watched; see the module docstring and L{build_view}.

    No view is published until every collection has been listed once, so
    subscribers never see services without their endpoints at start.
    """

    log = Logger()

    def __init__(
        self,
        api: str,
        reactor: Any,
        token: str | None = None,
        token_file: str | None = None,
        namespaces: Iterable[str] = (),
        domain_suffix: str = "cluster.local",
        client: Any = None,
        ca_file: str | None = None,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
        watch_timeout: int = 300,
    ):
        """
        @param api: the API server's base URL, C{https://host:port} (or
            C{http://} for C{kubectl proxy} and tests).
        @param reactor: the reactor: connects, and times the retries.
        @param token: a bearer token, or C{None}.
        @param token_file: a file holding the bearer token, read again for
            each request (service-account tokens are rotated); wins over
            C{token}.
        @param namespaces: the namespaces to watch; all when empty.
        @param domain_suffix: the cluster's DNS domain.
        @param client: a treq-like client (C{get(url, headers=...,
            unbuffered=...)}); by default one over an C{Agent} trusting
            C{ca_file}.
        @param ca_file: PEM certificates to trust for an C{https} api.
        @param retry_min: the first wait before retrying, in seconds.
        @param retry_max: the longest wait between retries.
        @param watch_timeout: the C{timeoutSeconds} asked of each watch.
        @raise ValueError: when C{ca_file} cannot be read.
        """
        self.api = api.rstrip("/")
        self.name = f"kubernetes:{self.api}"
        self.reactor = reactor
        self.domain_suffix = domain_suffix
        self.namespaces = tuple(namespaces)
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.watch_timeout = watch_timeout
        self._token = token
        self._token_file = token_file
        if client is None:
            import treq.client
            from twisted.web.client import Agent, HTTPConnectionPool

            kwargs: dict[str, Any] = {"pool": HTTPConnectionPool(reactor, persistent=False), "connectTimeout": 10}
            if ca_file is not None:
                try:
                    kwargs["contextFactory"] = _https_policy(reactor, ca_file)
                except OSError as e:
                    raise ValueError(f"cannot read {ca_file}: {e.strerror or e}") from None
            client = treq.client.HTTPClient(Agent(reactor, **kwargs))
        self.client = client
        self._state = RegistryState(self.name, reactor)
        self._watchers = [
            _Watcher(self, resource, namespace)
            for resource, _ in RESOURCES
            for namespace in (self.namespaces or (None,))
        ]
        self._running = False

    def headers(self) -> dict[str, list[str]]:
        """
        @return: the request headers, with the current bearer token.
        @raise OSError: when the token file cannot be read.
        """
        headers = {"Accept": ["application/json"]}
        token = self._token
        if self._token_file is not None:
            with open(self._token_file, encoding="utf-8") as f:
                token = f.read().strip()
        if token:
            headers["Authorization"] = [f"Bearer {token}"]
        return headers

    def resource_versions(self) -> dict[str, str | None]:
        """
        @return: each watched collection's path and the version it is
            watched from.
        """
        return {w.path: w.resource_version for w in self._watchers}

    def _error_text(self) -> str | None:
        return "; ".join(w.error for w in self._watchers if w.error) or None

    def changed(self) -> None:
        """
        A collection changed: publish the new view once all are listed.
        """
        if not self._running or not all(w.synced for w in self._watchers):
            return

        def objects(resource: str) -> list[Mapping[str, Any]]:
            return [o for w in self._watchers if w.resource == resource for o in w.objects.values()]

        view = build_view(objects("services"), objects("endpointslices"), objects("pods"), self.domain_suffix)
        self._state.update(self, view, self._error_text())

    def watcher_failed(self, watcher: _Watcher) -> None:
        """
        A collection could not be read; keep the last view.
        """
        self._state.fail(self._error_text() or "unknown error")

    def watcher_recovered(self, watcher: _Watcher) -> None:
        """
        A collection is read again.
        """
        error = self._error_text()
        if error is None:
            self.log.info("registry {name}: reading the API server again", name=self.name)
        self._state.error = error

    def start(self) -> None:
        """
        List and watch every collection.
        """
        if self._running:
            return
        self._running = True
        for watcher in self._watchers:
            watcher.start()

    def stop(self) -> None:
        """
        Cancel the requests and close the watches.
        """
        self._running = False
        for watcher in self._watchers:
            watcher.stop()

_KEYS = {"type", "api", "token_file", "ca_file", "namespaces", "domain_suffix"}


def _url(value: Any) -> str:
    value = values.string(value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"expected a base URL without path or query, got {value!r}")
    return value.rstrip("/")


def _namespaces(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of namespace names, got {values.kind_of(value)}")
    for name in value:
        if not isinstance(name, str) or not _DNS_LABEL.match(name):
            raise ValueError(f"namespace names are DNS labels (a-z, 0-9, '-', at most 63), got {name!r}")
    return tuple(dict.fromkeys(value))


def _suffix(value: Any) -> str:
    value = values.string(value)
    if value.startswith(".") or value.endswith(".") or " " in value:
        raise ValueError(f"expected a domain like cluster.local, got {value!r}")
    return value


def from_config(
    source: str, field: str, body: Mapping[str, Any], reactor: Any, config_dir: str | None = None
) -> KubernetesRegistry:
    """
    Make a registry from its configuration::

        type: kubernetes
        api: https://kubernetes.default.svc     # the default
        token_file: /var/run/secrets/kubernetes.io/serviceaccount/token
        ca_file: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
        namespaces: [default, shop]             # default: all
        domain_suffix: cluster.local            # the default

    With an C{https} api, C{token_file} and C{ca_file} default to the
    in-cluster service-account files; with C{http} (C{kubectl proxy},
    tests) no token is sent unless C{token_file} is given, and C{ca_file}
    is not allowed.

    @param source: the file the configuration came from, for errors.
    @param field: the dotted path of C{body} in it, e.g. C{registries[1]}.
    @param body: the mapping; C{type} is not checked here.
    @param reactor: the reactor the registry runs in.
    @param config_dir: the directory relative C{token_file} and C{ca_file}
        paths are taken from (the pilot's C{CONFIG_DIR}, as the C{file}
        registry's C{path}); C{None} leaves them relative to the working
        directory.
    @raise ConfigError: naming C{<field>.<key>} and what is wrong.
    """

    def path(value: Any) -> str:
        # os.path.join keeps an absolute path as it is.
        text = values.string(value)
        return os.path.join(config_dir, text) if config_dir is not None else text

    def where(key: str) -> str:
        return f"{field}.{key}" if field else key

    if not isinstance(body, Mapping):
        raise ConfigError(source, field, f"expected a mapping, got {values.kind_of(body)}")
    for key in body:
        if key not in _KEYS:
            raise ConfigError(source, where(str(key)), f"unknown field (expected one of {', '.join(sorted(_KEYS))})")

    def read(key: str, convert: Callable[[Any], Any], default: Any) -> Any:
        if key not in body:
            return default
        try:
            return convert(body[key])
        except ValueError as e:
            raise ConfigError(source, where(key), str(e)) from None

    api = read("api", _url, IN_CLUSTER_API)
    https = api.startswith("https:")
    token_file = read("token_file", path, IN_CLUSTER_TOKEN if https else None)
    ca_file = read("ca_file", path, IN_CLUSTER_CA if https else None)
    if ca_file is not None and not https:
        raise ConfigError(source, where("ca_file"), f"only used with an https api, and api is {api}")
    namespaces = read("namespaces", _namespaces, ())
    domain_suffix = read("domain_suffix", _suffix, "cluster.local")
    try:
        return KubernetesRegistry(
            api, reactor, token_file=token_file, namespaces=namespaces, domain_suffix=domain_suffix, ca_file=ca_file
        )
    except ValueError as e:
        hint = " (not running in a pod? set api, token_file and ca_file)" if "ca_file" not in body else ""
        raise ConfigError(source, where("ca_file"), f"{e}{hint}") from None
