"""
Fuzz target C{http2_server}: see L{fuzz.targets.http2_server} for what it checks.

    .venv/bin/python fuzz/http2_server.py -max_total_time=60
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import main  # noqa: E402

if __name__ == "__main__":
    main("http2_server", instrument=("txmesh", "h2", "hpack", "hyperframe"))
