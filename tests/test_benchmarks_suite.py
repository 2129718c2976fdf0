"""
Smoke test of C{benchmarks/suite.py}: the suite in quick mode on the two
wrk benchmarks (HTTP/1.1 and L4) with one-second loads. It checks that the
suite runs them to the end, prints the same-run ratio lines and the goals,
and writes the JSON (and the plots when matplotlib is there); it asserts
nothing about the timings.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
TWISTD = ROOT / ".venv" / "bin" / "twistd"
RATIO = r"(\d+\.\d{3}|n/a)"


def _missing(tool: str) -> bool:
    return shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")


class BenchmarkSuiteSmokeTests(unittest.TestCase):
    def test_quick_http1_and_l4(self):
        for tool in ("wrk", "nginx"):
            if _missing(tool):
                raise unittest.SkipTest(f"{tool} not found (scripts/bench installs it)")
        if not TWISTD.exists():
            raise unittest.SkipTest(f"{TWISTD} not found")
        out_dir = Path(tempfile.mkdtemp(prefix="txmesh-suite-test-"))
        self.addCleanup(shutil.rmtree, out_dir, True)
        p = subprocess.run(
            [sys.executable, "-m", "benchmarks.suite", "--quick", "--duration", "1", "--only", "http1,l4",
             "--results", str(out_dir), "--plots", str(out_dir)],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )
        output = p.stdout + p.stderr
        self.assertEqual(p.returncode, 0, output)
        self.assertIn("ratios measured in this run", p.stdout)
        for key in ("http1 txmesh/nginx c50", "http1 txmesh/nginx c1", "http1 txmesh/haproxy c50",
                    "http1 txmesh/nginx per proxy CPU-second", "l4 txmesh/nginx c50", "l4 txmesh/haproxy c1"):
            self.assertRegex(p.stdout, rf"(?m)^  {key}\s+{RATIO}$")
        self.assertRegex(p.stdout, r"(?m)^  http1 >= 0\.5x nginx proxy \(per core\)\s+\S+\s+x\s+(met|NOT met|not measured)$")
        self.assertRegex(p.stdout, r"(?m)^  L4 >= 0\.6x nginx stream \(per core\)\s+\S+\s+x\s+(met|NOT met|not measured)$")

        suite = json.loads((out_dir / "suite-latest.json").read_text())
        self.assertEqual(suite["benchmark"], "suite")
        self.assertEqual(set(suite["benchmarks"]), {"http1", "l4"})
        for name, run in suite["benchmarks"].items():
            self.assertEqual(run["status"], "ok", name)
            self.assertTrue(os.path.exists(run["json"]), run)
        self.assertIn("http1 txmesh/nginx c50", suite["ratios"])
        self.assertEqual(set(suite["goals"]), {"http1 >= 0.5x nginx proxy (per core)",
                                              "L4 >= 0.6x nginx stream (per core)"})
        for g in suite["goals"].values():
            self.assertEqual(set(g), {"value", "target", "unit", "met"})
        for key in ("cpu_model", "cpus", "kernel", "python", "twisted", "nginx", "haproxy"):
            self.assertIn(key, suite["machine"])

        for name, file in (("http1", "http1-latest.json"), ("l4", "l4-latest.json")):
            doc = json.loads((out_dir / file).read_text())
            self.assertEqual(doc["benchmark"], name)
            self.assertIn("direct", doc["summary"])
            self.assertEqual(len(doc["summary"]["direct"]["rps_runs"]), 1)
            for key in ("rps", "c1_rps", "c1_p50_us", "c1_p90_us", "c1_p99_us", "proxy_cpu", "proxy_rss_mb"):
                self.assertIn(key, doc["summary"]["direct"])
            self.assertIn("txmesh/nginx", doc["ratios"])
            self.assertIn("txmesh/nginx", doc["ratios_c1"])

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.assertIn("plots: skipped", p.stdout)
        else:
            for png in ("bench-http1.png", "bench-latency.png", "bench-l4.png"):
                self.assertTrue((out_dir / png).read_bytes().startswith(b"\x89PNG"), png)
            self.assertEqual(len(suite["plots"]), 3)

    def test_quick_rss(self):
        """
        The idle-memory benchmark measures the sidecar and its floors in one
        run and prints their ratios (no figure is asserted).
        """
        if not TWISTD.exists():
            raise unittest.SkipTest(f"{TWISTD} not found")
        out_dir = Path(tempfile.mkdtemp(prefix="txmesh-suite-test-"))
        self.addCleanup(shutil.rmtree, out_dir, True)
        p = subprocess.run(
            [sys.executable, "-m", "benchmarks.suite", "--quick", "--only", "rss", "--no-plots",
             "--results", str(out_dir)],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        for key in ("rss txmesh/twistd", "rss txmesh/reactor"):
            self.assertRegex(p.stdout, rf"(?m)^  {key}\s+{RATIO}$")
        result = json.loads((out_dir / "rss-latest.json").read_text())
        self.assertEqual(set(result["summary"]) - {"nginx"}, {"python", "reactor", "twistd", "txmesh"})
