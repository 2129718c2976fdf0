"""
A fake Kubernetes API server for registry tests: C{twisted.web} on
127.0.0.1, serving Services, EndpointSlices and Pods in the JSON shapes the
real API documents.

  - list: C{GET /api/v1/services} (or C{/api/v1/namespaces/<ns>/services},
    and the same for C{pods} and C{/apis/discovery.k8s.io/v1/...endpointslices})
    answers a C{ServiceList} with C{metadata.resourceVersion} and C{items};
  - watch: C{?watch=1&resourceVersion=N&allowWatchBookmarks=true} streams
    newline-delimited C{{"type": ..., "object": ...}} events (chunked), the
    events after C{N} first;
  - a C{resourceVersion} older than the last L{FakeKubernetes.compact}
    gets C{410 Gone}: an C{ERROR} event on a watch, HTTP 410 on a list;
  - every request needs C{Authorization: Bearer <token>} (HTTP 401
    otherwise) unless C{token} is C{None};
  - C{POST /apis/authentication.k8s.io/v1/tokenreviews} reviews the
    service-account tokens registered with
    L{FakeKubernetes.add_service_account_token} (or made by
    L{FakeKubernetes.service_account_token}), answering HTTP 201 with a
    C{TokenReview} whose C{status} says C{authenticated}, the user
    C{system:serviceaccount:<ns>:<sa>} and the audiences; HTTP 403 when
    L{FakeKubernetes.may_review} is false (the caller's RBAC).

The test changes the objects with L{FakeKubernetes.add},
L{FakeKubernetes.modify} and L{FakeKubernetes.delete}, and drives the
watches with L{FakeKubernetes.bookmark}, L{FakeKubernetes.send_gone},
L{FakeKubernetes.send_raw} and L{FakeKubernetes.end_watches}.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from typing import Any

from twisted.internet import defer
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import Resource

# collection -> (kind, apiVersion)
KINDS = {
    "services": ("Service", "v1"),
    "endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "pods": ("Pod", "v1"),
}

_PATH = re.compile(
    r"^/(?:api/v1|apis/discovery\.k8s\.io/v1)(?:/namespaces/(?P<ns>[^/]+))?/(?P<kind>services|pods|endpointslices)$"
)
_GROUP = {"services": "/api/v1", "pods": "/api/v1", "endpointslices": "/apis/discovery.k8s.io/v1"}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """
    @return: a v1 Status object, as the API server answers errors.
    """
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def service(name: str, namespace: str = "default", ports: list[dict[str, Any]] | None = None,
            **spec: Any) -> dict[str, Any]:
    """
    @return: a v1 Service.
    """
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-svc-{namespace}-{name}",
                     "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"app": name}},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "selector": {"app": name},
                 "ports": ports if ports is not None else [
                     {"name": "http", "protocol": "TCP", "port": 9080, "targetPort": 9080}]},
        "status": {"loadBalancer": {}},
    }
    body["spec"].update(spec)
    return body


def endpoint(address: str, pod: str | None = None, ready: bool | None = True, zone: str | None = None,
             namespace: str = "default") -> dict[str, Any]:
    """
    @return: one entry of an EndpointSlice's C{endpoints}.
    """
    body: dict[str, Any] = {"addresses": [address], "conditions": {"ready": ready, "serving": ready,
                                                                    "terminating": False}}
    if ready is None:
        body["conditions"] = {}
    if pod is not None:
        body["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pod, "uid": f"uid-pod-{pod}"}
        body["nodeName"] = "node-1"
    if zone is not None:
        body["zone"] = zone
    return body


def endpoint_slice(name: str, service_name: str, endpoints: list[dict[str, Any]], namespace: str = "default",
                   ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """
    @return: a discovery.k8s.io/v1 EndpointSlice.
    """
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-eps-{name}",
                     "generateName": f"{service_name}-",
                     "labels": {"kubernetes.io/service-name": service_name,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service_name,
                                          "uid": f"uid-svc-{namespace}-{service_name}"}]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "protocol": "TCP", "port": 19080}],
    }


def pod(name: str, labels: dict[str, str], ip: str, namespace: str = "default") -> dict[str, Any]:
    """
    @return: a v1 Pod.
    """
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-pod-{name}", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}], "nodeName": "node-1",
                 "serviceAccountName": "default"},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


class _Watch:
    def __init__(self, kind: str, namespace: str | None, request: server.Request, bookmarks: bool):
        self.kind = kind
        self.namespace = namespace
        self.request = request
        self.bookmarks = bookmarks
        self.open = True

    def send(self, event: dict[str, Any] | bytes) -> None:
        if self.open:
            data = event if isinstance(event, bytes) else json.dumps(event).encode() + b"\n"
            self.request.write(data)

    def finish(self) -> None:
        if self.open:
            self.open = False
            self.request.finish()


class _API(Resource):
    isLeaf = True

    def __init__(self, fake: FakeKubernetes):
        super().__init__()
        self._fake = fake

    def render_GET(self, request: server.Request) -> Any:
        return self._fake.render(request)

    def render_POST(self, request: server.Request) -> Any:
        return self._fake.render_post(request)


class FakeKubernetes:
    """
    The fake API server.

    @ivar requests: every request seen: C{(path, params)} with params as a
        dict of strings.
    @ivar garbage: collections whose lists answer invalid JSON.
    @ivar token: the bearer token required, or C{None}.
    @ivar may_review: whether that token's user may create tokenreviews.
    @ivar review_delay: seconds before a tokenreview is answered.
    @ivar reviews: the C{spec} of every tokenreview received, in order.
    """

    AUDIENCE = "https://kubernetes.default.svc.cluster.local"

    def __init__(self, reactor: Any, token: str | None = "s3cret-token"):
        self.reactor = reactor
        self.token = token
        self.version = 100
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.watches: list[_Watch] = []
        self.garbage: set[str] = set()
        self._next_watch_code: dict[str, int] = {}
        self._port: Any = None
        self._factory: WrappingFactory | None = None
        self.port_number = 0
        self.may_review = True
        self.review_delay = 0.0
        self.reviews: list[dict[str, Any]] = []
        self._accounts: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        self._serial = 0

    # Serving

    def start(self) -> None:
        """
        Listen on 127.0.0.1 (the same port as before after a L{stop}).
        """
        site = server.Site(_API(self))
        site.noisy = False
        # WrappingFactory keeps the open connections, for stop() to cut.
        self._factory = WrappingFactory(site)
        self._factory.noisy = False
        self._port = self.reactor.listenTCP(self.port_number, self._factory, interface="127.0.0.1")
        self.port_number = self._port.getHost().port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port_number}"

    def stop(self) -> defer.Deferred[Any]:
        """
        Stop listening and cut every connection, as a dying server does.
        """
        for watch in self.watches:
            watch.open = False
        self.watches = []
        for proto in list(self._factory.protocols if self._factory is not None else ()):
            proto.transport.abortConnection()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    def render(self, request: server.Request) -> Any:
        path = request.path.decode()
        params = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.requests.append((path, params))
        if self.token is not None and request.getHeader("authorization") != f"Bearer {self.token}":
            return self._error(request, status(401, "Unauthorized", "Unauthorized"))
        match = _PATH.match(path)
        if match is None or not path.startswith(_GROUP[match["kind"]]):
            return self._error(request, status(404, "NotFound", "the server could not find the requested resource"))
        kind, namespace = match["kind"], match["ns"]
        version = params.get("resourceVersion", "")
        too_old = bool(version) and version != "0" and int(version) < self.compacted
        if params.get("watch") in ("1", "true"):
            return self._watch(request, kind, namespace, version, too_old, params.get("allowWatchBookmarks") == "true")
        if too_old:
            return self._error(request, status(410, "Expired", f"too old resource version: {version} ({self.version})"))
        request.setHeader("Content-Type", "application/json")
        if kind in self.garbage:
            return b'{"kind": "ServiceList", "items": [{'
        items = [copy.deepcopy(obj) for key, obj in sorted(self.objects[kind].items())
                 if namespace is None or key[0] == namespace]
        return json.dumps({
            "kind": KINDS[kind][0] + "List",
            "apiVersion": KINDS[kind][1],
            "metadata": {"resourceVersion": str(self.version)},
            "items": items,
        }).encode()

    def render_post(self, request: server.Request) -> Any:
        path = request.path.decode()
        self.requests.append((path, {}))
        if self.token is not None and request.getHeader("authorization") != f"Bearer {self.token}":
            return self._error(request, status(401, "Unauthorized", "Unauthorized"))
        if path != "/apis/authentication.k8s.io/v1/tokenreviews":
            return self._error(request, status(405, "MethodNotAllowed", "the server does not allow this method"))
        if not self.may_review:
            return self._error(request, status(
                403, "Forbidden", 'tokenreviews.authentication.k8s.io is forbidden: User '
                '"system:serviceaccount:txmesh:pilot" cannot create resource "tokenreviews" in API group '
                '"authentication.k8s.io" at the cluster scope'))
        try:
            review = json.loads(request.content.read())
            spec = review["spec"]
            token = spec["token"]
        except (ValueError, KeyError, TypeError):
            return self._error(request, status(400, "BadRequest", "not a TokenReview"))
        self.reviews.append(spec)
        answer = json.dumps({**review, "metadata": {"creationTimestamp": None},
                             "status": self._review(token, spec.get("audiences") or [])}).encode()
        request.setResponseCode(201)
        request.setHeader("Content-Type", "application/json")
        if not self.review_delay:
            return answer

        def later() -> None:
            if not request.finished and not request._disconnected:
                request.write(answer)
                request.finish()

        call = self.reactor.callLater(self.review_delay, later)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return server.NOT_DONE_YET

    def _review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        found = self._accounts.get(token)
        if found is None:
            return {"user": {}, "error": "[invalid bearer token, service account token is not valid]"}
        namespace, name, token_audiences = found
        granted = [a for a in audiences if a in token_audiences] if audiences else list(token_audiences)
        if not granted:
            return {"user": {}, "error": f"[invalid bearer token, token audiences {list(token_audiences)} is "
                                         f"invalid for the target audiences {audiences}]"}
        return {
            "authenticated": True,
            "user": {"username": f"system:serviceaccount:{namespace}:{name}", "uid": f"uid-sa-{namespace}-{name}",
                     "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                "system:authenticated"]},
            "audiences": granted,
        }

    def add_service_account_token(self, token: str, namespace: str, name: str,
                                  audiences: tuple[str, ...] = (AUDIENCE,)) -> None:
        """
        Make C{token} valid, for service account C{namespace}/C{name}.
        """
        self._accounts[token] = (namespace, name, audiences)

    def service_account_token(self, namespace: str, name: str, exp: float | None = None,
                              audiences: tuple[str, ...] = (AUDIENCE,)) -> str:
        """
        @return: a new token shaped like a projected service-account token
            (a JWT whose payload has C{exp}, C{sub} and C{aud}; the
            signature is not a real one), valid here.
        """
        self._serial += 1

        def part(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        payload: dict[str, Any] = {"aud": list(audiences), "sub": f"system:serviceaccount:{namespace}:{name}",
                                   "iss": self.AUDIENCE, "jti": str(self._serial)}
        if exp is not None:
            payload["exp"] = int(exp)
        token = f"{part({'alg': 'RS256', 'kid': 'fake'})}.{part(payload)}.c2lnbmF0dXJl{self._serial}"
        self.add_service_account_token(token, namespace, name, audiences)
        return token

    def _error(self, request: server.Request, body: dict[str, Any]) -> bytes:
        request.setResponseCode(body["code"])
        request.setHeader("Content-Type", "application/json")
        return json.dumps(body).encode()

    def _watch(self, request: server.Request, kind: str, namespace: str | None, version: str,
               too_old: bool, bookmarks: bool) -> Any:
        code = self._next_watch_code.pop(kind, None)
        if code is not None:
            return self._error(request, status(code, "Expired" if code == 410 else "InternalError", f"HTTP {code}"))
        request.setHeader("Content-Type", "application/json")
        watch = _Watch(kind, namespace, request, bookmarks)
        # The real server sends the headers at once, before any event.
        request.write(b"")
        if too_old:
            watch.send({"type": "ERROR",
                        "object": status(410, "Expired", f"too old resource version: {version} ({self.version})")})
            watch.finish()
            return server.NOT_DONE_YET
        since = int(version) if version else self.version
        for rv, type_, obj in self.history:
            if rv > since and self._wants(watch, obj):
                watch.send({"type": type_, "object": obj})
        self.watches.append(watch)

        def gone(_: Any) -> None:
            watch.open = False
            if watch in self.watches:
                self.watches.remove(watch)

        request.notifyFinish().addBoth(gone)
        return server.NOT_DONE_YET

    def _wants(self, watch: _Watch, obj: dict[str, Any]) -> bool:
        return obj["kind"] == KINDS[watch.kind][0] and (
            watch.namespace is None or obj["metadata"]["namespace"] == watch.namespace)

    # Changing objects

    def _event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.version)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if type_ == "DELETED":
            self.objects[kind].pop(key, None)
        else:
            self.objects[kind][key] = copy.deepcopy(obj)
        obj["kind"], obj["apiVersion"] = KINDS[kind]
        self.history.append((self.version, type_, obj))
        for watch in list(self.watches):
            if watch.kind == kind and self._wants(watch, obj):
                watch.send({"type": type_, "object": obj})

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        """
        Create an object (C{ADDED} to the watches).
        """
        self._event(kind, "ADDED", obj)

    def modify(self, kind: str, obj: dict[str, Any]) -> None:
        """
        Replace an object (C{MODIFIED} to the watches).
        """
        self._event(kind, "MODIFIED", obj)

    def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        """
        Delete an object (C{DELETED}, with its last state, to the watches).
        """
        obj = self.objects[kind][(namespace, name)]
        self._event(kind, "DELETED", obj)

    # Driving the watches

    def bookmark(self, kind: str | None = None, version: int | None = None) -> str:
        """
        Send a C{BOOKMARK} to the watches that asked for them.

        @param version: the bookmark's version; by default a new one, as if
            other collections had changed.
        @return: the version sent.
        """
        if version is None:
            self.version += 1
            version = self.version
        for watch in list(self.watches):
            if watch.bookmarks and (kind is None or watch.kind == kind):
                name, api = KINDS[watch.kind]
                watch.send({"type": "BOOKMARK",
                            "object": {"kind": name, "apiVersion": api,
                                       "metadata": {"resourceVersion": str(version)}}})
        return str(version)

    def compact(self) -> None:
        """
        Forget the history: older versions now get 410 Gone.
        """
        self.compacted = self.version
        self.history = []

    def send_gone(self, kind: str | None = None) -> None:
        """
        End the watches with an C{ERROR} event holding a 410 Status.
        """
        for watch in list(self.watches):
            if kind is None or watch.kind == kind:
                watch.send({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                watch.finish()

    def answer_next_watch(self, kind: str, code: int) -> None:
        """
        Answer the next watch of C{kind} with HTTP C{code} and a Status.
        """
        self._next_watch_code[kind] = code

    def send_raw(self, kind: str, data: bytes) -> None:
        """
        Write bytes to the watches of C{kind} as they are.
        """
        for watch in list(self.watches):
            if watch.kind == kind:
                watch.send(data)

    def end_watches(self, kind: str | None = None) -> None:
        """
        End the watches cleanly, as the server does at C{timeoutSeconds}.
        """
        for watch in list(self.watches):
            if kind is None or watch.kind == kind:
                watch.finish()

    def watch_requests(self, kind: str) -> list[dict[str, str]]:
        """
        @return: the params of every watch request of C{kind}, in order.
        """
        return [params for path, params in self.requests
                if path.endswith("/" + kind) and params.get("watch") in ("1", "true")]

    def list_requests(self, kind: str) -> list[dict[str, str]]:
        """
        @return: the params of every list request of C{kind}, in order.
        """
        return [params for path, params in self.requests
                if path.endswith("/" + kind) and params.get("watch") not in ("1", "true")]
