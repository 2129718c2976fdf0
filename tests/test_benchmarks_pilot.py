"""
Smoke test of C{benchmarks/pilot_scale.py}: a real pilot and five channel
clients, two route changes. It checks that the benchmark runs to the end and
prints its result lines; it asserts nothing about the timings.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "pilot_scale.py"
TWISTD = ROOT / ".venv" / "bin" / "twistd"


class PilotScaleSmokeTests(unittest.TestCase):
    def test_five_proxies(self):
        if not TWISTD.exists():
            raise unittest.SkipTest(f"{TWISTD} not found")
        out_dir = tempfile.mkdtemp(prefix="txmesh-pilot-scale-test-")
        self.addCleanup(lambda: __import__("shutil").rmtree(out_dir, True))
        result_json = os.path.join(out_dir, "pilot_scale.json")
        p = subprocess.run(
            [sys.executable, str(SCRIPT), "--proxies", "5", "--changes", "2", "--timeout", "60", "--wait", "30",
             "--json", result_json],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )
        output = p.stdout + p.stderr
        self.assertEqual(p.returncode, 0, output)
        self.assertRegex(
            p.stdout,
            r"pilot N=5: convergence median [\d.]+ s \(max [\d.]+ s\), RSS per proxy -?[\d.]+ MB, synced 5/5",
        )
        self.assertRegex(p.stdout, r"goal convergence <= 1 s: (met|NOT met)")
        self.assertRegex(p.stdout, r"goal RSS <= 1 MB per proxy: (met|NOT met)")
        with open(result_json) as f:
            doc = json.load(f)
        self.assertIsNone(doc["error"])
        [result] = doc["results"]
        self.assertEqual(result["n"], 5)
        self.assertEqual(len(result["changes"]), 2)
