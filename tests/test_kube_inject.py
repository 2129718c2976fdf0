"""
C{txmesh kube-inject}: the pure YAML transformation (L{txmesh.kube_inject})
and the command around it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from txmesh.cli import kube_inject, main, parser
from txmesh.kube_inject import (
    INIT_NAME,
    NATIVE_SIDECAR_MODES,
    PROXY_NAME,
    STATUS_ANNOTATION,
    TEMPLATE_PATHS,
    InjectError,
    InjectOptions,
    inject_document,
    inject_documents,
    inject_yaml,
    runs_to_completion,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- a structural check of what we emit, after the Kubernetes object shapes -------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_FIELD_PATHS = {"metadata.name", "metadata.namespace", "spec.serviceAccountName"}


def _port(value: Any, where: str, problems: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        problems.append(f"{where}: port {value!r} is not an int from 1 to 65535")


def _security_context(sc: Any, where: str, problems: list[str]) -> None:
    if not isinstance(sc, Mapping):
        problems.append(f"{where}: not a mapping")
        return
    for key in ("runAsUser", "runAsGroup"):
        if key in sc and (isinstance(sc[key], bool) or not isinstance(sc[key], int) or sc[key] < 0):
            problems.append(f"{where}.{key}: {sc[key]!r} is not a non-negative int")
    for key in ("runAsNonRoot", "allowPrivilegeEscalation", "privileged", "readOnlyRootFilesystem"):
        if key in sc and not isinstance(sc[key], bool):
            problems.append(f"{where}.{key}: {sc[key]!r} is not a bool")
    if sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 0:
        problems.append(f"{where}: runAsNonRoot with runAsUser 0 cannot start")
    caps = sc.get("capabilities", {})
    if not isinstance(caps, Mapping) or set(caps) - {"add", "drop"}:
        problems.append(f"{where}.capabilities: expected add/drop")
    else:
        for key, names in caps.items():
            if not isinstance(names, list) or not all(isinstance(n, str) and n.isupper() for n in names):
                problems.append(f"{where}.capabilities.{key}: expected a list of capability names")


def _container(c: Any, where: str, volumes: set[str], problems: list[str]) -> None:
    if not isinstance(c, Mapping):
        problems.append(f"{where}: not a mapping")
        return
    if not isinstance(c.get("name"), str) or not _DNS_LABEL.match(c["name"]):
        problems.append(f"{where}.name: {c.get('name')!r} is not a DNS label")
    if not isinstance(c.get("image"), str) or not c["image"]:
        problems.append(f"{where}.image: missing")
    for key in ("command", "args"):
        if key in c and not (isinstance(c[key], list) and all(isinstance(a, str) for a in c[key])):
            problems.append(f"{where}.{key}: not a list of strings")
    names = set()
    for i, p in enumerate(c.get("ports", [])):
        _port(p.get("containerPort"), f"{where}.ports[{i}].containerPort", problems)
        if "name" in p:
            if not (isinstance(p["name"], str) and len(p["name"]) <= 15 and _DNS_LABEL.match(p["name"])):
                problems.append(f"{where}.ports[{i}].name: {p['name']!r} is not an IANA service name")
            if p["name"] in names:
                problems.append(f"{where}.ports[{i}].name: duplicate")
            names.add(p["name"])
        if p.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            problems.append(f"{where}.ports[{i}].protocol: {p['protocol']!r}")
    for i, e in enumerate(c.get("env", [])):
        if not isinstance(e.get("name"), str) or not _ENV_NAME.match(e["name"]):
            problems.append(f"{where}.env[{i}].name: {e.get('name')!r}")
        if "valueFrom" in e:
            field_ref = e["valueFrom"].get("fieldRef", {})
            if field_ref.get("fieldPath") not in _FIELD_PATHS:
                problems.append(f"{where}.env[{i}].valueFrom.fieldRef.fieldPath: {field_ref.get('fieldPath')!r}")
    for i, m in enumerate(c.get("volumeMounts", [])):
        if m.get("name") not in volumes:
            problems.append(f"{where}.volumeMounts[{i}]: no volume named {m.get('name')!r}")
        if not isinstance(m.get("mountPath"), str) or not m["mountPath"].startswith("/"):
            problems.append(f"{where}.volumeMounts[{i}].mountPath: {m.get('mountPath')!r} is not absolute")
    for kind in ("readinessProbe", "startupProbe", "livenessProbe"):
        probe = c.get(kind)
        if probe is None:
            continue
        get = probe.get("httpGet", {})
        _port(get.get("port"), f"{where}.{kind}.httpGet.port", problems)
        if not str(get.get("path", "")).startswith("/"):
            problems.append(f"{where}.{kind}.httpGet.path: {get.get('path')!r}")
        for key in ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"):
            value = probe.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "initialDelaySeconds" else 1):
                problems.append(f"{where}.{kind}.{key}: {value!r}")
    requests = c.get("resources", {}).get("requests", {})
    for key, value in requests.items():
        if key not in ("cpu", "memory") or not isinstance(value, str):
            problems.append(f"{where}.resources.requests.{key}: {value!r}")
    if "securityContext" in c:
        _security_context(c["securityContext"], f"{where}.securityContext", problems)


def _volume(v: Any, where: str, problems: list[str]) -> None:
    sources = [k for k in ("projected", "configMap", "secret", "emptyDir", "hostPath",
                           "persistentVolumeClaim") if k in v]
    if len(sources) != 1:
        problems.append(f"{where}: expected exactly one volume source, got {sources}")
        return
    if "projected" in v:
        for j, source in enumerate(v["projected"].get("sources", [])):
            token = source.get("serviceAccountToken")
            if token is None:
                continue
            w = f"{where}.projected.sources[{j}].serviceAccountToken"
            if not isinstance(token.get("audience"), str) or not token["audience"]:
                problems.append(f"{w}.audience: missing")
            seconds = token.get("expirationSeconds")
            if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 600:
                problems.append(f"{w}.expirationSeconds: {seconds!r} is not an int >= 600")
            if not isinstance(token.get("path"), str) or token["path"].startswith("/") or ".." in token["path"]:
                problems.append(f"{w}.path: {token.get('path')!r} is not a relative path")
    if "configMap" in v and not isinstance(v["configMap"].get("name"), str):
        problems.append(f"{where}.configMap.name: missing")
    if "secret" in v and not isinstance(v["secret"].get("secretName"), str):
        problems.append(f"{where}.secret.secretName: missing")


def pod_problems(template: Mapping[str, Any]) -> list[str]:
    """
    @return: what is wrong, by the Kubernetes shapes, with a pod template
        (or a Pod): the fields kube-inject emits.
    """
    problems: list[str] = []
    metadata = template.get("metadata", {})
    for key in ("labels", "annotations"):
        for k, v in metadata.get(key, {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                problems.append(f"metadata.{key}.{k}: {v!r} is not a string")
    spec = template.get("spec", {})
    volumes: set[str] = set()
    for i, v in enumerate(spec.get("volumes", [])):
        if v.get("name") in volumes:
            problems.append(f"spec.volumes[{i}].name: duplicate {v.get('name')!r}")
        volumes.add(v.get("name"))
        _volume(v, f"spec.volumes[{i}]", problems)
    names: set[str] = set()
    for key in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(key, [])):
            _container(c, f"spec.{key}[{i}]", volumes, problems)
            if c.get("name") in names:
                problems.append(f"spec.{key}[{i}].name: duplicate {c.get('name')!r}")
            names.add(c.get("name"))
            # A container's restartPolicy is only for init containers, and only Always (a native
            # sidecar); probes are for native sidecars and regular containers, not run-once init containers.
            policy = c.get("restartPolicy")
            if key == "containers" and policy is not None:
                problems.append(f"spec.containers[{i}].restartPolicy: not allowed outside initContainers")
            if key == "initContainers" and policy not in (None, "Always"):
                problems.append(f"spec.initContainers[{i}].restartPolicy: {policy!r} is not Always")
            if key == "initContainers" and policy is None:
                for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
                    if probe in c:
                        problems.append(f"spec.initContainers[{i}].{probe}: only a native sidecar (restartPolicy: "
                                        "Always) may have one")
    if not spec.get("containers"):
        problems.append("spec.containers: empty")
    return problems


def template_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    for key in TEMPLATE_PATHS[doc["kind"]]:
        doc = doc[key]
    return doc  # type: ignore[return-value]


# --- fixtures ----------------------------------------------------------------------------

POD_SPEC = {
    "containers": [{"name": "reviews", "image": "reviews:1",
                    "ports": [{"containerPort": 9080}, {"containerPort": 9090, "protocol": "TCP"},
                              {"containerPort": 5353, "protocol": "UDP"}]},
                   {"name": "helper", "image": "helper:1", "ports": [{"containerPort": 8081}]}],
}


def workload(kind: str, name: str = "reviews-v1", pod: Mapping[str, Any] | None = None) -> dict[str, Any]:
    template = {"metadata": {"labels": {"app": "reviews"}}, "spec": copy.deepcopy(dict(pod or POD_SPEC))}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]},
                "spec": template["spec"]}
    if kind == "CronJob":
        return {"apiVersion": "batch/v1", "kind": kind, "metadata": {"name": name},
                "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}}}
    api = "batch/v1" if kind == "Job" else "v1" if kind == "ReplicationController" else "apps/v1"
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "template": template}}


SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews"},
           "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}}

OPTIONS = InjectOptions(pilot="pilot.mesh.svc:15010", image="registry.example/txmesh:1.2", proxy_uid=1500)


def container(template: Mapping[str, Any], key: str, name: str) -> dict[str, Any]:
    [found] = [c for c in template["spec"].get(key, []) if c["name"] == name]
    return found


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


class InjectKindsTests(SynchronousTestCase):
    """
    Each kind with a pod template gets the same injection, in the right place.
    """

    def test_kinds(self):
        for kind in TEMPLATE_PATHS:
            with self.subTest(kind=kind):
                doc = workload(kind)
                original = copy.deepcopy(doc)
                injected = inject_document(doc, OPTIONS)
                self.assertEqual(doc, original, "the input is not changed")
                template = template_of(injected)
                self.assertEqual(pod_problems(template), [])
                spec = template["spec"]
                # Jobs' pods run to completion: the sidecar is a native one (NativeSidecarTests).
                sidecars = [PROXY_NAME] if kind in ("Job", "CronJob") else []
                self.assertEqual([c["name"] for c in spec["containers"]],
                                 ["reviews", "helper"] + ([] if sidecars else [PROXY_NAME]))
                self.assertEqual([c["name"] for c in spec["initContainers"]], [INIT_NAME] + sidecars)
                self.assertEqual([v["name"] for v in spec["volumes"]], ["txmesh-token", "txmesh-root-cert"])
                self.assertEqual(template["metadata"]["labels"],
                                 {"app": "reviews", "security.istio.io/tlsMode": "istio"})
                status = json.loads(template["metadata"]["annotations"][STATUS_ANNOTATION])
                self.assertEqual(status["containers"], [] if sidecars else [PROXY_NAME])
                self.assertEqual(status["initContainers"], [INIT_NAME] + sidecars)
                self.assertEqual(status["volumes"], ["txmesh-token", "txmesh-root-cert"])
                self.assertIsInstance(status["version"], str)
                self.assertEqual(template["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
                                 "reviews")
                # Outside the template nothing moves.
                outer = copy.deepcopy(injected)
                if TEMPLATE_PATHS[kind]:
                    parent = outer
                    for key in TEMPLATE_PATHS[kind][:-1]:
                        parent = parent[key]
                    parent[TEMPLATE_PATHS[kind][-1]] = template_of(original)
                    self.assertEqual(outer, original)

    def test_proxy_container(self):
        template = template_of(inject_document(workload("Deployment"), OPTIONS))
        proxy = container(template, "containers", PROXY_NAME)
        argv = proxy["command"]
        self.assertEqual(argv[:4], ["twistd", "-n", "--pidfile=", "txmesh-proxy"])
        self.assertEqual(option(argv, "--pilot"), "pilot.mesh.svc:15010")
        self.assertEqual(option(argv, "--pilot-ca"), "/etc/txmesh/root/root-cert.pem")
        self.assertEqual(option(argv, "--pilot-token-file"), "/var/run/secrets/tokens/txmesh-token")
        self.assertEqual(option(argv, "--node-id"), "$(POD_NAME).$(POD_NAMESPACE)")
        self.assertEqual(option(argv, "--namespace"), "$(POD_NAMESPACE)")
        self.assertEqual(option(argv, "--workload"), "reviews-v1")
        self.assertEqual(proxy["image"], "registry.example/txmesh:1.2")
        self.assertEqual({e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in proxy["env"]},
                         {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                          "SERVICE_ACCOUNT": "spec.serviceAccountName"})
        self.assertEqual([p["containerPort"] for p in proxy["ports"]], [15000, 15001, 15006])
        self.assertEqual(proxy["readinessProbe"]["httpGet"], {"path": "/ready", "port": 15000})
        self.assertEqual(set(proxy["resources"]["requests"]), {"cpu", "memory"})
        self.assertEqual(proxy["securityContext"]["runAsUser"], 1500)
        self.assertIs(proxy["securityContext"]["runAsNonRoot"], True)
        self.assertEqual({m["name"]: m["mountPath"] for m in proxy["volumeMounts"]},
                         {"txmesh-token": "/var/run/secrets/tokens", "txmesh-root-cert": "/etc/txmesh/root"})
        [token] = [v for v in template["spec"]["volumes"] if v["name"] == "txmesh-token"]
        self.assertEqual(token["projected"]["sources"],
                         [{"serviceAccountToken": {"audience": "txmesh-pilot", "expirationSeconds": 43200,
                                                   "path": "txmesh-token"}}])
        [root] = [v for v in template["spec"]["volumes"] if v["name"] == "txmesh-root-cert"]
        self.assertEqual(root["configMap"], {"name": "txmesh-root-cert"})

    def test_init_container(self):
        """
        C{txmesh iptables --apply} as root with NET_ADMIN and NET_RAW; the
        app's TCP container ports (not UDP, each once) are captured inbound.
        """
        template = template_of(inject_document(workload("StatefulSet"), OPTIONS))
        init = container(template, "initContainers", INIT_NAME)
        argv = init["command"]
        self.assertEqual(argv[:3], ["txmesh", "iptables", "--apply"])
        self.assertEqual(option(argv, "--outbound-capture-port"), "15001")
        self.assertEqual(option(argv, "--inbound-capture-port"), "15006")
        self.assertEqual(option(argv, "--proxy-uid"), "1500")
        self.assertEqual(option(argv, "--inbound-ports"), "9080,9090,8081")
        sc = init["securityContext"]
        self.assertEqual((sc["runAsUser"], sc["runAsNonRoot"]), (0, False))
        self.assertEqual(sc["capabilities"]["add"], ["NET_ADMIN", "NET_RAW"])

    def test_init_command_parses(self):
        """
        The init container's argv is one the real C{txmesh iptables} accepts,
        and describes the capture we mean.
        """
        try:
            from txmesh.capture.command import spec_from_args
        except ImportError:  # pragma: no cover - the capture command is not there
            raise SkipTest("txmesh.capture.command is not available") from None
        template = template_of(inject_document(workload("Deployment"), OPTIONS))
        argv = container(template, "initContainers", INIT_NAME)["command"]
        self.assertEqual(argv[0], "txmesh")
        args = parser({}).parse_args(argv[1:])
        self.assertEqual((args.command, args.apply), ("iptables", True))
        spec = spec_from_args(args)
        self.assertEqual((spec.proxy_uid, spec.outbound_capture_port, spec.inbound_capture_port, spec.inbound_ports),
                         (1500, 15001, 15006, (9080, 9090, 8081)))

    def test_no_ports(self):
        pod = {"containers": [{"name": "worker", "image": "w:1"}, {"name": "dup", "image": "d:1",
                                                                   "ports": [{"containerPort": 80}]},
                              {"name": "dup2", "image": "d:1", "ports": [{"containerPort": 80}]}]}
        template = template_of(inject_document(workload("Job", pod=pod), OPTIONS))
        self.assertEqual(option(container(template, "initContainers", INIT_NAME)["command"], "--inbound-ports"), "80")
        pod = {"containers": [{"name": "worker", "image": "w:1"}]}
        template = template_of(inject_document(workload("Job", pod=pod), OPTIONS))
        self.assertEqual(option(container(template, "initContainers", INIT_NAME)["command"], "--inbound-ports"), "")

    def test_existing_init_containers_and_volumes(self):
        """
        The app's init containers run first (before the capture) and its
        volumes and annotations stay.
        """
        pod = {**POD_SPEC, "initContainers": [{"name": "migrate", "image": "m:1"}],
               "volumes": [{"name": "data", "emptyDir": {}}],
               "securityContext": {"runAsNonRoot": True, "runAsUser": 1000}}
        doc = workload("Deployment", pod=pod)
        doc["spec"]["template"]["metadata"]["annotations"] = {"prometheus.io/scrape": "true",
                                                              "kubectl.kubernetes.io/default-container": "helper"}
        template = template_of(inject_document(doc, OPTIONS))
        self.assertEqual(pod_problems(template), [])
        self.assertEqual([c["name"] for c in template["spec"]["initContainers"]], ["migrate", INIT_NAME])
        self.assertEqual([v["name"] for v in template["spec"]["volumes"]], ["data", "txmesh-token", "txmesh-root-cert"])
        annotations = template["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/scrape"], "true")
        self.assertEqual(annotations["kubectl.kubernetes.io/default-container"], "helper")

    def test_generate_name(self):
        doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "batch-"},
               "spec": {"containers": [{"name": "a", "image": "a:1"}]}}
        injected = inject_document(doc, OPTIONS)
        self.assertEqual(option(container(injected, "containers", PROXY_NAME)["command"], "--workload"), "batch")

    def test_list(self):
        doc = {"apiVersion": "v1", "kind": "List", "items": [SERVICE, workload("Deployment")]}
        injected = inject_document(doc, OPTIONS)
        self.assertEqual(injected["items"][0], SERVICE)
        self.assertEqual(pod_problems(template_of(injected["items"][1])), [])
        self.assertIn(PROXY_NAME, [c["name"] for c in template_of(injected["items"][1])["spec"]["containers"]])


def job(kind: str = "Job", restart_policy: str | None = "Never", **kwargs: Any) -> dict[str, Any]:
    """
    A workload whose pod template has C{restart_policy} (none: the field is left out).
    """
    pod = {**POD_SPEC, **({"restartPolicy": restart_policy} if restart_policy else {})}
    return workload(kind, pod=pod, **kwargs)


NATIVE_KEY = "sidecar.txmesh.io/nativeSidecar"


def annotate(doc: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    template = doc if doc["kind"] == "Pod" else template_of(doc)
    template["metadata"].setdefault("annotations", {})[key] = value
    return doc


class NativeSidecarTests(SynchronousTestCase):
    """
    Pods that run to completion get the proxy as a Kubernetes native sidecar
    (an init container with C{restartPolicy: Always}, after C{txmesh-init}),
    so their Job completes; C{native_sidecar} and the C{nativeSidecar}
    annotation choose otherwise.
    """

    def assertNative(self, injected: Mapping[str, Any]) -> dict[str, Any]:
        """
        @return: the native sidecar, after checking where it is and the shapes.
        """
        template = template_of(injected) if injected["kind"] != "Pod" else dict(injected)
        self.assertEqual(pod_problems(template), [])
        spec = template["spec"]
        self.assertEqual([c["name"] for c in spec["containers"]], ["reviews", "helper"])
        self.assertEqual([c["name"] for c in spec["initContainers"]][-2:], [INIT_NAME, PROXY_NAME])
        self.assertNotIn("restartPolicy", spec["initContainers"][-2], "txmesh-init runs once, to completion")
        proxy = container(template, "initContainers", PROXY_NAME)
        self.assertEqual(proxy["restartPolicy"], "Always")
        # The startup probe holds the app's containers back until the proxy is ready.
        self.assertEqual(proxy["startupProbe"]["httpGet"], {"path": "/ready", "port": 15000})
        self.assertEqual(proxy["readinessProbe"]["httpGet"], {"path": "/ready", "port": 15000})
        status = json.loads(template["metadata"]["annotations"][STATUS_ANNOTATION])
        self.assertEqual((status["containers"], status["initContainers"]), ([], [INIT_NAME, PROXY_NAME]))
        return proxy

    def assertClassic(self, injected: Mapping[str, Any]) -> dict[str, Any]:
        template = template_of(injected) if injected["kind"] != "Pod" else dict(injected)
        self.assertEqual(pod_problems(template), [])
        spec = template["spec"]
        self.assertEqual([c["name"] for c in spec["containers"]], ["reviews", "helper", PROXY_NAME])
        self.assertEqual([c["name"] for c in spec["initContainers"]][-1:], [INIT_NAME])
        proxy = container(template, "containers", PROXY_NAME)
        self.assertNotIn("restartPolicy", proxy)
        self.assertNotIn("startupProbe", proxy)
        status = json.loads(template["metadata"]["annotations"][STATUS_ANNOTATION])
        self.assertEqual((status["containers"], status["initContainers"]), ([PROXY_NAME], [INIT_NAME]))
        return proxy

    def inject(self, doc: dict[str, Any], mode: str = "auto") -> tuple[dict[str, Any], list[str]]:
        warnings: list[str] = []
        options = InjectOptions(pilot=OPTIONS.pilot, image=OPTIONS.image, proxy_uid=OPTIONS.proxy_uid,
                                native_sidecar=mode)
        return inject_document(doc, options, 1, warnings), warnings

    def test_job(self):
        for policy in ("Never", "OnFailure"):
            with self.subTest(policy=policy):
                injected, warnings = self.inject(job("Job", policy))
                proxy = self.assertNative(injected)
                self.assertEqual(warnings, [])
                # The same proxy as a classic one, plus what makes it a native sidecar.
                classic = self.assertClassic(self.inject(job("Job", policy), "never")[0])
                self.assertEqual({k: v for k, v in proxy.items() if k not in ("restartPolicy", "startupProbe")},
                                 classic)

    def test_cronjob(self):
        injected, warnings = self.inject(job("CronJob", "OnFailure", name="nightly"))
        self.assertNative(injected)
        self.assertEqual(warnings, [])
        self.assertEqual(injected["spec"]["schedule"], "*/5 * * * *")

    def test_pod(self):
        """
        A Pod is a native one with C{restartPolicy} C{Never} or C{OnFailure},
        a classic one with C{Always} or none (the default, C{Always}).
        """
        for policy in ("Never", "OnFailure"):
            with self.subTest(policy=policy):
                injected, warnings = self.inject(job("Pod", policy))
                self.assertNative(injected)
                self.assertEqual(warnings, [])
        for policy in ("Always", None):
            with self.subTest(policy=policy):
                injected, warnings = self.inject(job("Pod", policy))
                self.assertClassic(injected)
                self.assertEqual(warnings, [])

    def test_long_running_kinds(self):
        for kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController"):
            with self.subTest(kind=kind):
                injected, warnings = self.inject(workload(kind))
                self.assertClassic(injected)
                self.assertEqual(warnings, [])

    def test_runs_to_completion(self):
        self.assertTrue(runs_to_completion("Job", {}))
        self.assertTrue(runs_to_completion("CronJob", {"restartPolicy": "OnFailure"}))
        self.assertTrue(runs_to_completion("Pod", {"restartPolicy": "Never"}))
        self.assertFalse(runs_to_completion("Pod", {}))
        self.assertFalse(runs_to_completion("Pod", {"restartPolicy": "Always"}))
        self.assertFalse(runs_to_completion("Deployment", {"restartPolicy": "Always"}))

    def test_after_the_apps_init_containers(self):
        """
        The app's own init containers run first, then the capture, then the
        sidecar starts (init containers start in order).
        """
        doc = job("Job")
        template_of(doc)["spec"]["initContainers"] = [{"name": "migrate", "image": "m:1"}]
        injected, _ = self.inject(doc)
        self.assertNative(injected)
        self.assertEqual([c["name"] for c in template_of(injected)["spec"]["initContainers"]],
                         ["migrate", INIT_NAME, PROXY_NAME])

    def test_always(self):
        for kind in TEMPLATE_PATHS:
            with self.subTest(kind=kind):
                injected, warnings = self.inject(workload(kind), "always")
                self.assertNative(injected)
                self.assertEqual(warnings, [])

    def test_never(self):
        """
        Classic everywhere; a pod that runs to completion gets a warning
        naming the document, since its Job would never complete.
        """
        for kind in ("Deployment", "Pod"):
            with self.subTest(kind=kind):
                injected, warnings = self.inject(workload(kind), "never")
                self.assertClassic(injected)
                self.assertEqual(warnings, [])
        for doc, pods in [(job("Job", name="migrate"), "the Job"), (job("CronJob", name="nightly"),
                                                                     "the CronJob's Jobs"),
                          (job("Pod", "OnFailure", name="once"), "the Pod")]:
            with self.subTest(kind=doc["kind"]):
                injected, warnings = self.inject(doc, "never")
                self.assertClassic(injected)
                self.assertEqual(warnings, [
                    f"document 1 ({doc['kind']} {doc['metadata']['name']}): the sidecar is an ordinary container "
                    f"(--native-sidecar never), so {pods} will not complete: txmesh-proxy keeps running after the "
                    "app's containers exit and nothing in the pod stops it; use --native-sidecar auto for a native "
                    "sidecar (Kubernetes 1.29 or later)"])

    def test_annotation(self):
        """
        The pod template's C{nativeSidecar} annotation (txmesh's, else
        Istio's) wins over the option, either way.
        """
        for mode in ("auto", "never"):
            for key, value in [(NATIVE_KEY, "true"), ("sidecar.istio.io/nativeSidecar", "true"),
                               (NATIVE_KEY, "True")]:
                with self.subTest(mode=mode, key=key, value=value):
                    injected, warnings = self.inject(annotate(workload("Deployment"), key, value), mode)
                    self.assertNative(injected)
                    self.assertEqual(warnings, [])
                    self.assertEqual(template_of(injected)["metadata"]["annotations"][key], value, "kept")
        # An unquoted YAML true (which Kubernetes would refuse as an annotation) means true too.
        injected, _ = self.inject(annotate(workload("Deployment"), NATIVE_KEY, True))
        self.assertEqual([c["name"] for c in template_of(injected)["spec"]["initContainers"]], [INIT_NAME, PROXY_NAME])
        for mode in ("auto", "always"):
            with self.subTest(mode=mode, value="false"):
                self.assertClassic(self.inject(annotate(workload("Deployment"), NATIVE_KEY, "false"), mode)[0])
        doc = annotate(annotate(job("Job", name="migrate"), NATIVE_KEY, "false"),
                       "sidecar.istio.io/nativeSidecar", "true")
        injected, warnings = self.inject(doc, "always")
        self.assertClassic(injected)
        self.assertEqual(warnings, [
            'document 1 (Job migrate): the sidecar is an ordinary container (sidecar.txmesh.io/nativeSidecar: '
            '"false"), so the Job will not complete: txmesh-proxy keeps running after the app\'s containers exit '
            'and nothing in the pod stops it; set sidecar.txmesh.io/nativeSidecar to "true" for a native sidecar '
            '(Kubernetes 1.29 or later)'])
        # Only the pod template's annotations count (as for sidecar.txmesh.io/inject).
        doc = job("Job")
        doc["metadata"]["annotations"] = {NATIVE_KEY: "false"}
        self.assertNative(self.inject(doc)[0])

    def test_annotation_value(self):
        doc = annotate(job("CronJob", name="nightly"), NATIVE_KEY, "maybe")
        with self.assertRaises(InjectError) as e:
            self.inject(doc)
        self.assertEqual(str(e.exception), "document 1 (CronJob nightly): spec.jobTemplate.spec.template.metadata."
                                           'annotations.sidecar.txmesh.io/nativeSidecar: expected "true" or '
                                           "\"false\", got 'maybe'")

    def test_idempotent(self):
        """
        Injecting again changes nothing, whichever form the sidecar has and
        whatever the options.
        """
        docs = [job("Job"), job("CronJob"), job("Pod"), workload("Deployment"),
                annotate(workload("StatefulSet"), NATIVE_KEY, "true")]
        text = yaml.safe_dump_all(docs, sort_keys=False)
        for mode in NATIVE_SIDECAR_MODES:
            with self.subTest(mode=mode):
                options = InjectOptions(native_sidecar=mode)
                once = inject_yaml(text, options)
                for again in NATIVE_SIDECAR_MODES:
                    warnings: list[str] = []
                    self.assertEqual(inject_yaml(once, InjectOptions(native_sidecar=again), warnings), once)
                    self.assertEqual(warnings, [], "nothing injected, nothing to warn about")

    def test_detected_in_init_containers(self):
        """
        A native sidecar without the status annotation (edited by hand) is
        recognised by its name among the init containers.
        """
        injected, _ = self.inject(job("Job"))
        template = template_of(injected)
        del template["metadata"]["annotations"][STATUS_ANNOTATION]
        for mode in NATIVE_SIDECAR_MODES:
            self.assertIs(self.inject(injected, mode)[0], injected)
        template["spec"]["initContainers"] = [c for c in template["spec"]["initContainers"] if c["name"] != INIT_NAME]
        self.assertIs(self.inject(injected, "never")[0], injected, "the native sidecar alone is enough")

    def test_option(self):
        with self.assertRaises(ValueError) as e:
            InjectOptions(native_sidecar="sometimes")
        self.assertEqual(str(e.exception), "native_sidecar: expected one of auto, always, never, got 'sometimes'")
        self.assertEqual(InjectOptions().native_sidecar, "auto")


class IdempotenceAndSkipTests(SynchronousTestCase):
    def test_twice_is_once(self):
        text = yaml.safe_dump_all([SERVICE] + [workload(kind) for kind in TEMPLATE_PATHS], sort_keys=False)
        once = inject_yaml(text, OPTIONS)
        self.assertEqual(inject_yaml(once, OPTIONS), once)
        # Different options do not inject a second time either.
        self.assertEqual(inject_yaml(once, InjectOptions()), once)

    def test_detected_by_container_name(self):
        """
        A template with the sidecar but without the status annotation (it
        was edited by hand) is left alone.
        """
        injected = inject_document(workload("Deployment"), OPTIONS)
        del template_of(injected)["metadata"]["annotations"][STATUS_ANNOTATION]
        self.assertIs(inject_document(injected, OPTIONS), injected)
        del template_of(injected)["spec"]["containers"][-1]
        self.assertIs(inject_document(injected, OPTIONS), injected, "the init container is enough")

    def test_skip(self):
        for section, key, value in [("annotations", "sidecar.txmesh.io/inject", "false"),
                                    ("annotations", "sidecar.istio.io/inject", "false"),
                                    ("annotations", "sidecar.istio.io/inject", "False"),
                                    ("annotations", "sidecar.txmesh.io/inject", False),
                                    ("labels", "sidecar.istio.io/inject", "false")]:
            with self.subTest(key=key, value=value):
                doc = workload("Deployment")
                doc["spec"]["template"]["metadata"].setdefault(section, {})[key] = value
                self.assertIs(inject_document(doc, OPTIONS), doc)

    def test_not_skipped(self):
        doc = workload("Deployment")
        doc["spec"]["template"]["metadata"]["annotations"] = {"sidecar.txmesh.io/inject": "true"}
        self.assertIn(STATUS_ANNOTATION, template_of(inject_document(doc, OPTIONS))["metadata"]["annotations"])
        # Only the pod template counts, as in Istio.
        doc = workload("Deployment")
        doc["metadata"]["annotations"] = {"sidecar.txmesh.io/inject": "false"}
        self.assertIn(STATUS_ANNOTATION, template_of(inject_document(doc, OPTIONS))["metadata"]["annotations"])

    def test_host_network(self):
        doc = workload("DaemonSet", pod={**POD_SPEC, "hostNetwork": True})
        self.assertIs(inject_document(doc, OPTIONS), doc)

    def test_multi_document(self):
        """
        A Service, a ConfigMap and an empty document pass through; only the
        Deployment changes.
        """
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}}
        text = (yaml.safe_dump(SERVICE) + "---\n" + yaml.safe_dump(workload("Deployment")) + "---\n---\n"
                + yaml.safe_dump(config_map))
        docs = list(yaml.safe_load_all(inject_yaml(text, OPTIONS)))
        self.assertEqual([d["kind"] for d in docs], ["Service", "Deployment", "ConfigMap"])
        self.assertEqual(docs[0], SERVICE)
        self.assertEqual(docs[2], config_map)
        self.assertEqual(pod_problems(template_of(docs[1])), [])
        self.assertEqual(inject_documents([SERVICE, None], OPTIONS), [SERVICE])


class ErrorTests(SynchronousTestCase):
    def assertError(self, text, message):
        with self.assertRaises(InjectError) as e:
            inject_yaml(text, OPTIONS)
        self.assertEqual(str(e.exception), message)

    def test_not_yaml(self):
        self.assertError("kind: Service\nmetadata: {name: s}\n---\nkind: Deployment\nmetadata: {name: [x\nspec: {}\n",
                         "document 2: not YAML (line 6): expected ',' or ']', but got ':'")

    def test_not_a_mapping(self):
        self.assertError(yaml.safe_dump(SERVICE) + "---\n- a\n- b\n",
                         "document 2: expected a Kubernetes object (a mapping), got list")

    def test_missing_template(self):
        doc = workload("Deployment")
        del doc["spec"]["template"]
        self.assertError(yaml.safe_dump_all([SERVICE, doc]), "document 2 (Deployment reviews-v1): spec.template: missing")
        doc = workload("CronJob", name="nightly")
        del doc["spec"]["jobTemplate"]
        self.assertError(yaml.safe_dump(doc), "document 1 (CronJob nightly): spec.jobTemplate: missing")
        doc = workload("StatefulSet")
        doc["spec"]["template"] = "oops"
        self.assertError(yaml.safe_dump(doc), "document 1 (StatefulSet reviews-v1): spec.template: expected a "
                                              "mapping, got str")
        self.assertError("kind: Job\nmetadata: {name: j}\n", "document 1 (Job j): spec: missing")

    def test_containers(self):
        doc = workload("Deployment")
        del doc["spec"]["template"]["spec"]["containers"]
        self.assertError(yaml.safe_dump(doc),
                         "document 1 (Deployment reviews-v1): spec.template.spec.containers: missing")
        doc = {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
        self.assertError(yaml.safe_dump(doc), "document 1 (Pod p): spec.containers: empty")
        doc = {"kind": "Pod", "metadata": {"name": "p"},
               "spec": {"containers": [{"name": "a", "image": "a", "ports": [{"containerPort": "http"}]}]}}
        self.assertError(yaml.safe_dump(doc), "document 1 (Pod p): spec.containers[0].ports[0].containerPort: "
                                              "expected a port from 1 to 65535, got 'http'")

    def test_reserved_port(self):
        doc = workload("Deployment", pod={"containers": [{"name": "a", "image": "a", "ports": [{"containerPort": 15001}]}]})
        self.assertError(yaml.safe_dump(doc), "document 1 (Deployment reviews-v1): "
                                              "spec.template.spec.containers[0].ports[0].containerPort: 15001 is "
                                              "reserved for the txmesh sidecar (15000, 15001, 15006)")

    def test_volume_name_taken(self):
        doc = workload("Deployment", pod={**POD_SPEC, "volumes": [{"name": "txmesh-token", "emptyDir": {}}]})
        self.assertError(yaml.safe_dump(doc), "document 1 (Deployment reviews-v1): spec.template.spec.volumes[0]."
                                              "name: 'txmesh-token' is the name of a volume the sidecar needs")

    def test_pod_without_name(self):
        doc = {"kind": "Pod", "metadata": {}, "spec": {"containers": [{"name": "a", "image": "a"}]}}
        self.assertError(yaml.safe_dump(doc), "document 1 (Pod): metadata.name: missing (the proxy's --workload "
                                              "is the object's name)")

    def test_options(self):
        for kwargs, message in [({"proxy_uid": 0}, "proxy_uid: expected a user id from 1 to 2147483647, got 0"),
                                ({"proxy_uid": True}, "proxy_uid: expected a user id from 1 to 2147483647, got True"),
                                ({"image": ""}, "image: expected an image reference such as txmesh/proxy:latest, "
                                                "got ''"),
                                ({"pilot": "a b"}, "pilot: expected an address such as "
                                                   "txmesh-pilot.txmesh.svc:15010, got 'a b'")]:
            with self.subTest(**kwargs):
                with self.assertRaises(ValueError) as e:
                    InjectOptions(**kwargs)
                self.assertEqual(str(e.exception), message)


class CommandTests(SynchronousTestCase):
    """
    C{txmesh kube-inject}, as a function and as a process.
    """

    def write(self, text):
        fd, path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.remove, path)
        return path

    def setUp(self):
        self.text = yaml.safe_dump_all([SERVICE, workload("Deployment")], sort_keys=False)
        self.path = self.write(self.text)
        self.out, self.err = io.StringIO(), io.StringIO()

    def test_stdout(self):
        code = kube_inject(self.path, None, "pilot:15010", "img:1", 1337, self.out, self.err)
        self.assertEqual((code, self.err.getvalue()), (0, ""))
        self.assertEqual(self.out.getvalue(), inject_yaml(self.text, InjectOptions("pilot:15010", "img:1", 1337)))

    def test_output_file_and_stdin(self):
        target = self.path + ".out"
        self.addCleanup(lambda: os.path.exists(target) and os.remove(target))
        code = kube_inject("-", target, "pilot:15010", "img:1", 1337, self.out, self.err, stdin=io.StringIO(self.text))
        self.assertEqual((code, self.out.getvalue(), self.err.getvalue()), (0, "", ""))
        with open(target) as f:
            self.assertEqual(f.read(), inject_yaml(self.text, InjectOptions("pilot:15010", "img:1", 1337)))

    def test_errors(self):
        bad = self.write("kind: Deployment\nmetadata: {name: x}\nspec: {replicas: 1}\n")
        target = bad + ".out"
        self.assertEqual(kube_inject(bad, target, "p:1", "i", 1337, self.out, self.err), 1)
        self.assertEqual(self.err.getvalue(), f"txmesh kube-inject: {bad}: document 1 (Deployment x): spec.template: "
                                              "missing\n")
        self.assertFalse(os.path.exists(target), "nothing written")
        err = io.StringIO()
        self.assertEqual(kube_inject("/no/such.yaml", None, "p:1", "i", 1337, self.out, err), 1)
        self.assertEqual(err.getvalue(), "txmesh kube-inject: /no/such.yaml: No such file or directory\n")
        err = io.StringIO()
        self.assertEqual(kube_inject(self.path, None, "p:1", "i", -1, self.out, err), 1)
        self.assertEqual(err.getvalue(), "txmesh kube-inject: proxy_uid: expected a user id from 1 to 2147483647, "
                                         "got -1\n")
        self.assertEqual(self.out.getvalue(), "")

    def test_main(self):
        """
        C{main} takes the subcommand's own C{--pilot} (an address, not the
        operator API's URL).
        """
        target = self.path + ".out"
        self.addCleanup(os.remove, target)
        self.assertEqual(main(["kube-inject", "-f", self.path, "-o", target, "--pilot", "p.mesh:15010",
                               "--image", "i:2", "--proxy-uid", "1400"], environ={}), 0)
        with open(target) as f:
            docs = list(yaml.safe_load_all(f))
        proxy = container(template_of(docs[1]), "containers", PROXY_NAME)
        self.assertEqual((option(proxy["command"], "--pilot"), proxy["image"], proxy["securityContext"]["runAsUser"]),
                         ("p.mesh:15010", "i:2", 1400))

    def test_native_sidecar(self):
        """
        C{--native-sidecar}: C{auto} makes a Job's sidecar a native one;
        C{never} keeps it a container, and warns on stderr (exit 0).
        """
        text = yaml.safe_dump_all([SERVICE, job("Job", name="migrate"), workload("Deployment")], sort_keys=False)
        path = self.write(text)
        for mode, native, warned in [("auto", True, False), ("always", True, False), ("never", False, True)]:
            with self.subTest(mode=mode):
                out, err = io.StringIO(), io.StringIO()
                self.assertEqual(kube_inject(path, None, "p:1", "i:1", 1337, out, err, native_sidecar=mode), 0)
                self.assertEqual(out.getvalue(), inject_yaml(text, InjectOptions("p:1", "i:1", 1337, mode)))
                docs = list(yaml.safe_load_all(out.getvalue()))
                names = [c["name"] for c in template_of(docs[1])["spec"]["initContainers"]]
                self.assertEqual(names, [INIT_NAME, PROXY_NAME] if native else [INIT_NAME])
                if warned:
                    self.assertEqual(err.getvalue().splitlines(), [
                        f"txmesh kube-inject: warning: {path}: document 2 (Job migrate): the sidecar is an ordinary "
                        "container (--native-sidecar never), so the Job will not complete: txmesh-proxy keeps "
                        "running after the app's containers exit and nothing in the pod stops it; use "
                        "--native-sidecar auto for a native sidecar (Kubernetes 1.29 or later)"])
                else:
                    self.assertEqual(err.getvalue(), "")
        err = io.StringIO()
        self.assertEqual(kube_inject(path, None, "p:1", "i:1", 1337, self.out, err, native_sidecar="x"), 1)
        self.assertEqual(err.getvalue(), "txmesh kube-inject: native_sidecar: expected one of auto, always, never, "
                                         "got 'x'\n")

    def test_main_native_sidecar(self):
        """
        C{txmesh kube-inject --native-sidecar MODE}: the default is C{auto};
        C{never} warns on stderr; other values are a usage error.
        """
        path = self.write(yaml.safe_dump(job("Job")))
        target = path + ".out"
        self.addCleanup(os.remove, target)
        for mode, where in [(None, "initContainers"), ("always", "initContainers"), ("never", "containers")]:
            with self.subTest(mode=mode):
                err = io.StringIO()
                self.patch(sys, "stderr", err)
                flags = ["--native-sidecar", mode] if mode else []
                self.assertEqual(main(["kube-inject", "-f", path, "-o", target, *flags], environ={}), 0)
                with open(target) as f:
                    self.assertEqual(container(template_of(yaml.safe_load(f)), where, PROXY_NAME)["image"],
                                     "txmesh/proxy:latest")
                warned = err.getvalue().startswith(f"txmesh kube-inject: warning: {path}: document 1 (Job reviews-v1)")
                self.assertEqual((warned, len(err.getvalue().splitlines())), (True, 1) if mode == "never" else (False, 0))
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit) as e:
            parser({}).parse_args(["kube-inject", "-f", path, "--native-sidecar", "sometimes"])
        self.assertEqual(e.exception.code, 2)
        self.assertIn("invalid choice: 'sometimes'", sys.stderr.getvalue())

    def test_process(self):
        """
        C{python -m txmesh.cli kube-inject}: exit 0 with the YAML on stdout;
        a broken file exits 1 with one line on stderr.
        """
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        run = subprocess.run([sys.executable, "-m", "txmesh.cli", "kube-inject", "-f", self.path],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        self.assertEqual((run.returncode, run.stderr), (0, ""))
        docs = list(yaml.safe_load_all(run.stdout))
        self.assertEqual(docs[0], SERVICE)
        template = template_of(docs[1])
        self.assertEqual(pod_problems(template), [])
        self.assertEqual(option(container(template, "containers", PROXY_NAME)["command"], "--pilot"),
                         "txmesh-pilot.txmesh.svc:15010")
        bad = self.write("kind: CronJob\nmetadata: {name: c}\nspec: {schedule: '@daily'}\n")
        run = subprocess.run([sys.executable, "-m", "txmesh.cli", "kube-inject", "-f", bad],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        self.assertEqual((run.returncode, run.stdout), (1, ""))
        self.assertEqual(run.stderr, f"txmesh kube-inject: {bad}: document 1 (CronJob c): spec.jobTemplate: missing\n")


class ValidatorTests(SynchronousTestCase):
    """
    The structural check catches what it is there for (so a pass means something).
    """

    def test_catches(self):
        template = copy.deepcopy(template_of(inject_document(workload("Deployment"), OPTIONS)))
        spec = template["spec"]
        spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"] = 60
        spec["containers"][-1]["volumeMounts"][0]["name"] = "nope"
        spec["containers"][-1]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] = "spec.nodeName"
        spec["containers"][-1]["ports"][0]["containerPort"] = 70000
        spec["containers"][-1]["securityContext"]["runAsUser"] = "1337"
        del spec["initContainers"][0]["image"]
        spec["initContainers"][0]["readinessProbe"] = spec["containers"][-1]["readinessProbe"]
        spec["containers"][-1]["restartPolicy"] = "Always"
        spec["containers"][-1]["startupProbe"] = {"httpGet": {"path": "ready", "port": 15000}, "periodSeconds": 0}
        problems = "\n".join(pod_problems(template))
        for expected in ("expirationSeconds: 60", "no volume named 'nope'", "fieldPath: 'spec.nodeName'",
                         "port 70000", "runAsUser: '1337'", "initContainers[0].image: missing",
                         "initContainers[0].readinessProbe: only a native sidecar",
                         "containers[2].restartPolicy: not allowed", "startupProbe.httpGet.path: 'ready'",
                         "startupProbe.periodSeconds: 0"):
            self.assertIn(expected, problems)
        native = copy.deepcopy(template_of(inject_document(job("Job"), OPTIONS)))
        native["spec"]["initContainers"][-1]["restartPolicy"] = "OnFailure"
        self.assertIn("initContainers[1].restartPolicy: 'OnFailure' is not Always", "\n".join(pod_problems(native)))
