"""
The pilot's C{mesh.yaml}: mesh settings and the registries it combines.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import ConfigError
from txmesh.pilot.mesh_config import build_registries, load_pilot_settings, mesh_changes, restart_needed
from txmesh.pilot.registry.dns import DNSRegistry
from txmesh.pilot.registry.file import FileRegistry
from txmesh.pilot.snapshot import MeshConfig


class PilotSettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = task.Clock()

    def write(self, text: str) -> str:
        path = os.path.join(self.dir, "mesh.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_no_file_no_services(self) -> None:
        settings = load_pilot_settings(self.dir)
        self.assertEqual((settings.mesh, settings.registries, settings.source), (MeshConfig(), (), None))

    def test_no_file_services_dir_is_file_registry(self) -> None:
        os.mkdir(os.path.join(self.dir, "services"))
        settings = load_pilot_settings(self.dir)
        [registry] = build_registries(settings, self.clock, self.dir, poll_interval=0.25)
        self.assertIsInstance(registry, FileRegistry)

    def test_mesh_fields_override_defaults(self) -> None:
        self.write("trust_domain: example.org\noutbound_address: 'tcp:16001:interface=127.0.0.1'\n")
        settings = load_pilot_settings(self.dir, MeshConfig(app_host="10.0.0.1"))
        self.assertEqual(settings.mesh.trust_domain, "example.org")
        self.assertEqual(settings.mesh.outbound_address, "tcp:16001:interface=127.0.0.1")
        self.assertEqual(settings.mesh.app_host, "10.0.0.1")

    def test_telemetry(self) -> None:
        self.write("telemetry: {metrics: false, access_log: {format: json}, "
                   "tracing: {collector: 'http://127.0.0.1:9411/api/v2/spans', sampling: 100}}\n")
        telemetry = load_pilot_settings(self.dir).mesh.telemetry
        self.assertFalse(telemetry.metrics)
        self.assertEqual(telemetry.access_log, {"format": "json"})
        self.assertEqual(telemetry.tracing["sampling"], 100)
        self.assertTrue(load_pilot_settings(tempfile.mkdtemp()).mesh.telemetry.metrics)

    def test_outbound_traffic_policy(self) -> None:
        self.write("outbound_traffic_policy: {mode: REGISTRY_ONLY}\n")
        self.assertEqual(load_pilot_settings(self.dir).mesh.outbound_traffic_policy, "REGISTRY_ONLY")
        self.assertError("outbound_traffic_policy: {mode: NONE}\n", "outbound_traffic_policy.mode", "ALLOW_ANY")

    def test_bad_telemetry(self) -> None:
        self.assertError("telemetry: {tracing: yes}\n", "telemetry.tracing", "mapping")
        self.assertError("telemetry: {logs: {}}\n", "telemetry.logs", "unknown field")

    def test_registries_in_order(self) -> None:
        self.write(
            "registries:\n"
            "  - {type: file, path: more, poll_interval: 2}\n"
            "  - {type: dns, names: [{host: db.example.com, port: 5432, kind: A}]}\n"
        )
        registries = build_registries(load_pilot_settings(self.dir), self.clock, self.dir)
        self.assertEqual([type(r) for r in registries], [FileRegistry, DNSRegistry])

    def test_kubernetes_paths_relative_to_config_dir(self) -> None:
        """
        A relative C{token_file} or C{ca_file} is taken from CONFIG_DIR, as
        the file registry's C{path} is; an absolute one is kept.
        """
        from tests.test_registry_kubernetes import _self_signed_pem

        os.mkdir(os.path.join(self.dir, "k8s"))
        with open(os.path.join(self.dir, "k8s", "ca.pem"), "w") as f:
            f.write(_self_signed_pem())
        self.write("registries:\n"
                   "  - {type: kubernetes, api: 'https://10.0.0.1:443', token_file: k8s/token, ca_file: k8s/ca.pem}\n"
                   "  - {type: kubernetes, api: 'http://127.0.0.1:8001', token_file: /run/token}\n")
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir("/")  # a path taken relative to the working directory would not be found
        first, second = build_registries(load_pilot_settings(self.dir), self.clock, self.dir)
        self.assertEqual(first._token_file, os.path.join(self.dir, "k8s", "token"))
        self.assertEqual(second._token_file, "/run/token")
        self.assertError("registries:\n  - {type: kubernetes, api: 'https://10.0.0.1:443', ca_file: nope.pem}\n",
                         "registries[0].ca_file", f"cannot read {os.path.join(self.dir, 'nope.pem')}")

    def test_etcd_tls_files(self) -> None:
        """
        The etcd registry's C{ca_file}, C{cert_file} and C{key_file} are
        taken from CONFIG_DIR; a missing or bad one names its field.
        """
        from tests.test_registry_etcd import write_pki

        write_pki(os.path.join(self.dir, "etcd"))
        ok = "{type: etcd, endpoints: ['https://127.0.0.1:2379'], ca_file: etcd/ca.pem"
        self.write(f"registries:\n  - {ok}, cert_file: etcd/client.pem, key_file: etcd/client-key.pem}}\n")
        [registry] = build_registries(load_pilot_settings(self.dir), self.clock, self.dir)
        self.assertEqual(registry.endpoints, ["https://127.0.0.1:2379"])
        self.assertError(f"registries:\n  - {ok}, cert_file: etcd/nope.pem, key_file: etcd/client-key.pem}}\n",
                         "registries[0].cert_file", f"cannot read {os.path.join(self.dir, 'etcd', 'nope.pem')}")
        self.assertError(f"registries:\n  - {ok}, cert_file: etcd/client.pem}}\n",
                         "registries[0].key_file", "is required with cert_file")
        self.assertError(f"registries:\n  - {ok}, cert_file: etcd/client.pem, key_file: etcd/server-key.pem}}\n",
                         "registries[0].key_file", "is not the key of the certificate")
        self.assertError(f"registries:\n  - {ok}, cert_file: etcd/client-key.pem, key_file: etcd/client-key.pem}}\n",
                         "registries[0].cert_file", "holds no PEM certificate")
        self.assertError("registries:\n  - {type: etcd, endpoints: ['https://e:2379'], ca_file: etcd/client-key.pem}\n",
                         "registries[0].ca_file", "holds no PEM certificate")
        self.assertError("registries:\n  - {type: etcd, endpoints: ['http://e:2379'], ca_file: etcd/ca.pem}\n",
                         "registries[0].ca_file", "only used with https")

    def assertError(self, text: str, field: str, reason: str) -> None:
        path = self.write(text)
        with self.assertRaises(ConfigError) as e:
            build_registries(load_pilot_settings(self.dir), self.clock, self.dir)
        self.assertEqual((e.exception.source, e.exception.field), (path, field))
        self.assertIn(reason, e.exception.reason)

    def test_unknown_registry_type(self) -> None:
        self.assertError("registries: [{type: consul}]\n", "registries[0].type", "consul")

    def test_unknown_field(self) -> None:
        self.assertError("trust_domian: x\n", "trust_domian", "unknown field")

    def test_bad_outbound_address(self) -> None:
        self.assertError("outbound_address: 'nope:1'\n", "outbound_address", "endpoint")

    def test_inbound_address_needs_port(self) -> None:
        self.assertError("inbound_address: 'tcp:80'\n", "inbound_address", "{port}")

    def test_bad_file_registry_field(self) -> None:
        self.assertError("registries: [{type: file, poll_interval: -1}]\n", "registries[0].poll_interval", "positive")

    def test_dns_registry_without_names(self) -> None:
        self.assertError("registries: [{type: dns}]\n", "registries[0].names", "required")

    def test_not_yaml(self) -> None:
        self.assertError("registries: [\n", "", "not valid YAML")

    def test_restart_needed(self) -> None:
        """
        Only what the CA and the credential check are made from needs a
        restart.
        """
        before = load_pilot_settings(self.dir)
        self.write("trust_domain: example.org\nworkload_cert_ttl: 1h\nkubernetes_auth: {api: 'http://127.0.0.1:1'}\n"
                   "app_host: 10.0.0.9\n")
        after = load_pilot_settings(self.dir)
        self.assertEqual(restart_needed(before, after), ("trust_domain", "workload_cert_ttl", "kubernetes_auth"))
        self.assertEqual(restart_needed(after, after), ())

    def test_mesh_changes(self) -> None:
        """
        L{mesh_changes} names the mesh settings that differ.
        """
        self.write("app_host: 10.0.0.9\noutbound_traffic_policy: {mode: REGISTRY_ONLY}\n")
        self.assertEqual(mesh_changes(MeshConfig(), load_pilot_settings(self.dir).mesh),
                         ("app_host", "outbound_traffic_policy"))
        self.assertEqual(mesh_changes(MeshConfig(), MeshConfig()), ())
