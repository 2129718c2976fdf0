"""
C{workload_cert_ttl} in the pilot's C{mesh.yaml}: configurable down to
minutes, and refused below one (proxies renew at half-life, so a shorter
certificate would be renewed every few seconds), with the file and field
named.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import ConfigError
from txmesh.pilot.mesh_config import load_pilot_settings


class CertificateTTLTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txmesh-cert-ttl-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "mesh.yaml")

    def load(self, ttl: str) -> float:
        with open(self.path, "w") as f:
            f.write(f"workload_cert_ttl: {ttl}\n")
        return load_pilot_settings(self.dir).workload_cert_ttl

    def test_default(self) -> None:
        self.assertEqual(load_pilot_settings(self.dir).workload_cert_ttl, 24 * 3600.0)

    def test_minutes_taken(self) -> None:
        self.assertEqual(self.load("1m"), 60.0)
        self.assertEqual(self.load("90s"), 90.0)
        self.assertEqual(self.load("5m"), 300.0)

    def test_under_a_minute_refused(self) -> None:
        for ttl in ("59s", "30s", "59999ms", "0s"):
            with self.assertRaises(ConfigError, msg=ttl) as cm:
                self.load(ttl)
            self.assertEqual((cm.exception.source, cm.exception.field), (self.path, "workload_cert_ttl"), ttl)
            self.assertIn("at least 1m", cm.exception.reason, ttl)
            self.assertIn(ttl, str(cm.exception), ttl)
