"""
The pilot's operator HTTP API: JSON views of the connected proxies and their
config, the services the registries know and the pilot's health, plus
validating and changing the Istio documents of the config directory.

See C{docs/operator-api.md}; the OpenAPI 3.0 description is L{OPENAPI}
(served as C{GET /openapi.json} and kept in C{docs/openapi.json}).

Build the site with L{operator_site}, which refuses to serve an open
(tokenless) API on anything but loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txmesh.config.errors import ConfigError
from txmesh.identity import certificate_identity
from txmesh.pilot.documents import load_istio_documents

if TYPE_CHECKING:
    from txmesh.pilot.service import PilotService

MAX_BODY_BYTES = 1024 * 1024
"""The largest request body the API reads (1 MiB); a larger one gets 413."""

ISTIO_DIR = "istio"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.(yaml|yml)$")
_YAML_TYPES = frozenset({
    "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "application/json", "text/plain",
})

# --- the OpenAPI document --------------------------------------------------------

_ERROR = {"$ref": "#/components/schemas/Error"}
_NULLABLE_STR = {"type": "string", "nullable": True}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json_response(description, _ERROR)


_COMMON_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
}
_PROXY_ID = {
    "name": "proxy", "in": "path", "required": True, "description": "the proxy's node id",
    "schema": {"type": "string"},
}
_FILE_NAME = {
    "name": "name", "in": "path", "required": True,
    "description": "a file name in CONFIG_DIR/istio/, ending .yaml or .yml, with no path separator",
    "schema": {"type": "string", "pattern": _NAME.pattern},
}
_YAML_BODY = {
    "required": True,
    "description": "one or more Istio documents (YAML, several separated by ---); at most 1 MiB",
    "content": {
        "application/yaml": {"schema": {"type": "string"}},
        "text/plain": {"schema": {"type": "string"}},
    },
}


def _view(summary: str, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "operationId": "proxy" + summary.split()[0].capitalize(),
            "parameters": [_PROXY_ID],
            "responses": {
                "200": _json_response("the view", {"type": "array", "items": item}),
                "404": _error("no connected proxy of that id, or nothing pushed to it yet"),
                **_COMMON_ERRORS,
            },
        }
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "txmesh pilot operator API",
        "version": "1",
        "description": (
            "JSON views of the proxies connected to a txmesh pilot, their config, the registry's "
            "services and the pilot's health; validation and changes of the Istio documents in "
            "CONFIG_DIR/istio/. Errors are {\"error\": \"...\"}. When the pilot has a token, every "
            "request needs `Authorization: Bearer <token>`; without one the API only listens on loopback."
        ),
    },
    "servers": [{"url": "http://127.0.0.1:15011"}],
    "security": [{"bearer": []}, {}],
    "paths": {
        "/proxies": {
            "get": {
                "summary": "connected proxies and their sync state",
                "operationId": "listProxies",
                "responses": {
                    "200": _json_response("one entry per connected proxy",
                                          {"type": "array", "items": {"$ref": "#/components/schemas/Proxy"}}),
                    **_COMMON_ERRORS,
                },
            }
        },
        "/proxies/{proxy}/config": {
            "get": {
                "summary": "the whole config document last pushed to a proxy",
                "operationId": "proxyConfig",
                "parameters": [_PROXY_ID],
                "responses": {
                    "200": _json_response("a proxy config document", {"$ref": "#/components/schemas/ConfigDocument"}),
                    "404": _error("no connected proxy of that id, or nothing pushed to it yet"),
                    **_COMMON_ERRORS,
                },
            }
        },
        "/proxies/{proxy}/config/routes": _view("routes of the pushed config, flattened",
                                                {"$ref": "#/components/schemas/RouteView"}),
        "/proxies/{proxy}/config/clusters": _view("clusters of the pushed config, without endpoints",
                                                  {"$ref": "#/components/schemas/ClusterView"}),
        "/proxies/{proxy}/config/endpoints": _view("endpoints of the pushed config, by cluster",
                                                   {"$ref": "#/components/schemas/EndpointView"}),
        "/services": {
            "get": {
                "summary": "the services the registry knows",
                "operationId": "listServices",
                "responses": {
                    "200": _json_response("services by host", {
                        "type": "object", "additionalProperties": {"$ref": "#/components/schemas/Service"}}),
                    **_COMMON_ERRORS,
                },
            }
        },
        "/status": {
            "get": {
                "summary": "the config's and the registry's health",
                "operationId": "status",
                "responses": {
                    "200": _json_response("health", {"$ref": "#/components/schemas/Status"}),
                    **_COMMON_ERRORS,
                },
            }
        },
        "/config/validate": {
            "post": {
                "summary": "validate Istio documents together with those in CONFIG_DIR/istio/; changes nothing",
                "operationId": "validateConfig",
                "parameters": [{
                    "name": "name", "in": "query", "required": False,
                    "description": "validate the body as the file of this name, replacing it",
                    "schema": {"type": "string", "pattern": _NAME.pattern},
                }],
                "requestBody": _YAML_BODY,
                "responses": {
                    "200": _json_response("valid", {"$ref": "#/components/schemas/Valid"}),
                    "400": _error("a bad file name"),
                    "413": _error("the body is larger than 1 MiB"),
                    "415": _error("the body is not YAML"),
                    "422": _json_response("invalid", {"$ref": "#/components/schemas/Invalid"}),
                    **_COMMON_ERRORS,
                },
            }
        },
        "/config/istio/{name}": {
            "put": {
                "summary": "validate a file (replacing any of that name) and, if valid, write it and reload",
                "operationId": "putIstioFile",
                "parameters": [_FILE_NAME],
                "requestBody": _YAML_BODY,
                "responses": {
                    "200": _json_response("written and taken", {
                        "type": "object", "required": ["applied", "generation"],
                        "properties": {"applied": {"type": "string"}, "generation": {"type": "integer"}}}),
                    "400": _error("a bad file name"),
                    "413": _error("the body is larger than 1 MiB"),
                    "415": _error("the body is not YAML"),
                    "422": _json_response("invalid; nothing was written", {"$ref": "#/components/schemas/Invalid"}),
                    **_COMMON_ERRORS,
                },
            },
            "delete": {
                "summary": "remove a file if the documents left are valid, and reload",
                "operationId": "deleteIstioFile",
                "parameters": [_FILE_NAME],
                "responses": {
                    "200": _json_response("removed and taken", {
                        "type": "object", "required": ["deleted", "generation"],
                        "properties": {"deleted": {"type": "string"}, "generation": {"type": "integer"}}}),
                    "400": _error("a bad file name"),
                    "404": _error("no such file"),
                    "422": _json_response("the rest would be invalid; nothing was removed",
                                          {"$ref": "#/components/schemas/Invalid"}),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "operationId": "openapi",
                "responses": {"200": _json_response("OpenAPI 3.0", {"type": "object"}), **_COMMON_ERRORS},
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {
            "Unauthorized": {
                "description": "the pilot has a token and the request did not carry it",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Proxy": {
                "type": "object",
                "required": ["id", "status"],
                "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["SYNCED", "STALE", "NACKED", "NOT SENT"]},
                    "acked_version": _NULLABLE_STR,
                    "pushed_version": _NULLABLE_STR,
                    "nacked_version": _NULLABLE_STR,
                    "last_nack_error": _NULLABLE_STR,
                    "workload": {"type": "string"},
                    "namespace": {"type": "string"},
                    "warnings": {"type": "array", "items": {"type": "string"},
                                 "description": "what the Istio translation could not apply for this proxy"},
                },
            },
            "ConfigDocument": {
                "type": "object",
                "description": "a txmesh proxy config document, as the proxy's loader reads it",
                "properties": {
                    "node": {"type": "object"},
                    "admin": {"type": "object", "properties": {"address": {"type": "string"}}},
                    "listeners": {"type": "array", "items": {"type": "object"}},
                    "clusters": {"type": "array", "items": {"type": "object"}},
                },
            },
            "RouteView": {
                "type": "object",
                "description": "a route with the listener and virtual host it belongs to, and the route's "
                               "own fields (match, cluster or weighted_clusters, timeout, ...)",
                "required": ["listener", "virtual_host", "domains", "name"],
                "properties": {
                    "listener": {"type": "string"},
                    "virtual_host": _NULLABLE_STR,
                    "domains": {"type": "array", "items": {"type": "string"}},
                    "name": _NULLABLE_STR,
                    "match": {"type": "object"},
                    "cluster": {"type": "string"},
                    "weighted_clusters": {"type": "array", "items": {"type": "object"}},
                },
                "additionalProperties": True,
            },
            "ClusterView": {
                "type": "object",
                "description": "a cluster's settings, its endpoints only counted",
                "required": ["name", "lb_policy", "endpoint_count"],
                "properties": {
                    "name": {"type": "string"},
                    "lb_policy": {"type": "string"},
                    "endpoint_count": {"type": "integer"},
                },
                "additionalProperties": True,
            },
            "EndpointView": {
                "type": "object",
                "required": ["cluster", "endpoint", "address", "port", "weight", "labels"],
                "properties": {
                    "cluster": {"type": "string"},
                    "endpoint": {"type": "string", "description": "address:port"},
                    "address": {"type": "string"},
                    "port": {"type": "integer"},
                    "weight": {"type": "integer"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "locality": {"type": "string"},
                },
            },
            "Service": {
                "type": "object",
                "properties": {
                    "ports": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "number": {"type": "integer"},
                                       "protocol": {"type": "string"}}}},
                    "endpoints": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"address": {"type": "string"}, "port": {"type": "integer"},
                                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                       "weight": {"type": "integer"}, "locality": {"type": "string"}}}},
                    "healthy": {"type": "boolean"},
                },
            },
            "Status": {
                "type": "object",
                "properties": {
                    "config": {"type": "object", "properties": {
                        "ok": {"type": "boolean"}, "error": _NULLABLE_STR,
                        "documents": {"type": "integer"}, "generation": {"type": "integer"}}},
                    "mesh": {"type": "object", "properties": {
                        "ok": {"type": "boolean"}, "error": _NULLABLE_STR,
                        "restart_needed": {"type": "array", "items": {"type": "string"}}}},
                    "registry": {"type": "object", "nullable": True},
                    "proxies": {"type": "integer"},
                },
            },
            "Valid": {
                "type": "object",
                "required": ["valid", "warnings"],
                "properties": {"valid": {"type": "boolean", "enum": [True]},
                               "warnings": {"type": "array", "items": {"type": "string"}}},
            },
            "Invalid": {
                "type": "object",
                "required": ["valid", "error"],
                "properties": {"valid": {"type": "boolean", "enum": [False]},
                               "error": {"type": "string", "description": "file: field: reason"}},
            },
        },
    },
}
"""The OpenAPI 3.0 description of the API; C{docs/openapi.json} holds the same."""


def openapi_text() -> str:
    """
    @return: L{OPENAPI} as C{docs/openapi.json} holds it (sorted keys,
        indented, newline-terminated).
    """
    return json.dumps(OPENAPI, indent=2, sort_keys=True) + "\n"


# --- the views of a pushed config ---------------------------------------------------


def route_view(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """
    @param document: a config document (L{Snapshot.document
        <txmesh.pilot.snapshot.Snapshot.document>}).
    @return: every route, with the C{listener}, C{virtual_host} (C{None}
        for a listener's own routes) and C{domains} it belongs to.
    """
    out = []
    for listener in document.get("listeners", []):
        hosts = [(vh.get("name"), list(vh.get("domains", [])), vh.get("routes", []))
                 for vh in listener.get("virtual_hosts", [])]
        if listener.get("routes"):
            hosts.insert(0, (None, ["*"], listener["routes"]))
        for vh_name, domains, routes in hosts:
            for route in routes:
                out.append({"listener": listener.get("name"), "virtual_host": vh_name, "domains": domains,
                            "name": route.get("name"), **route})
    return out


def cluster_view(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """
    @return: every cluster's settings, with C{lb_policy} always given and
        C{endpoint_count} instead of the endpoints.
    """
    out = []
    for cluster in document.get("clusters", []):
        settings = {k: v for k, v in cluster.items() if k != "endpoints"}
        settings.setdefault("lb_policy", "round_robin")
        settings["endpoint_count"] = len(cluster.get("endpoints", []))
        out.append(settings)
    return out


def endpoint_view(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """
    @return: every endpoint of every cluster, as C{address:port} with its
        labels and weight.
    """
    out = []
    for cluster in document.get("clusters", []):
        for e in cluster.get("endpoints", []):
            if isinstance(e, str):
                host, _, port = e.rpartition(":")
                e = {"address": host, "port": int(port)}
            entry = {
                "cluster": cluster.get("name"),
                "endpoint": f"{e['address']}:{e['port']}",
                "address": e["address"],
                "port": e["port"],
                "weight": e.get("weight", 1),
                "labels": dict(e.get("labels", {})),
            }
            if e.get("locality"):
                entry["locality"] = e["locality"]
            out.append(entry)
    return out


_VIEWS: dict[str, Callable[[Mapping[str, Any]], list[dict[str, Any]]]] = {
    "routes": route_view,
    "clusters": cluster_view,
    "endpoints": endpoint_view,
}

# --- validation -------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(self, code: int, body: dict[str, Any], headers: Mapping[bytes, bytes] | None = None):
        super().__init__(body)
        self.code = code
        self.body = body
        self.headers = dict(headers or {})


@attrs.frozen
class ConfigCheck:
    """
    Validates a change to the pilot's Istio documents the way
    L{PilotService.reload <txmesh.pilot.service.PilotService.reload>} would
    take it, without changing anything.

    @ivar pilot: the pilot whose config directory, mesh settings, registry
        and connected proxies are checked against.
    """

    pilot: PilotService

    @property
    def istio_dir(self) -> str:
        """
        @return: C{CONFIG_DIR/istio}.
        """
        return os.path.join(self.pilot.config_dir, ISTIO_DIR)

    def check(self, changes: Mapping[str, bytes | None]) -> list[str]:
        """
        @param changes: file name (in C{istio/}) to its new content, or
            C{None} to leave that file out; a name in angle brackets (e.g.
            C{<request>}) adds documents without replacing a file.
        @return: the translation's warnings.
        @raise ConfigError: the documents, changed so, are invalid.
        """
        return self.pilot.prepare(load_istio_documents(self.istio_dir, changes))[2]


def _write_atomically(directory: str, name: str, content: bytes) -> None:
    os.makedirs(directory, exist_ok=True)
    # A dot file: the pilot's watch skips it until it is renamed.
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


# --- the resource --------------------------------------------------------------------


class OperatorAPI(Resource):
    """
    The operator API (see C{docs/operator-api.md} and L{OPENAPI}).

    @ivar max_body: the largest request body read, in bytes.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, pilot: PilotService, token: str | None = None, max_body: int = MAX_BODY_BYTES,
                 admins: tuple[str, ...] = ()):
        """
        @param pilot: the pilot to show and change.
        @param token: the bearer token every request must carry, or C{None}
            (or empty) for an open API.
        @param max_body: the largest request body read, in bytes.
        """
        super().__init__()
        self._pilot = pilot
        self._token = token.encode("utf-8") if token else None
        self._admins = tuple(admins)
        self._check = ConfigCheck(pilot)
        self.max_body = max_body

    # --- plumbing ---

    def _json(self, request: Any, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"

    def _operator(self, request: Any) -> str | None:
        """
        @return: the SPIFFE ID of the request's verified client certificate
            when it is one of the operators', else C{None}.
        """
        if not self._admins:
            return None
        get = getattr(request.channel.transport, "getPeerCertificate", None) if request.channel else None
        certificate = get() if get is not None else None
        identity = certificate_identity(certificate) if certificate is not None else None
        return identity if identity in self._admins else None

    def _authorize(self, request: Any) -> None:
        if self._operator(request) is not None:
            return
        if self._token is None and self._admins:
            raise _HTTPError(401, {"error": "this pilot needs an operator's client certificate (one of "
                                            f"{', '.join(self._admins)}) or a bearer token"},
                             {b"www-authenticate": b'Bearer realm="txmesh-pilot"'})
        if self._token is None:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise _HTTPError(401, {"error": "this pilot needs a bearer token (Authorization: Bearer <token>)"},
                             {b"www-authenticate": b'Bearer realm="txmesh-pilot"'})
        if not hmac.compare_digest(given.strip(), self._token):
            raise _HTTPError(401, {"error": "the bearer token is not this pilot's"},
                             {b"www-authenticate": b'Bearer realm="txmesh-pilot", error="invalid_token"'})

    def _body(self, request: Any) -> bytes:
        if getattr(request, "body_too_large", False):
            raise self._too_large()
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type and content_type not in _YAML_TYPES and not content_type.startswith("text/"):
            raise _HTTPError(415, {"error": f"the body must be YAML (application/yaml or text/*), not {content_type}"})
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        data = content.read(self.max_body + 1)
        if len(data) > self.max_body:
            raise self._too_large()
        return data

    def _too_large(self) -> _HTTPError:
        return _HTTPError(413, {"error": f"the body is larger than {self.max_body} bytes"})

    def render(self, request: Any) -> bytes:
        """
        Authorize, route and answer a request, always with JSON.
        """
        method = request.method.decode("ascii", "replace")
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        try:
            self._authorize(request)
            handler, args, allowed = self._route(path, method)
            if handler is None:
                if allowed:
                    raise _HTTPError(405, {"error": f"{method} is not allowed here (only {', '.join(allowed)})"},
                                     {b"allow": ", ".join(allowed).encode()})
                raise _HTTPError(404, {"error": "not found (see /openapi.json)"})
            code, body = handler(request, *args)
        except _HTTPError as e:
            for key, value in e.headers.items():
                request.setHeader(key, value)
            return self._json(request, e.code, e.body)
        except Exception:
            # Still JSON, and no traceback to the client; the log has it.
            self.log.failure("operator API: {method} {path} failed", method=method, path="/".join(path))
            return self._json(request, 500, {"error": "internal error; the pilot's log has the details"})
        return self._json(request, code, body)

    def _route(self, path: list[str], method: str) -> tuple[Any, tuple[str, ...], list[str]]:
        routes: dict[str, Callable[..., tuple[int, Any]]] = {}
        args: tuple[str, ...] = ()
        match path:
            case ["proxies"]:
                routes = {"GET": self._proxies}
            case ["proxies", proxy, "config"]:
                routes, args = {"GET": self._config}, (proxy, "")
            case ["proxies", proxy, "config", view] if view in _VIEWS:
                routes, args = {"GET": self._config}, (proxy, view)
            case ["services"]:
                routes = {"GET": lambda request: (200, self._pilot.services())}
            case ["status"]:
                routes = {"GET": lambda request: (200, self._pilot.status())}
            case ["openapi.json"]:
                routes = {"GET": lambda request: (200, OPENAPI)}
            case ["config", "validate"]:
                routes = {"POST": self._validate}
            case ["config", "istio", name]:
                routes, args = {"PUT": self._put, "DELETE": self._delete}, (name,)
            case ["config", "istio", *_]:
                raise _HTTPError(400, {"error": "a file name must not contain a path separator"})
        if method == "HEAD" and "GET" in routes:
            method = "GET"
        return routes.get(method), args, sorted(routes)

    # --- handlers ---

    def _proxies(self, request: Any) -> tuple[int, Any]:
        by_id = {c.node.id: c for c in list(self._pilot.channels) if c.node is not None}
        proxies = self._pilot.proxies()
        for entry in proxies:
            channel = by_id.get(entry.get("id"))
            if channel is not None:
                entry.setdefault("workload", channel.node.workload)
                entry.setdefault("namespace", channel.node.namespace)
                snapshot = channel.snapshot
                entry.setdefault("warnings", list(snapshot.warnings) if snapshot is not None else [])
        return 200, proxies

    def _config(self, request: Any, proxy: str, view: str) -> tuple[int, Any]:
        for channel in list(self._pilot.channels):
            if channel.node is not None and channel.node.id == proxy:
                if channel.snapshot is None:
                    raise _HTTPError(404, {"error": f"nothing pushed to {proxy} yet"})
                document = channel.snapshot.document()
                return 200, (_VIEWS[view](document) if view else document)
        raise _HTTPError(404, {"error": f"no connected proxy {proxy}"})

    def _checked(self, changes: Mapping[str, bytes | None]) -> list[str]:
        try:
            return self._check.check(changes)
        except ConfigError as e:
            raise _HTTPError(422, {"valid": False, "error": str(e)}) from None

    def _validate(self, request: Any) -> tuple[int, Any]:
        names = request.args.get(b"name")
        body = self._body(request)
        if names:
            name = _file_name(names[0].decode("utf-8", "replace"))
        else:
            name = "<request>"  # not a valid file name, so it replaces nothing
        warnings = self._checked({name: body})
        return 200, {"valid": True, "warnings": warnings}

    def _put(self, request: Any, name: str) -> tuple[int, Any]:
        name = _file_name(name)
        body = self._body(request)
        self._checked({name: body})
        directory = self._check.istio_dir
        path = os.path.join(directory, name)
        previous = _read(path)
        _write_atomically(directory, name, body)
        self.log.info("operator API wrote {path}", path=path)
        return self._reload(name, previous, {"applied": name})

    def _delete(self, request: Any, name: str) -> tuple[int, Any]:
        name = _file_name(name)
        directory = self._check.istio_dir
        path = os.path.join(directory, name)
        previous = _read(path)
        if previous is None:
            raise _HTTPError(404, {"error": f"no file {name} in {directory}"})
        self._checked({name: None})
        os.remove(path)
        self.log.info("operator API removed {path}", path=path)
        return self._reload(name, previous, {"deleted": name})

    def _reload(self, name: str, previous: bytes | None, answer: dict[str, Any]) -> tuple[int, Any]:
        if self._pilot.reload():
            return 200, {**answer, "generation": self._pilot.config_version}
        # Checked just before, so rare (a file changed meanwhile); put things back.
        error = self._pilot.config_error or "the pilot refused the config"
        directory = self._check.istio_dir
        if previous is None:
            os.remove(os.path.join(directory, name))
        else:
            _write_atomically(directory, name, previous)
        self._pilot.reload()
        raise _HTTPError(422, {"valid": False, "error": error})


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _file_name(name: str) -> str:
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise _HTTPError(400, {"error": f"{name!r}: a file name must not contain a path separator"})
    if not _NAME.match(name):
        raise _HTTPError(400, {"error": f"{name!r}: a file name must end .yaml or .yml (letters, digits, . _ -)"})
    return name


# --- the site -----------------------------------------------------------------------


class OperatorRequest(Request):
    """
    A request that stops keeping its body past L{MAX_BODY_BYTES}, so a huge
    upload costs no memory or disk before it is answered 413.

    @ivar body_too_large: whether the body was (or was announced) larger.
    """

    max_body = MAX_BODY_BYTES
    body_too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)


# The interface argument of each endpoint type, by position after the type
# and by keyword, and its default (all interfaces).
_INTERFACE_ARG = {"tcp": (2, "0.0.0.0"), "tcp6": (3, "::"), "ssl": (5, "0.0.0.0")}


def loopback_only(listen: str) -> tuple[bool, str]:
    """
    Tell whether a server endpoint string binds only to loopback
    (127.0.0.0/8 or ::1), or to a UNIX socket.

    @param listen: a Twisted server endpoint string, e.g.
        C{tcp:15011:interface=127.0.0.1}.
    @return: C{(True, "")}, or C{(False, why not)}.
    """
    try:
        # Twisted's own tokenizer, so escapes (interface=\:\:1) read as serverFromString reads them.
        args, kwargs = endpoints._parse(listen)
    except Exception as e:  # anything it cannot parse is not proven loopback
        return False, f"{listen} is not an endpoint string ({e})"
    kind = str(args[0]).lower() if args else ""
    if kind == "unix":
        return True, ""
    if kind not in _INTERFACE_ARG:
        return False, f"{listen}: cannot tell whether a {kind or 'typeless'} endpoint binds only to loopback"
    position, everywhere = _INTERFACE_ARG[kind]
    interface = kwargs.get("interface", args[position] if len(args) > position else "")
    if not interface:
        return False, f"{listen} has no interface=, so it listens on all interfaces ({everywhere})"
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return False, f"{listen}: interface {interface!r} is not an IP address"
    if not address.is_loopback:
        return False, f"{listen} listens on {interface}, which is not loopback (127.0.0.0/8 or ::1)"
    return True, ""


def operator_site(pilot: PilotService, listen: str, token: str | None, admins: tuple[str, ...] = ()) -> Site:
    """
    Build the operator API's site.

    @param pilot: the pilot to serve.
    @param listen: the server endpoint string the site will listen on (only
        checked here, not listened on).
    @param token: the bearer token every request must carry, or C{None}
        (an empty string is the same) for an open API.
    @param admins: SPIFFE IDs of operators whose client certificate (over
        TLS, verified against the mesh trust bundle by the caller's TLS
        options) is enough without the token.
    @return: a L{Site} serving L{OperatorAPI}.
    @raise ValueError: C{token} is missing and C{listen} does not bind only
        to loopback (the reason says why, e.g. no C{interface=}).
    """
    if not token and not admins:
        ok, why = loopback_only(listen)
        if not ok:
            raise ValueError(f"operator API without a token must listen on loopback only: {why}; "
                             f"give it a token, operators' certificates, or an interface=127.0.0.1")
    site = Site(OperatorAPI(pilot, token, admins=tuple(admins)))
    site.requestFactory = OperatorRequest
    return site
