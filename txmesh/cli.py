"""
The C{txmesh} command: operator tools that need no running proxy.

    txmesh validate FILE...     check proxy config files, printing their warnings; exit 1 if any is invalid
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry


def validate(paths: Sequence[str], out=sys.stdout, err=sys.stderr) -> int:
    """
    Load each config file as txmesh-proxy would.

    @return: 0 if all are valid, 1 otherwise (each error is printed with its
        file, field and reason).
    """
    loader = ConfigLoader(FilterRegistry.from_plugins())
    status = 0
    for path in paths:
        try:
            config = loader.load_file(path)
        except ConfigError as e:
            err.write(f"invalid: {e}\n")
            status = 1
        else:
            out.write(f"valid: {path}: {len(config.listeners)} listener(s), {len(config.clusters)} cluster(s)\n")
            for warning in config.warnings:
                out.write(f"  warning: {warning}\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of the C{txmesh} console script.
    """
    parser = argparse.ArgumentParser(prog="txmesh", description="txmesh operator tools")
    commands = parser.add_subparsers(dest="command", required=True)
    v = commands.add_parser("validate", help="check proxy config files (file, field and reason on error)")
    v.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "validate":
        return validate(args.files)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
