"""
Fuzz target C{pilot_channel}: see L{fuzz.targets.pilot_channel} for what it checks.

    .venv/bin/python fuzz/pilot_channel.py -max_total_time=60
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import main  # noqa: E402

if __name__ == "__main__":
    main("pilot_channel", instrument=("txmesh",))
