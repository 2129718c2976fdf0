"""
The C{txmesh} command: operator tools.

    txmesh validate [-f] FILE...      check proxy config files and Istio documents offline,
                                      printing warnings; exit 1 if any is invalid
    txmesh proxy-status               the sync state of every proxy connected to the pilot
    txmesh proxy-config {routes,clusters,endpoints} PROXY
                                      one view of the config the pilot pushed to a proxy
    txmesh services                   the services the pilot's registry knows
    txmesh apply -f FILE [--name NAME]
                                      validate Istio documents at the pilot and, if valid,
                                      make them its istio/NAME (default: FILE's base name)
    txmesh cert create --config-dir DIR --spiffe-id ID --out DIR
                                      a key and certificate from the mesh CA (an operator's)
    txmesh ca rotate --config-dir DIR  a new mesh root; the old one stays trusted (overlap)
    txmesh ca finish-rotation --config-dir DIR
                                      stop trusting the previous roots
    txmesh token create --config-dir DIR --namespace NS --service-account SA [--ttl 24h]
                                      a join token for a proxy (run on the pilot's host:
                                      it signs with the key in DIR/ca)
    txmesh token rotate-key --config-dir DIR
                                      a new join-token key; the old one still verifies (overlap)
    txmesh token finish-key-rotation --config-dir DIR
                                      stop accepting tokens signed by the previous keys
    txmesh kube-inject -f FILE [-o OUT] [--pilot ADDRESS] [--image IMAGE] [--proxy-uid UID]
                       [--native-sidecar {auto,always,never}]
                                      add the txmesh sidecar to Kubernetes YAML (offline)
    txmesh iptables [-u UID] [-b PORTS] [-x CIDRS] ... [--apply | --clean] [--dry-run]
                                      print (default), apply or remove the transparent
                                      capture rules (docs/capture.md)

The commands but C{validate}, C{kube-inject}, C{iptables} and C{token} ask the pilot's operator API
(C{docs/operator-api.md}) at C{--pilot URL} (default C{$TXMESH_PILOT} or C{http://127.0.0.1:15011}) with
C{--token} (default C{$TXMESH_TOKEN}); any failure is one line on stderr and
exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import attrs
import treq
import yaml
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, task
from twisted.internet.error import TimeoutError as ConnectTimeout

from txmesh.config.durations import parse_duration
from txmesh.config.errors import ConfigError
from txmesh.config.istio import translate
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry


def _is_istio(path: str) -> bool:
    """
    @return: whether C{path} holds Istio resources (any document with an
        C{apiVersion} of C{networking.istio.io}) rather than a proxy config.
    """
    try:
        with open(path, "rb") as f:
            docs = list(yaml.safe_load_all(f))
    except (OSError, yaml.YAMLError):
        return False  # the proxy loader reports it, with file and reason
    return any(isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("networking.istio.io")
               for d in docs)


def _validate_istio(paths: Sequence[str], out: Any, err: Any) -> int:
    """
    Translate Istio documents together, as a proxy would load them (a
    VirtualService in one file may use a DestinationRule in another).
    """
    documents = []
    for path in paths:
        with open(path, "rb") as f:
            for number, doc in enumerate(yaml.safe_load_all(f), start=1):
                if doc is not None:
                    documents.append((path, number, doc))
    try:
        result = translate(documents)
    except ConfigError as e:
        err.write(f"invalid: {e}\n")
        return 1
    out.write(f"valid: {', '.join(paths)}: {len(result.virtual_hosts)} virtual host(s), "
              f"{len(result.clusters)} cluster(s)\n")
    for warning in result.warnings:
        out.write(f"  warning: {warning}\n")
    return 0


def validate(paths: Sequence[str], out: Any = sys.stdout, err: Any = sys.stderr) -> int:
    """
    Check each file as txmesh-proxy would load it: proxy configs one by
    one, Istio documents together.

    @return: 0 if all are valid, 1 otherwise (each error is printed with its
        file, field and reason).
    """
    istio = [p for p in paths if _is_istio(p)]
    status = _validate_istio(istio, out, err) if istio else 0
    loader = ConfigLoader(FilterRegistry.from_plugins())
    for path in paths:
        if path in istio:
            continue
        try:
            config = loader.load_file(path)
        except ConfigError as e:
            err.write(f"invalid: {e}\n")
            status = 1
        else:
            out.write(f"valid: {path}: {len(config.listeners)} listener(s), {len(config.clusters)} cluster(s)\n")
            for warning in config.warnings:
                out.write(f"  warning: {warning}\n")
    return status


# --- talking to the pilot's operator API ------------------------------------------

DEFAULT_PILOT = "http://127.0.0.1:15011"
DEFAULT_TIMEOUT = 10.0
_TIMED_OUT = (defer.CancelledError, ConnectTimeout)


class PilotAPIError(Exception):
    """
    The pilot could not be asked, or refused the request; the message is one
    line for the operator.

    @ivar code: the HTTP status the pilot answered, or C{None} if it did not.
    @ivar error: the API's own C{error} text, or C{""}.
    """

    def __init__(self, message: str, code: int | None = None, error: str = ""):
        super().__init__(message)
        self.code = code
        self.error = error


@attrs.frozen
class PilotClient:
    """
    A client of the pilot's operator API.

    @ivar url: the API's base URL, e.g. C{http://127.0.0.1:15011}.
    @ivar token: the bearer token, or C{None}.
    @ivar timeout: seconds to wait for an answer.
    @ivar http: a treq-like object (C{get(url, headers=, timeout=)}); by
        default the C{treq} module.
    @ivar agent: the L{twisted.web.client.Agent} for an C{https} API (with
        the mesh root and an operator's client certificate), or C{None}.
    """

    url: str
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    http: Any = None
    agent: Any = None

    def get(self, path: str) -> defer.Deferred:
        """
        C{GET} a path of the API.

        @param path: the path, starting with C{/}, already quoted.
        @return: a L{Deferred} firing with the decoded JSON body.
        @raise PilotAPIError: (as the Deferred's failure) the pilot cannot be
            reached in time, refuses the token, or answers anything but 200.
        """
        return self._request("GET", path)

    def put(self, path: str, body: bytes, content_type: bytes = b"application/yaml") -> defer.Deferred:
        """
        C{PUT} a body to a path of the API.

        @param path: the path, starting with C{/}, already quoted.
        @param body: the request body.
        @param content_type: its C{content-type}.
        @return: a L{Deferred} firing with the decoded JSON body.
        @raise PilotAPIError: as L{get}; for a refused change (C{422}) its
            C{error} is the pilot's reason.
        """
        return self._request("PUT", path, body, content_type)

    @defer.inlineCallbacks
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: bytes | None = None) -> Any:
        http = self.http if self.http is not None else treq
        headers = {b"accept": [b"application/json"]}
        if self.token:
            headers[b"authorization"] = [b"Bearer " + self.token.encode("utf-8")]
        if content_type is not None:
            headers[b"content-type"] = [content_type]
        url = self.url.rstrip("/") + path
        extra = {"agent": self.agent} if self.agent is not None else {}
        try:
            if method == "GET":
                response = yield http.get(url, headers=headers, timeout=self.timeout, **extra)
            else:
                response = yield http.request(method, url, data=body, headers=headers, timeout=self.timeout,
                                              **extra)
            content = yield response.content()
        except Exception as e:  # any transport failure means the same to the operator
            raise PilotAPIError(f"cannot reach the pilot at {self.url}: {_reason(e, self.timeout)}") from None
        try:
            data = json.loads(content)
        except ValueError:
            raise PilotAPIError(f"the pilot at {self.url} answered {response.code} with a body that is not JSON "
                                f"(is {self.url} the pilot's operator API?)", response.code) from None
        if response.code == 200:
            return data
        error = data.get("error", "") if isinstance(data, dict) else ""
        error = error if isinstance(error, str) else str(error)
        if response.code == 401:
            hint = "the token was refused" if self.token else "it needs a token (--token or TXMESH_TOKEN)"
            if "certificate" in error:
                hint = error  # the pilot also takes operators' client certificates (--cert, --key)
            raise PilotAPIError(f"the pilot at {self.url} refused the request: {hint}", 401, error)
        raise PilotAPIError(f"{error or 'error'} ({response.code} from {url})", response.code, error)


def _reason(e: BaseException, timeout: float) -> str:
    # treq's ResponseFailed and friends carry the real causes as Failures.
    reasons = getattr(e, "reasons", None) or []
    if isinstance(e, _TIMED_OUT) or any(r.check(*_TIMED_OUT) for r in reasons):
        return f"no answer in {timeout:g}s"
    text = "; ".join(r.getErrorMessage() for r in reasons) if reasons else str(e)
    return " ".join(text.split()) or type(e).__name__


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(headers)] + [["-" if c is None or c == "" else " ".join(str(c).split()) for c in row]
                               for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "".join("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in cells)


def _remote(fetch: Callable[[], defer.Deferred], render: Callable[[Any], str], output: str,
            out: Any, err: Any) -> defer.Deferred:
    def shown(data: Any) -> int:
        out.write(json.dumps(data, indent=2, sort_keys=True) + "\n" if output == "json" else render(data))
        return 0

    def failed(failure: Any) -> int:
        failure.trap(PilotAPIError)
        err.write(f"txmesh: {failure.value}\n")
        return 1

    d = defer.maybeDeferred(fetch)
    d.addCallbacks(shown, failed)
    return d


def _status_table(proxies: Sequence[Mapping[str, Any]]) -> str:
    return _table(["NAME", "STATUS", "ACKED VERSION", "PUSHED VERSION", "LAST ERROR"], [
        [p.get("id"), p.get("status"), p.get("acked_version"), p.get("pushed_version"),
         p.get("last_nack_error") if p.get("status") == "NACKED" else None]
        for p in proxies
    ])


def proxy_status(client: PilotClient, out: Any = sys.stdout, err: Any = sys.stderr,
                 output: str = "table") -> defer.Deferred:
    """
    Print every connected proxy's sync state (C{GET /proxies}).

    @param output: C{table} or C{json}.
    @return: a L{Deferred} firing with the exit code: 0, or 1 if the pilot
        could not be asked (the reason printed on C{err}).
    """
    return _remote(lambda: client.get("/proxies"), _status_table, output, out, err)


def _match(route: Mapping[str, Any]) -> str:
    match = route.get("match") or {}
    if "path" in match:
        text = match["path"]
    elif "regex" in match:
        text = f"~{match['regex']}"
    else:
        text = f"{match.get('prefix', '/')}*"
    extra = [f"{h['name']}" for h in match.get("headers", [])]
    if match.get("methods"):
        extra.insert(0, "|".join(match["methods"]))
    return f"{text} [{', '.join(extra)}]" if extra else text


def _destination(route: Mapping[str, Any]) -> str:
    if "cluster" in route:
        return route["cluster"] + (f" ({route['subset']})" if route.get("subset") else "")
    if "weighted_clusters" in route:
        return ", ".join(f"{d['cluster']}{' (' + d['subset'] + ')' if d.get('subset') else ''} {d['weight']}%"
                         for d in route["weighted_clusters"])
    if "direct_response" in route:
        return f"direct response {route['direct_response'].get('status')}"
    if "redirect" in route:
        return f"redirect {route['redirect'].get('code', '')}".strip()
    return ""


def _routes_table(routes: Sequence[Mapping[str, Any]]) -> str:
    return _table(["LISTENER", "VIRTUAL HOST", "DOMAINS", "MATCH", "DESTINATION", "TIMEOUT"], [
        [r.get("listener"), r.get("virtual_host"), ",".join(r.get("domains", [])), _match(r), _destination(r),
         r.get("timeout")]
        for r in routes
    ])


def _clusters_table(clusters: Sequence[Mapping[str, Any]]) -> str:
    return _table(["NAME", "LB POLICY", "ENDPOINTS", "SUBSETS", "CONNECT TIMEOUT"], [
        [c.get("name"), c.get("lb_policy"), c.get("endpoint_count"),
         ",".join(s["name"] for s in c.get("subsets", [])), c.get("connect_timeout")]
        for c in clusters
    ])


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _endpoints_table(endpoints: Sequence[Mapping[str, Any]]) -> str:
    return _table(["ENDPOINT", "CLUSTER", "WEIGHT", "LOCALITY", "LABELS"], [
        [e.get("endpoint"), e.get("cluster"), e.get("weight"), e.get("locality"), _labels(e.get("labels", {}))]
        for e in endpoints
    ])


PROXY_CONFIG_VIEWS: dict[str, Callable[[Any], str]] = {
    "routes": _routes_table,
    "clusters": _clusters_table,
    "endpoints": _endpoints_table,
}


def proxy_config(client: PilotClient, view: str, proxy: str, out: Any = sys.stdout, err: Any = sys.stderr,
                 output: str = "table") -> defer.Deferred:
    """
    Print one view of the config the pilot last pushed to a proxy
    (C{GET /proxies/<id>/config/<view>}).

    @param view: C{routes}, C{clusters} or C{endpoints}.
    @param proxy: the proxy's node id.
    @param output: C{table} or C{json}.
    @return: a L{Deferred} firing with the exit code: 0, or 1 (no such
        proxy, or the pilot could not be asked; the reason printed on C{err}).
    """
    path = f"/proxies/{quote(proxy, safe='')}/config/{view}"
    return _remote(lambda: client.get(path), PROXY_CONFIG_VIEWS[view], output, out, err)


def _services_table(services: Mapping[str, Mapping[str, Any]]) -> str:
    return _table(["HOST", "PORTS", "ENDPOINTS", "ADDRESSES"], [
        [host,
         ",".join(f"{p.get('number')}/{p.get('protocol')}" for p in svc.get("ports", [])),
         len(svc.get("endpoints", [])),
         ",".join(f"{e.get('address')}:{e.get('port')}" for e in svc.get("endpoints", []))]
        for host, svc in sorted(services.items())
    ])


def services(client: PilotClient, out: Any = sys.stdout, err: Any = sys.stderr,
             output: str = "table") -> defer.Deferred:
    """
    Print the services the pilot's registry knows (C{GET /services}).

    @param output: C{table} or C{json}.
    @return: a L{Deferred} firing with the exit code: 0, or 1 if the pilot
        could not be asked (the reason printed on C{err}).
    """
    return _remote(lambda: client.get("/services"), _services_table, output, out, err)


def apply(client: PilotClient, path: str, name: str | None = None, out: Any = sys.stdout, err: Any = sys.stderr,
          output: str = "table") -> defer.Deferred:
    """
    Validate the Istio documents in a file at the pilot and, if they are
    valid, make them the pilot's C{istio/<name>} (C{PUT /config/istio/<name>}):
    the pilot writes the file, reloads and pushes the change to its proxies.

    @param path: the file to send.
    @param name: the file name at the pilot; by default C{path}'s base name.
    @param output: C{table} (one line) or C{json} (the API's answer).
    @return: a L{Deferred} firing with the exit code: 0 applied; 1 refused
        (the pilot's reason printed on C{err}, nothing changed) or the pilot
        could not be asked.
    """
    target = name or os.path.basename(path)
    try:
        with open(path, "rb") as f:
            body = f.read()
    except OSError as e:
        err.write(f"txmesh apply: {path}: {e.strerror or e}\n")
        return defer.succeed(1)

    def shown(data: Any) -> int:
        if output == "json":
            out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            out.write(f"applied {path} as {data.get('applied', target)} "
                      f"(pilot config generation {data.get('generation', '?')})\n")
        return 0

    def failed(failure: Any) -> int:
        failure.trap(PilotAPIError)
        e = failure.value
        if e.code == 422 and e.error:
            err.write(f"txmesh apply: refused, nothing changed: {e.error}\n")
        else:
            err.write(f"txmesh: {e}\n")
        return 1

    d = defer.maybeDeferred(client.put, f"/config/istio/{quote(target, safe='')}", body)
    d.addCallbacks(shown, failed)
    return d


def _run(command: Callable[[], defer.Deferred]) -> int:
    """
    Run a command returning a L{Deferred} of an exit code on the global
    reactor, synchronously.
    """
    codes: list[int] = []

    def go(reactor: Any) -> defer.Deferred:
        return command().addCallback(codes.append)

    try:
        task.react(go)
    except SystemExit:
        pass
    return codes[0] if codes else 1


def token_create(ca_dir: str, namespace: str, service_account: str, ttl: float, now: float,
                 out: Any = sys.stdout, err: Any = sys.stderr) -> int:
    """
    Print a join token for a proxy of C{namespace}, signed with the key in
    the pilot's CA directory (created there if missing).

    @param ttl: seconds the token is valid.
    @param now: the current time (POSIX seconds).
    @return: the exit code.
    """
    from txmesh.pilot.channel_security import token_authority
    from txmesh.pilot.tokens import TokenKeyError

    try:
        token = token_authority(ca_dir).create(namespace, service_account, now, ttl)
    except (TokenKeyError, OSError, ValueError) as e:
        err.write(f"txmesh token create: {e}\n")
        return 1
    out.write(token + "\n")
    return 0


def token_key_command(command: str, ca_dir: str, out: Any = sys.stdout, err: Any = sys.stderr) -> int:
    """
    C{txmesh token rotate-key} and C{txmesh token finish-key-rotation}:
    change the join-token key files in the pilot's CA directory; a running
    pilot takes the change at the next join token it checks.

    @param command: C{"rotate-key"} or C{"finish-key-rotation"}.
    @return: the exit code.
    """
    from txmesh.pilot.channel_security import PREVIOUS_TOKEN_KEYS_FILE, TOKEN_KEY_FILE
    from txmesh.pilot.tokens import TokenKeyError, finish_key_rotation, rotate_key

    previous_path = os.path.join(ca_dir, PREVIOUS_TOKEN_KEYS_FILE)
    try:
        if command == "rotate-key":
            os.makedirs(ca_dir, mode=0o700, exist_ok=True)
            kid, previous = rotate_key(os.path.join(ca_dir, TOKEN_KEY_FILE), previous_path)
            out.write(f"new token key {kid} in {ca_dir}; tokens signed by {', '.join(previous)} accepted "
                      "until 'txmesh token finish-key-rotation'\n")
        else:
            dropped = finish_key_rotation(previous_path)
            if dropped:
                out.write(f"stopped accepting tokens signed by {', '.join(dropped)}\n")
            else:
                out.write("no key rotation in progress: nothing to finish\n")
    except (TokenKeyError, OSError) as e:
        err.write(f"txmesh token {command}: {e}\n")
        return 1
    return 0


def ca_command(command: str, config_dir: str, ca_dir: str | None, trust_domain: str | None, now: float,
               out: Any = sys.stdout, err: Any = sys.stderr) -> int:
    """
    C{txmesh ca rotate} and C{txmesh ca finish-rotation}: change the CA
    directory; a running pilot notices, reloads, and pushes the new trust
    bundle to every proxy.

    @return: the exit code.
    """
    from datetime import datetime, timezone

    from txmesh.config.errors import ConfigError
    from txmesh.pilot.ca import CAError, CertificateAuthority
    from txmesh.pilot.channel_security import ca_directory
    from txmesh.pilot.mesh_config import load_pilot_settings

    directory = ca_dir or ca_directory(config_dir)
    try:
        if command == "rotate":
            domain = trust_domain or load_pilot_settings(config_dir).mesh.trust_domain
            ca = CertificateAuthority.rotate_root(directory, domain, datetime.fromtimestamp(now, timezone.utc))
            out.write(f"new root {ca.root.subject.rfc4514_string()} in {directory}; "
                      f"{len(ca.previous_roots)} previous root(s) trusted until 'txmesh ca finish-rotation'\n")
        else:
            dropped = CertificateAuthority.finish_rotation(directory)
            out.write(f"stopped trusting {dropped} previous root(s)\n")
    except (CAError, ConfigError, ValueError) as e:
        err.write(f"txmesh ca {command}: {e}\n")
        return 1
    return 0


def operator_agent(cacert: str, cert: str | None, key: str | None) -> Any:
    """
    @return: an L{Agent} for an C{https} operator API: the pilot's
        certificate must chain to C{cacert} and name the host; with C{cert}
        and C{key}, the operator presents that client certificate.
    @raise OSError: a file cannot be read.
    @raise ValueError: a file is not PEM, or C{cert} without C{key}.
    """
    from twisted.internet import reactor
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS, trustRootFromCertificates
    from twisted.web.client import Agent
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    from txmesh.proxy.tls import load_certificates

    with open(cacert, "rb") as f:
        roots = [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in load_certificates(f.read(), "cacert")]
    client = None
    if cert or key:
        if not (cert and key):
            raise ValueError("give both --cert and --key")
        with open(cert, "rb") as f, open(key, "rb") as g:
            client = PrivateCertificate.loadPEM(g.read() + f.read())

    @implementer(IPolicyForHTTPS)
    class _Policy:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return optionsForClientTLS(hostname.decode("ascii"), trustRootFromCertificates(roots),
                                       clientCertificate=client)

    return Agent(reactor, contextFactory=_Policy())


def cert_create(ca_dir: str, trust_domain: str, spiffe_id: str, out_dir: str, ttl: float, now: float,
                out: Any = sys.stdout, err: Any = sys.stderr) -> int:
    """
    C{txmesh cert create}: a certificate from the mesh CA for a person or a
    tool (an operator of the pilot's API, say), with its key made here.

    @return: the exit code.
    """
    from datetime import datetime, timedelta, timezone

    from txmesh.pilot.ca import CAError, CertificateAuthority
    from txmesh.proxy.workload_identity import WorkloadIdentity

    when = datetime.fromtimestamp(now, timezone.utc)
    try:
        ca = CertificateAuthority.load_or_create(ca_dir, trust_domain, when)
        identity = WorkloadIdentity(spiffe_id, out_dir)
        chain = ca.sign_csr(identity.new_request(), spiffe_id, when, timedelta(seconds=ttl))
        identity.install(chain, ca.trust_bundle_pem, now)
    except (CAError, OSError, ValueError) as e:
        err.write(f"txmesh cert create: {e}\n")
        return 1
    out.write(f"{spiffe_id}: {out_dir}/cert-chain.pem, {out_dir}/key.pem (0600), {out_dir}/root-cert.pem\n")
    return 0


def kube_inject(path: str, output: str | None, pilot: str, image: str, proxy_uid: int,
                out: Any = sys.stdout, err: Any = sys.stderr, stdin: Any = None, native_sidecar: str = "auto") -> int:
    """
    C{txmesh kube-inject}: add the txmesh sidecar to every pod template of a
    YAML file (L{txmesh.kube_inject}); other documents pass through.

    @param path: the file, or C{-} for C{stdin} (default C{sys.stdin}).
    @param output: the file to write, or C{None} for C{out}.
    @param native_sidecar: C{auto}, C{always} or C{never}
        (L{txmesh.kube_inject.InjectOptions.native_sidecar}).
    @return: the exit code: 0, or 1 with one line on C{err} naming the
        document and field (and nothing written). A pod that runs to
        completion with an ordinary sidecar container gets a warning line
        on C{err}, and the exit code stays 0.
    """
    from txmesh.kube_inject import InjectError, InjectOptions, inject_yaml

    warnings: list[str] = []
    try:
        options = InjectOptions(pilot=pilot, image=image, proxy_uid=proxy_uid, native_sidecar=native_sidecar)
        if path == "-":
            text = (sys.stdin if stdin is None else stdin).read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        result = inject_yaml(text, options, warnings)
        if output is None:
            out.write(result)
        else:
            with open(output, "w", encoding="utf-8") as f:
                f.write(result)
    except InjectError as e:
        err.write(f"txmesh kube-inject: {path}: {e}\n")
        return 1
    except OSError as e:
        err.write(f"txmesh kube-inject: {e.filename or path}: {e.strerror or e}\n")
        return 1
    except ValueError as e:  # the options (InjectOptions names the field)
        err.write(f"txmesh kube-inject: {e}\n")
        return 1
    for warning in warnings:
        err.write(f"txmesh kube-inject: warning: {path}: {warning}\n")
    return 0


def iptables(args: argparse.Namespace) -> int:
    """
    C{txmesh iptables}: print, apply (all or nothing) or clean the
    transparent capture rules (L{txmesh.capture}).

    @param args: the parsed C{iptables} options.
    @return: the exit code: 0, 1 if applying or cleaning failed, 2 for an
        invalid option.
    """
    from txmesh.capture.command import main as capture_main

    return capture_main(args)


# --- the command line ---------------------------------------------------------------


def parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """
    @param environ: where C{TXMESH_PILOT} and C{TXMESH_TOKEN} are read
        (default C{os.environ}).
    @return: the C{txmesh} argument parser.
    """
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="txmesh", description="txmesh operator tools")
    p.add_argument("--pilot", metavar="URL", default=environ.get("TXMESH_PILOT") or DEFAULT_PILOT,
                   help=f"the pilot's operator API (default: $TXMESH_PILOT or {DEFAULT_PILOT})")
    p.add_argument("--token", metavar="TOKEN", default=environ.get("TXMESH_TOKEN") or None,
                   help="bearer token of the operator API (default: $TXMESH_TOKEN)")
    p.add_argument("--cacert", metavar="FILE", default=environ.get("TXMESH_CACERT") or None,
                   help="for an https pilot: the mesh root to trust (default: $TXMESH_CACERT)")
    p.add_argument("--cert", metavar="FILE", default=environ.get("TXMESH_CERT") or None,
                   help="an operator's client certificate (txmesh cert create), PEM (default: $TXMESH_CERT)")
    p.add_argument("--key", metavar="FILE", default=environ.get("TXMESH_KEY") or None,
                   help="its private key, PEM (default: $TXMESH_KEY)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=DEFAULT_TIMEOUT,
                   help=f"how long to wait for the pilot (default: {DEFAULT_TIMEOUT:g})")
    commands = p.add_subparsers(dest="command", required=True)
    v = commands.add_parser("validate", help="check proxy configs and Istio documents offline "
                                             "(file, field and reason on error)")
    v.add_argument("-f", "--file", action="append", default=[], metavar="FILE", dest="flagged",
                   help="a file to check (repeatable)")
    v.add_argument("files", nargs="*", metavar="FILE")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="table (default) or json")
    commands.add_parser("proxy-status", parents=[output],
                        help="the sync state of every proxy connected to the pilot")
    c = commands.add_parser("proxy-config", parents=[output],
                            help="one view of the config the pilot last pushed to a proxy")
    c.add_argument("view", choices=sorted(PROXY_CONFIG_VIEWS))
    c.add_argument("proxy", metavar="PROXY", help="the proxy's node id (see proxy-status)")
    commands.add_parser("services", parents=[output], help="the services the pilot's registry knows")
    a = commands.add_parser("apply", parents=[output],
                            help="validate Istio documents at the pilot and, if valid, apply them "
                                 "(PUT /config/istio/NAME)")
    a.add_argument("-f", "--file", required=True, metavar="FILE", help="the YAML file of Istio documents")
    a.add_argument("--name", metavar="NAME",
                   help="the file it becomes in the pilot's istio/ directory (default: FILE's base name); "
                        "naming an existing file replaces it")
    ca = commands.add_parser("ca", help="the mesh CA (on the pilot's host; the pilot picks changes up)")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True)
    for name, text in (("rotate", "make a new root; the old one stays trusted until finish-rotation"),
                       ("finish-rotation", "stop trusting the roots a rotation kept")):
        cp = ca_commands.add_parser(name, help=text)
        cp.add_argument("--config-dir", required=True, metavar="DIR", help="the pilot's config directory")
        cp.add_argument("--ca-dir", metavar="DIR", help="the pilot's --ca-dir, if not DIR/ca")
        cp.add_argument("--trust-domain", default=None, help="default: the pilot's mesh.yaml, or cluster.local")
    cert = commands.add_parser("cert", help="certificates from the mesh CA (on the pilot's host)")
    cert_commands = cert.add_subparsers(dest="cert_command", required=True)
    cc = cert_commands.add_parser("create", help="a key and certificate for a SPIFFE ID (an operator's, say)")
    cc.add_argument("--config-dir", required=True, metavar="DIR", help="the pilot's config directory")
    cc.add_argument("--ca-dir", metavar="DIR", help="the pilot's --ca-dir, if not DIR/ca")
    cc.add_argument("--spiffe-id", required=True, help="e.g. spiffe://cluster.local/ns/istio-system/sa/operator")
    cc.add_argument("--out", required=True, metavar="DIR", help="where to write key.pem, cert-chain.pem, root-cert.pem")
    cc.add_argument("--ttl", default="24h", help="how long the certificate is valid (default: 24h)")
    t = commands.add_parser("token", help="join tokens for proxies (on the pilot's host)")
    token_commands = t.add_subparsers(dest="token_command", required=True)
    tc = token_commands.add_parser("create", help="print a join token bound to a namespace")
    tc.add_argument("--config-dir", required=True, metavar="DIR", help="the pilot's config directory")
    tc.add_argument("--ca-dir", metavar="DIR", help="the pilot's --ca-dir, if not DIR/ca")
    tc.add_argument("--namespace", "-n", required=True, help="the proxy's namespace")
    tc.add_argument("--service-account", "-s", required=True, help="the workload's service account")
    tc.add_argument("--ttl", default="24h", help="how long the token is valid (default: 24h)")
    for name, text in (("rotate-key", "make a new signing key; tokens of the old one are accepted until "
                                      "finish-key-rotation"),
                       ("finish-key-rotation", "stop accepting tokens signed by the keys a rotation kept")):
        tk = token_commands.add_parser(name, help=text)
        tk.add_argument("--config-dir", required=True, metavar="DIR", help="the pilot's config directory")
        tk.add_argument("--ca-dir", metavar="DIR", help="the pilot's --ca-dir, if not DIR/ca")
    ki = commands.add_parser("kube-inject", help="add the txmesh sidecar to the pod templates of Kubernetes YAML "
                                                "(offline, like istioctl kube-inject)")
    ki.add_argument("-f", "--filename", required=True, metavar="FILE", help="the YAML file ('-': standard input)")
    ki.add_argument("-o", "--output", metavar="OUT", help="write here instead of standard output")
    ki.add_argument("--pilot", dest="inject_pilot", metavar="ADDRESS", default="txmesh-pilot.txmesh.svc:15010",
                    help="the pilot the proxies connect to (default: txmesh-pilot.txmesh.svc:15010)")
    ki.add_argument("--image", default="txmesh/proxy:latest", help="the proxy image (default: txmesh/proxy:latest)")
    ki.add_argument("--proxy-uid", type=int, default=1337, metavar="UID",
                    help="the proxy's user id, whose traffic is not captured (default: 1337)")
    ki.add_argument("--native-sidecar", choices=("auto", "always", "never"), default="auto",
                    help="put the sidecar in initContainers with restartPolicy: Always (Kubernetes >= 1.29): "
                         "auto (default) for Jobs, CronJobs and Pods with restartPolicy Never or OnFailure, "
                         "so they complete; always; or never")
    from txmesh.capture.command import add_arguments as add_iptables_arguments

    add_iptables_arguments(commands.add_parser(
        "iptables", help="print (default), --apply or --clean the transparent capture rules (iptables REDIRECT)"))
    return p


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """
    Entry point of the C{txmesh} console script.

    @return: the exit code (argparse exits 2 itself on a usage error).
    """
    p = parser(environ)
    args = p.parse_args(argv)
    if args.command == "iptables":
        return iptables(args)
    if args.command == "validate":
        files = args.flagged + args.files
        if not files:
            p.error("validate: name at least one FILE")
        return validate(files)
    if args.command == "kube-inject":
        return kube_inject(args.filename, args.output, args.inject_pilot, args.image, args.proxy_uid,
                           sys.stdout, sys.stderr, native_sidecar=args.native_sidecar)
    if args.command == "cert":
        from txmesh.pilot.ca import parse_spiffe_id
        from txmesh.pilot.channel_security import ca_directory

        try:
            trust_domain = parse_spiffe_id(args.spiffe_id)[0]
            ttl = parse_duration(args.ttl)
        except ValueError as e:
            p.error(str(e))
        return cert_create(args.ca_dir or ca_directory(args.config_dir), trust_domain, args.spiffe_id, args.out,
                           ttl, time.time())
    if args.command == "ca":
        return ca_command(args.ca_command, args.config_dir, args.ca_dir, args.trust_domain, time.time())
    if args.command == "token":
        from txmesh.pilot.channel_security import ca_directory

        if args.token_command != "create":
            return token_key_command(args.token_command, args.ca_dir or ca_directory(args.config_dir))
        try:
            ttl = parse_duration(args.ttl)
        except ValueError as e:
            p.error(f"--ttl: {e}")
        if ttl <= 0:
            p.error("--ttl: must be positive")
        return token_create(args.ca_dir or ca_directory(args.config_dir), args.namespace, args.service_account,
                            ttl, time.time())
    if not args.pilot.startswith(("http://", "https://")):
        p.error(f"--pilot: {args.pilot!r} is not an http:// or https:// URL")
    agent = None
    if args.pilot.startswith("https://"):
        if not args.cacert:
            p.error("--cacert FILE (the mesh root) is needed for an https pilot")
        try:
            agent = operator_agent(args.cacert, args.cert, args.key)
        except (OSError, ValueError) as e:
            p.error(f"--cacert/--cert/--key: {e}")
    elif args.cert or args.key:
        p.error("--cert/--key need an https:// --pilot")
    client = PilotClient(args.pilot, args.token, args.timeout, agent=agent)
    if args.command == "proxy-status":
        return _run(lambda: proxy_status(client, output=args.output))
    if args.command == "proxy-config":
        return _run(lambda: proxy_config(client, args.view, args.proxy, output=args.output))
    if args.command == "services":
        return _run(lambda: services(client, output=args.output))
    if args.command == "apply":
        return _run(lambda: apply(client, args.file, args.name, output=args.output))
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
