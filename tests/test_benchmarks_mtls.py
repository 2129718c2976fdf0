"""
Smoke test of C{benchmarks/mtls.py}: tiny counts and one-second wrk runs
through a real pilot and two real sidecars. It checks that the benchmark
runs to the end, prints its figures and ratios and writes its JSON; it
asserts nothing about the timings.
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
SCRIPT = ROOT / "benchmarks" / "mtls.py"
TWISTD = ROOT / ".venv" / "bin" / "twistd"
NUMBER = r"[\d,]+"
RATIO = r"(\d+\.\d{3}|n/a)"


class MutualTLSBenchmarkSmokeTests(unittest.TestCase):
    def test_tiny_run(self):
        for tool in ("wrk", "nginx"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                raise unittest.SkipTest(f"{tool} not found")
        if not TWISTD.exists():
            raise unittest.SkipTest(f"{TWISTD} not found")
        out_dir = tempfile.mkdtemp(prefix="txmesh-mtls-bench-test-")
        self.addCleanup(shutil.rmtree, out_dir, True)
        result_json = os.path.join(out_dir, "mtls.json")
        p = subprocess.run(
            [sys.executable, str(SCRIPT), "--handshakes", "10", "--concurrency", "2", "--signings", "5",
             "--duration", "1", "--runs", "1", "--warmup", "0", "--timeout", "60", "--json", result_json],
            cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
        )
        output = p.stdout + p.stderr
        self.assertEqual(p.returncode, 0, output)
        for kind in ("mtls", "tls", "plain"):
            self.assertRegex(p.stdout, rf"(?m)^  {kind}\s+sequential\s+{NUMBER}/s\s+concurrent\s+{NUMBER}/s$")
        self.assertIn("the STRICT listener refuses plaintext", p.stdout)
        for kind in ("plain", "mtls"):
            self.assertRegex(p.stdout, rf"(?m)^  {kind}\s+{NUMBER} req/s\s+p50\s+{NUMBER} us\s+p99\s+{NUMBER} us")
        self.assertRegex(p.stdout, rf"CSR signings per second: sign_csr {NUMBER}/s, ChannelSecurity.sign {NUMBER}/s")
        for key in ("handshake_sequential_mtls/tls", "handshake_concurrent_mtls/plain", "rps_mtls/plain",
                    "p50_mtls/plain", "p99_mtls/plain"):
            self.assertRegex(p.stdout, rf"(?m)^  {key}\s+{RATIO}$")
        with open(result_json) as f:
            doc = json.load(f)
        self.assertEqual(set(doc["handshakes_per_s"]), {"mtls", "tls", "plain"})
        self.assertEqual(set(doc["proxies"]["summary"]), {"mtls", "plain"})
        self.assertEqual(len(doc["proxies"]["raw"]["mtls"]), 1)
        self.assertGreater(doc["signing"]["sign_csr_per_s"], 0)
