"""
C{twistd txmesh-proxy --pilot ...}: the bootstrap made from the command line.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry
from txmesh.pilot.channel_security import load_channel_security
from txmesh.proxy.bootstrap import DEFAULT_ADMIN, PilotOptions, bootstrap_document, pilot_address


class PilotAddressTests(SynchronousTestCase):
    def test_shorthand(self) -> None:
        self.assertEqual(pilot_address("pilot.mesh:15010"), "tcp:pilot.mesh:15010")
        self.assertEqual(pilot_address("127.0.0.1:15010"), "tcp:127.0.0.1:15010")
        self.assertEqual(pilot_address("[::1]:15010"), "tcp:\\:\\:1:15010")

    def test_endpoint_strings_kept(self) -> None:
        for value in ("tcp:127.0.0.1:15010", "tcp:host=pilot:port=15010", "unix:/run/pilot.sock"):
            self.assertEqual(pilot_address(value), value)


class BootstrapDocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.root = os.path.join(self.dir, "root-cert.pem")
        with open(self.root, "wb") as f:
            f.write(load_channel_security(os.path.join(self.dir, "ca"), "cluster.local", reactor).root_pem)
        self.loader = ConfigLoader(FilterRegistry.from_plugins())

    def test_no_file(self) -> None:
        """
        Without a file the command line is enough: node from the options
        (host name by default), the default admin, the pilot section.
        """
        doc = bootstrap_document(None, PilotOptions(["pilot:15010"], self.root, namespace="shop"), "host-1")
        self.assertEqual(doc["node"], {"id": "host-1", "namespace": "shop"})
        self.assertEqual(doc["admin"], {"address": DEFAULT_ADMIN})
        config = self.loader.load_document(doc, "<command line>")
        self.assertEqual(config.pilot.addresses, ("tcp:pilot:15010",))
        self.assertEqual(config.node.namespace, "shop")
        self.assertEqual(config.listeners, ())

    def test_file_completed_not_changed(self) -> None:
        base = {"node": {"id": "from-file"}, "pilot": {"addresses": ["tcp:old:1"], "token": "t",
                                                       "outbound_address": "tcp:16001"}}
        doc = bootstrap_document(base, PilotOptions(["a:1", "tcp:b:2"], self.root, token_file="/tok"), "host-1")
        self.assertEqual(doc["node"], {"id": "from-file"})
        self.assertNotIn("admin", doc)
        self.assertEqual(doc["pilot"], {"addresses": ["tcp:a:1", "tcp:b:2"], "token_file": "/tok",
                                        "outbound_address": "tcp:16001", "ca_file": self.root})
        self.assertEqual(base["pilot"]["addresses"], ["tcp:old:1"])

    def test_sidecar_options(self) -> None:
        """
        What kube-inject passes: an admin on every address (for the
        kubelet's probe), the service account, the inbound and app ports.
        """
        options = PilotOptions(["pilot:15010"], self.root, admin="tcp:15000", service_account="reviews",
                               inbound_port=15006, app_port=9080)
        doc = bootstrap_document(None, options, "pod-1")
        config = self.loader.load_document(doc, "<command line>")
        self.assertEqual(config.admin_address, "tcp:15000")
        self.assertEqual((config.pilot.service_account, config.pilot.inbound_port, config.pilot.app_port),
                         ("reviews", 15006, 9080))

    def test_node_labels(self) -> None:
        """
        --label, --router, --capture and --app-protocol become node labels
        the pilot reads.
        """
        options = PilotOptions(["pilot:15010"], self.root, labels=(("istio", "ingressgateway"),), router=True,
                               capture=True, app_protocol="grpc")
        config = self.loader.load_document(bootstrap_document({"node": {"labels": {"team": "a"}}}, options, "h"),
                                           "<command line>")
        self.assertEqual(dict(config.node.labels), {
            "team": "a", "istio": "ingressgateway", "txmesh.io/proxy-type": "router",
            "txmesh.io/interception": "REDIRECT", "txmesh.io/app-protocol": "grpc"})

    def test_missing_ca_is_the_loaders_error(self) -> None:
        doc = bootstrap_document(None, PilotOptions(["pilot:15010"]), "host-1")
        with self.assertRaises(ConfigError) as e:
            self.loader.load_document(doc, "<command line>")
        self.assertEqual(e.exception.field, "pilot.ca_file")


class PluginTests(SynchronousTestCase):
    def options(self, *argv: str) -> usage.Options:
        from twisted.plugins.txmesh_plugins import ProxyOptions

        options = ProxyOptions()
        options.parseOptions(list(argv))
        return options

    def test_config_or_pilot_required(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            self.options()
        self.assertIn("--pilot", str(e.exception))

    def test_pilot_needs_a_root(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            self.options("--pilot", "127.0.0.1:15010")
        self.assertIn("--pilot-ca", str(e.exception))

    def test_pilot_only_makes_a_service(self) -> None:
        from twisted.plugins.txmesh_plugins import txmeshProxy

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        root = os.path.join(directory, "root.pem")
        with open(root, "wb") as f:
            f.write(load_channel_security(os.path.join(directory, "ca"), "cluster.local", reactor).root_pem)
        options = self.options("--pilot", "127.0.0.1:15010", "--pilot", "tcp:127.0.0.1:15020",
                               "--pilot-ca", root, "--node-id", "web-1", "--namespace", "shop")
        service = txmeshProxy.makeService(options)
        self.assertEqual(service.config.pilot.addresses, ("tcp:127.0.0.1:15010", "tcp:127.0.0.1:15020"))
        self.assertEqual((service.config.node.id, service.config.node.namespace), ("web-1", "shop"))
