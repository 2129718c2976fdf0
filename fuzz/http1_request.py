"""
Fuzz target C{http1_request}: see L{fuzz.targets.http1_request} for what it checks.

    .venv/bin/python fuzz/http1_request.py -max_total_time=60
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import main  # noqa: E402

if __name__ == "__main__":
    main("http1_request", instrument=("txmesh",))
