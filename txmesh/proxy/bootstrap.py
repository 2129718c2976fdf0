"""
The bootstrap a proxy runs from when the command line names its pilot
(C{twistd txmesh-proxy --pilot ADDRESS ...}): the config file's document, if
any, with a C{pilot} section made or completed from the options, so a
sidecar needs no file at all.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from txmesh.config.gateway import PROXY_TYPE_LABEL, ROUTER
from txmesh.pilot.snapshot import APP_PROTOCOL_LABEL, INTERCEPTION_LABEL, REDIRECT

DEFAULT_ADMIN = "tcp:15000:interface=127.0.0.1"

_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})\Z")


def pilot_address(value: str) -> str:
    """
    @param value: a client endpoint string (C{tcp:pilot:15010}), or
        C{HOST:PORT} as a shorthand for one.
    @return: the endpoint string.
    """
    m = _HOST_PORT.match(value)
    if m is None:
        return value
    host = m.group("host")
    if host.startswith("["):
        host = host[1:-1].replace(":", "\\:")
    return f"tcp:{host}:{m.group('port')}"


@attrs.frozen
class PilotOptions:
    """
    What the command line says about the pilot and the node.

    @ivar addresses: the pilot replicas (endpoint strings or C{HOST:PORT}).
    @ivar ca_file: the mesh root file, or C{None}.
    @ivar token_file: the join token file, or C{None}.
    @ivar insecure: a plaintext channel.
    @ivar node_id: the node id, or C{None} to keep the file's.
    @ivar namespace: the namespace, or C{None} to keep the file's.
    @ivar workload: the workload, or C{None} to keep the file's.
    @ivar admin: the admin endpoint string, or C{None} to keep the file's
        (or the default, without a file).
    @ivar service_account: the workload's service account (its SPIFFE ID),
        or C{None}.
    @ivar inbound_port: the inbound listener's port, or C{None}.
    @ivar app_port: the app's port beside the proxy, or C{None}.
    @ivar labels: node labels to add (a gateway's C{istio: ingressgateway}).
    @ivar router: run as a gateway: serve the Gateways whose selector
        matches the labels instead of being a sidecar.
    @ivar capture: the workload's traffic is redirected to the proxy by
        iptables (C{txmesh iptables}): the pilot makes its outbound
        listener a capture listener.
    @ivar app_protocol: what the app speaks (C{http}, C{http2}, C{grpc}),
        or C{None} for HTTP/1.1.
    """

    addresses: Sequence[str]
    ca_file: str | None = None
    token_file: str | None = None
    insecure: bool = False
    node_id: str | None = None
    namespace: str | None = None
    workload: str | None = None
    admin: str | None = None
    service_account: str | None = None
    inbound_port: int | None = None
    app_port: int | None = None
    labels: Sequence[tuple[str, str]] = ()
    router: bool = False
    capture: bool = False
    app_protocol: str | None = None


def bootstrap_document(base: Mapping[str, Any] | None, options: PilotOptions, default_node_id: str) -> dict[str, Any]:
    """
    Merge the command line's pilot options into a config document.

    @param base: the config file's document, or C{None} without a file.
    @param default_node_id: the node id when neither the file nor the
        options give one (the host name, say).
    @return: a new document; C{base} is not changed.  The loader checks it.
    """
    doc: dict[str, Any] = copy.deepcopy(dict(base)) if isinstance(base, Mapping) else {}
    node = doc.setdefault("node", {})
    if isinstance(node, dict):
        for key, value in (("id", options.node_id), ("namespace", options.namespace),
                           ("workload", options.workload)):
            if value is not None:
                node[key] = value
        node.setdefault("id", default_node_id)
        labels = dict(options.labels)
        if options.router:
            labels[PROXY_TYPE_LABEL] = ROUTER
        if options.capture:
            labels[INTERCEPTION_LABEL] = REDIRECT
        if options.app_protocol is not None:
            labels[APP_PROTOCOL_LABEL] = options.app_protocol
        if labels:
            given = node.get("labels")
            node["labels"] = {**(given if isinstance(given, Mapping) else {}), **labels}
    if options.admin is not None:
        doc["admin"] = {"address": options.admin}
    elif base is None:
        doc["admin"] = {"address": DEFAULT_ADMIN}
    pilot = doc.setdefault("pilot", {})
    if isinstance(pilot, dict):
        pilot["addresses"] = [pilot_address(a) for a in options.addresses]
        if options.ca_file is not None:
            pilot["ca_file"] = options.ca_file
        if options.token_file is not None:
            pilot.pop("token", None)
            pilot["token_file"] = options.token_file
        if options.insecure:
            pilot["insecure"] = True
        for key in ("service_account", "inbound_port", "app_port"):
            value = getattr(options, key)
            if value is not None:
                pilot[key] = value
    return doc
