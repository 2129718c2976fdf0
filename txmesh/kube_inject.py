"""
Sidecar injection for Kubernetes manifests, as C{istioctl kube-inject} does
it: a pure YAML transformation that adds the txmesh init container (traffic
capture), the C{txmesh-proxy} sidecar and their volumes to every pod
template of a multi-document file.

Pods that run to completion (Jobs, CronJobs, Pods with C{restartPolicy}
C{Never} or C{OnFailure}) get the sidecar as a Kubernetes I{native sidecar}:
an init container with C{restartPolicy: Always}, which the kubelet stops
once the app's containers have exited, so the Job completes (Kubernetes
1.29 or later; see L{InjectOptions.native_sidecar}).

    >>> text = inject_yaml(open("reviews.yaml").read(), InjectOptions(pilot="pilot.txmesh.svc:15010"))

No cluster is asked; the same input and options always give the same output.
See C{docs/kubernetes.md} ("Sidecar injection").
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import attrs
import yaml

INIT_NAME = "txmesh-init"
PROXY_NAME = "txmesh-proxy"
TOKEN_VOLUME = "txmesh-token"
ROOT_VOLUME = "txmesh-root-cert"
ROOT_CONFIG_MAP = "txmesh-root-cert"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_PATH = f"{TOKEN_DIR}/{TOKEN_VOLUME}"
ROOT_DIR = "/etc/txmesh/root"
ROOT_CERT = f"{ROOT_DIR}/root-cert.pem"
TOKEN_AUDIENCE = "txmesh-pilot"
TOKEN_EXPIRATION = 43200

ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
RESERVED_PORTS = frozenset({ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT})

DEFAULT_PILOT = "txmesh-pilot.txmesh.svc:15010"
DEFAULT_IMAGE = "txmesh/proxy:latest"
DEFAULT_PROXY_UID = 1337

STATUS_ANNOTATION = "sidecar.txmesh.io/status"
INJECT_KEYS = ("sidecar.txmesh.io/inject", "sidecar.istio.io/inject")
#: Pod template annotations that choose the sidecar's form for one workload (the first one set wins).
NATIVE_SIDECAR_KEYS = ("sidecar.txmesh.io/nativeSidecar", "sidecar.istio.io/nativeSidecar")
NATIVE_SIDECAR_MODES = ("auto", "always", "never")
#: The pod restart policies of pods that run to completion.
COMPLETING_RESTART_POLICIES = frozenset({"Never", "OnFailure"})
TLS_MODE_LABEL = "security.istio.io/tlsMode"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

_TRUE = ("true", "yes", "y")
_FALSE = ("false", "no", "n")

#: Where each kind keeps its pod template (C{()}: the object is the pod).
TEMPLATE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def _version() -> str:
    try:
        return version("txmesh")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "unknown"


class InjectError(Exception):
    """
    A document cannot be injected; the message names the document (1-based,
    as it appears in the file), its kind and name when known, and the field.
    """


@attrs.frozen
class InjectOptions:
    """
    What is injected.

    @ivar pilot: the pilot's address, C{HOST:PORT} or a client endpoint
        string, given to the proxy as C{--pilot}.
    @ivar image: the image of both injected containers (it must hold the
        C{txmesh} and C{twistd} commands).
    @ivar proxy_uid: the user the proxy runs as; its traffic is not captured.
    @ivar native_sidecar: the sidecar's form. C{"auto"}: a native sidecar
        (an init container with C{restartPolicy: Always}) for pods that run
        to completion (L{runs_to_completion}), an ordinary container for
        the others; C{"always"}: a native sidecar everywhere; C{"never"}: an
        ordinary container everywhere. A pod template's
        C{sidecar.txmesh.io/nativeSidecar} annotation overrides it.
    """

    pilot: str = attrs.field(default=DEFAULT_PILOT)
    image: str = attrs.field(default=DEFAULT_IMAGE)
    proxy_uid: int = attrs.field(default=DEFAULT_PROXY_UID)
    native_sidecar: str = attrs.field(default="auto")

    @pilot.validator
    def _check_pilot(self, attribute: Any, value: str) -> None:
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"pilot: expected an address such as {DEFAULT_PILOT}, got {value!r}")

    @image.validator
    def _check_image(self, attribute: Any, value: str) -> None:
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"image: expected an image reference such as {DEFAULT_IMAGE}, got {value!r}")

    @proxy_uid.validator
    def _check_uid(self, attribute: Any, value: int) -> None:
        # 0 would make the proxy root, and the capture rules would exempt every root process.
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise ValueError(f"proxy_uid: expected a user id from 1 to {2**31 - 1}, got {value!r}")

    @native_sidecar.validator
    def _check_native_sidecar(self, attribute: Any, value: str) -> None:
        if value not in NATIVE_SIDECAR_MODES:
            raise ValueError(f"native_sidecar: expected one of {', '.join(NATIVE_SIDECAR_MODES)}, got {value!r}")


# --- what one pod template gets ------------------------------------------------------


def status(options: InjectOptions, native: bool = False) -> str:
    """
    @param native: whether the sidecar is a native sidecar (then it is
        among the C{initContainers}, after C{txmesh-init}).
    @return: the C{sidecar.txmesh.io/status} annotation: JSON naming what
        was injected, so a later run (or a person) can tell.
    """
    return json.dumps({"containers": [] if native else [PROXY_NAME],
                       "initContainers": [INIT_NAME, PROXY_NAME] if native else [INIT_NAME],
                       "volumes": [TOKEN_VOLUME, ROOT_VOLUME], "version": _version()},
                      sort_keys=True, separators=(",", ":"))


def init_container(options: InjectOptions, inbound_ports: Sequence[int]) -> dict[str, Any]:
    """
    @param inbound_ports: the app's container ports, captured on the way in.
    @return: the C{txmesh-init} container: C{txmesh iptables --apply} as
        root with C{NET_ADMIN} and C{NET_RAW}, then it exits.
    """
    return {
        "name": INIT_NAME,
        "image": options.image,
        "command": ["txmesh", "iptables", "--apply",
                    "--outbound-capture-port", str(OUTBOUND_PORT),
                    "--inbound-capture-port", str(INBOUND_PORT),
                    "--proxy-uid", str(options.proxy_uid),
                    "--inbound-ports", ",".join(str(p) for p in inbound_ports)],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
    }


def proxy_container(options: InjectOptions, workload: str, app_ports: Sequence[int] = (),
                    native: bool = False) -> dict[str, Any]:
    """
    @param workload: the workload's name (C{--workload}).
    @param app_ports: the app containers' ports; the first one gets the
        inbound listener (C{--inbound-port}/C{--app-port}).
    @param native: make it a native sidecar, for C{initContainers}:
        C{restartPolicy: Always}, and a C{startupProbe} on C{/ready}, which
        holds back the containers after it until the proxy is ready.
    @return: the C{txmesh-proxy} sidecar, bootstrapped from the pilot with
        the pod's projected service-account token.
    """
    return {
        "name": PROXY_NAME,
        "image": options.image,
        **({"restartPolicy": "Always"} if native else {}),
        # The whole argv in command, so the image's ENTRYPOINT does not matter; no pidfile,
        # since the working directory need not be writable by the proxy's user.
        "command": ["twistd", "-n", "--pidfile=", "txmesh-proxy",
                    "--pilot", options.pilot,
                    "--pilot-ca", ROOT_CERT,
                    "--pilot-token-file", TOKEN_PATH,
                    "--node-id", "$(POD_NAME).$(POD_NAMESPACE)",
                    "--namespace", "$(POD_NAMESPACE)",
                    "--workload", workload,
                    "--service-account", "$(SERVICE_ACCOUNT)",
                    # txmesh-init's iptables rules send the app's traffic here.
                    "--capture",
                    # The kubelet probes the pod's address, not loopback.
                    "--admin", f"tcp:{ADMIN_PORT}"]
                   + (["--inbound-port", str(INBOUND_PORT), "--app-port", str(app_ports[0])] if app_ports else []),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE",
             "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
            {"name": "SERVICE_ACCOUNT",
             "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.serviceAccountName"}}},
        ],
        "ports": [
            {"name": "txmesh-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "txmesh-out", "containerPort": OUTBOUND_PORT, "protocol": "TCP"},
            {"name": "txmesh-in", "containerPort": INBOUND_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": ADMIN_PORT},
            "initialDelaySeconds": 1,
            "periodSeconds": 2,
            "failureThreshold": 30,
        },
        # The kubelet starts the containers after a native sidecar only once its startup probe
        # passes (its readiness probe does not hold them back). Up to 10 minutes for the pilot;
        # then the sidecar is restarted and the app keeps waiting.
        **({"startupProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT},
                             "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 600}} if native else {}),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": {
            "runAsUser": options.proxy_uid,
            "runAsGroup": options.proxy_uid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": ROOT_VOLUME, "mountPath": ROOT_DIR, "readOnly": True},
        ],
    }


def volumes() -> list[dict[str, Any]]:
    """
    @return: the projected token (audience C{txmesh-pilot}, 12 hours, rotated
        by the kubelet) and the mesh root from the C{txmesh-root-cert}
        ConfigMap.
    """
    return [
        {"name": TOKEN_VOLUME,
         "projected": {"sources": [{"serviceAccountToken": {"audience": TOKEN_AUDIENCE,
                                                            "expirationSeconds": TOKEN_EXPIRATION,
                                                            "path": TOKEN_VOLUME}}]}},
        {"name": ROOT_VOLUME, "configMap": {"name": ROOT_CONFIG_MAP}},
    ]


# --- finding and changing the pod template -------------------------------------------


class _Where:
    """
    Names a document and a field in errors.
    """

    def __init__(self, index: int, doc: Mapping[str, Any]):
        metadata = doc.get("metadata")
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        self.label = f"document {index}"
        if isinstance(doc.get("kind"), str):
            self.label += f" ({doc['kind']}{' ' + str(name) if name else ''})"

    def error(self, field: str, reason: str) -> InjectError:
        return InjectError(f"{self.label}: {field}: {reason}" if field else f"{self.label}: {reason}")


def _mapping(parent: dict[str, Any], key: str, path: str, where: _Where, create: bool = False) -> dict[str, Any]:
    value = parent.get(key)
    if value is None and create:
        value = parent[key] = {}
    if not isinstance(value, dict):
        raise where.error(path, "missing" if value is None else f"expected a mapping, got {type(value).__name__}")
    return value


def _list(parent: dict[str, Any], key: str, path: str, where: _Where, create: bool = False) -> list[Any]:
    value = parent.get(key)
    if value is None and create:
        value = parent[key] = []
    if not isinstance(value, list):
        raise where.error(path, "missing" if value is None else f"expected a list, got {type(value).__name__}")
    return value


def _opted_out(metadata: Mapping[str, Any]) -> bool:
    for section in ("annotations", "labels"):
        values = metadata.get(section)
        if isinstance(values, Mapping):
            for key in INJECT_KEYS:
                value = values.get(key)
                if value is False or (isinstance(value, str) and value.strip().lower() in ("false", "no", "n")):
                    return True
    return False


def runs_to_completion(kind: str, spec: Mapping[str, Any]) -> bool:
    """
    @param spec: the pod template's C{spec}.
    @return: whether the pods run to completion: a Job's or a CronJob's, or
        any with C{restartPolicy} C{Never} or C{OnFailure} (a Pod's; the
        other kinds only allow C{Always}).
    """
    return kind in ("Job", "CronJob") or spec.get("restartPolicy") in COMPLETING_RESTART_POLICIES


def _native_annotation(metadata: Mapping[str, Any], path: str, where: _Where) -> tuple[str, bool] | None:
    """
    @return: the first C{nativeSidecar} annotation of the pod template and
        its value, or C{None}.
    @raise InjectError: its value is neither true nor false.
    """
    annotations = metadata.get("annotations")
    if not isinstance(annotations, Mapping):
        return None
    for key in NATIVE_SIDECAR_KEYS:
        if key not in annotations:
            continue
        value = annotations[key]
        if isinstance(value, bool):
            return key, value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return key, value.strip().lower() in _TRUE
        raise where.error(f"{path}metadata.annotations.{key}", f'expected "true" or "false", got {value!r}')
    return None


def _not_completing(kind: str, where: _Where, annotation: str | None, mode: str) -> str:
    """
    @param annotation: the C{nativeSidecar} annotation that chose an
        ordinary container, or C{None} when the option C{mode} did.
    @return: the warning for a pod that runs to completion with an
        ordinary sidecar container.
    """
    pods = {"Job": "the Job", "CronJob": "the CronJob's Jobs", "Pod": "the Pod"}.get(kind, "its pods")
    # No way for the app to stop the proxy to suggest: the admin endpoint has no quit page.
    why, fix = ((f'{annotation}: "false"', f"set {annotation} to \"true\"") if annotation
                else (f"--native-sidecar {mode}", "use --native-sidecar auto"))
    return (f"{where.label}: the sidecar is an ordinary container ({why}), so {pods} will not complete: "
            f"{PROXY_NAME} keeps running after the app's containers exit and nothing in the pod stops it; "
            f"{fix} for a native sidecar (Kubernetes 1.29 or later)")


def _already_injected(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    annotations = metadata.get("annotations")
    if isinstance(annotations, Mapping) and STATUS_ANNOTATION in annotations:
        return True
    names = {c.get("name") for key in ("containers", "initContainers")
             for c in (spec.get(key) or []) if isinstance(c, Mapping)}
    return PROXY_NAME in names or INIT_NAME in names


def _workload_name(doc: Mapping[str, Any], where: _Where) -> str:
    metadata = doc.get("metadata")
    if isinstance(metadata, Mapping):
        name = metadata.get("name")
        if isinstance(name, str) and name:
            return name
        generated = metadata.get("generateName")
        if isinstance(generated, str) and generated.rstrip("-"):
            return generated.rstrip("-")
    raise where.error("metadata.name", "missing (the proxy's --workload is the object's name)")


def _app_ports(containers: Sequence[Any], prefix: str, where: _Where) -> list[int]:
    ports: list[int] = []
    for i, container in enumerate(containers):
        if not isinstance(container, dict):
            raise where.error(f"{prefix}.containers[{i}]", f"expected a mapping, got {type(container).__name__}")
        for j, port in enumerate(container.get("ports") or []):
            field = f"{prefix}.containers[{i}].ports[{j}]"
            if not isinstance(port, Mapping):
                raise where.error(field, f"expected a mapping, got {type(port).__name__}")
            number = port.get("containerPort")
            if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
                raise where.error(f"{field}.containerPort", f"expected a port from 1 to 65535, got {number!r}")
            if number in RESERVED_PORTS:
                raise where.error(f"{field}.containerPort", f"{number} is reserved for the txmesh sidecar "
                                  f"({', '.join(str(p) for p in sorted(RESERVED_PORTS))})")
            # UDP and SCTP are not captured (the proxy speaks TCP only).
            if str(port.get("protocol", "TCP")).upper() == "TCP" and number not in ports:
                ports.append(number)
    return ports


def inject_document(doc: Any, options: InjectOptions, index: int = 1, warnings: list[str] | None = None) -> Any:
    """
    Inject one Kubernetes object.

    @param doc: the parsed document.
    @param index: its 1-based position in its file, for errors.
    @param warnings: where to append, naming the document, a warning for a
        pod that runs to completion but gets an ordinary sidecar container
        (it would never complete).
    @return: a new injected object; C{doc} itself when nothing is to be
        done (a kind without pods, an opted-out or C{hostNetwork} pod, one
        already injected).
    @raise InjectError: a workload whose pod template is missing or not of
        the documented shape, whose app uses a port the sidecar needs, or
        whose C{nativeSidecar} annotation is neither true nor false.
    """
    if not isinstance(doc, dict):
        raise InjectError(f"document {index}: expected a Kubernetes object (a mapping), got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        return {**doc, "items": [inject_document(item, options, index, warnings) for item in doc["items"]]}
    if not isinstance(kind, str) or kind not in TEMPLATE_PATHS:
        return doc
    where = _Where(index, doc)
    result = copy.deepcopy(doc)
    template = result
    for depth, key in enumerate(TEMPLATE_PATHS[kind]):
        template = _mapping(template, key, ".".join(TEMPLATE_PATHS[kind][:depth + 1]), where)
    prefix = ".".join(TEMPLATE_PATHS[kind])
    path = (prefix + "." if prefix else "")
    metadata = _mapping(template, "metadata", path + "metadata", where, create=kind != "Pod")
    spec = _mapping(template, "spec", path + "spec", where)
    if _opted_out(metadata) or spec.get("hostNetwork") is True or _already_injected(metadata, spec):
        return doc
    containers = _list(spec, "containers", path + "spec.containers", where)
    if not containers:
        raise where.error(path + "spec.containers", "empty")
    inbound = _app_ports(containers, path + "spec", where)
    existing = _list(spec, "volumes", path + "spec.volumes", where, create=True)
    for i, volume in enumerate(existing):
        if isinstance(volume, Mapping) and volume.get("name") in (TOKEN_VOLUME, ROOT_VOLUME):
            raise where.error(f"{path}spec.volumes[{i}].name", f"{volume['name']!r} is the name of a volume "
                              "the sidecar needs")
    completes = runs_to_completion(kind, spec)
    chosen = _native_annotation(metadata, path, where)
    if chosen is not None:
        native = chosen[1]
    else:
        native = options.native_sidecar == "always" or (options.native_sidecar == "auto" and completes)
    if completes and not native and warnings is not None:
        warnings.append(_not_completing(kind, where, chosen and chosen[0], options.native_sidecar))
    first_app = containers[0].get("name")
    proxy = proxy_container(options, _workload_name(doc, where), inbound, native=native)
    # The capture goes last, so the app's own init containers still reach the network directly;
    # a native sidecar after it, since init containers start in order and the capture must be done.
    init_containers = _list(spec, "initContainers", path + "spec.initContainers", where, create=True)
    init_containers.append(init_container(options, inbound))
    (init_containers if native else containers).append(proxy)
    existing.extend(volumes())
    annotations = _mapping(metadata, "annotations", path + "metadata.annotations", where, create=True)
    annotations[STATUS_ANNOTATION] = status(options, native)
    if isinstance(first_app, str):
        annotations.setdefault(DEFAULT_CONTAINER_ANNOTATION, first_app)
    _mapping(metadata, "labels", path + "metadata.labels", where, create=True)[TLS_MODE_LABEL] = "istio"
    return result


def inject_documents(docs: Iterable[Any], options: InjectOptions, warnings: list[str] | None = None) -> list[Any]:
    """
    @param docs: parsed documents, in file order (C{None}, an empty
        document, is dropped).
    @param warnings: see L{inject_document}.
    @return: each document injected, or unchanged.
    @raise InjectError: see L{inject_document}.
    """
    return [inject_document(doc, options, i, warnings) for i, doc in enumerate(docs, start=1) if doc is not None]


def inject_yaml(text: str, options: InjectOptions, warnings: list[str] | None = None) -> str:
    """
    Inject every document of a multi-document YAML text.

    @param warnings: see L{inject_document}.
    @return: the documents as YAML, separated by C{---}, keys in their
        original order.
    @raise InjectError: the text is not YAML (naming the document and
        line), or see L{inject_document}.
    """
    docs: list[Any] = []
    stream = yaml.safe_load_all(text)
    while True:
        try:
            doc = next(stream)
        except StopIteration:
            break
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise InjectError(f"document {len(docs) + 1}: not YAML{line}: {problem}") from None
        docs.append(doc)
    injected = inject_documents(docs, options, warnings)
    return yaml.safe_dump_all(injected, sort_keys=False, default_flow_style=False, explicit_start=False)
