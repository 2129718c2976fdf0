"""
Fuzz target C{http1_response}: see L{fuzz.targets.http1_response} for what it checks.

    .venv/bin/python fuzz/http1_response.py -max_total_time=60
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import main  # noqa: E402

if __name__ == "__main__":
    main("http1_response", instrument=("txmesh",))
