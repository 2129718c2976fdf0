"""
Fuzz target C{config_loader}: see L{fuzz.targets.config_loader} for what it checks.

    .venv/bin/python fuzz/config_loader.py -max_total_time=60
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import main  # noqa: E402

if __name__ == "__main__":
    main("config_loader")
