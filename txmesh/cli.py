"""
The C{txmesh} command: operator tools that need no running proxy.

    txmesh validate [-f] FILE...   check proxy config files and Istio documents offline,
                                   printing warnings; exit 1 if any is invalid
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from txmesh.config.errors import ConfigError
from txmesh.config.istio import translate
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry


def _is_istio(path: str) -> bool:
    """
    @return: whether C{path} holds Istio resources (any document with an
        C{apiVersion} of C{networking.istio.io}) rather than a proxy config.
    """
    try:
        with open(path, "rb") as f:
            docs = list(yaml.safe_load_all(f))
    except (OSError, yaml.YAMLError):
        return False  # the proxy loader reports it, with file and reason
    return any(isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("networking.istio.io")
               for d in docs)


def _validate_istio(paths: Sequence[str], out: Any, err: Any) -> int:
    """
    Translate Istio documents together, as a proxy would load them (a
    VirtualService in one file may use a DestinationRule in another).
    """
    documents = []
    for path in paths:
        with open(path, "rb") as f:
            for number, doc in enumerate(yaml.safe_load_all(f), start=1):
                if doc is not None:
                    documents.append((path, number, doc))
    try:
        result = translate(documents)
    except ConfigError as e:
        err.write(f"invalid: {e}\n")
        return 1
    out.write(f"valid: {', '.join(paths)}: {len(result.virtual_hosts)} virtual host(s), "
              f"{len(result.clusters)} cluster(s)\n")
    for warning in result.warnings:
        out.write(f"  warning: {warning}\n")
    return 0


def validate(paths: Sequence[str], out: Any = sys.stdout, err: Any = sys.stderr) -> int:
    """
    Check each file as txmesh-proxy would load it: proxy configs one by
    one, Istio documents together.

    @return: 0 if all are valid, 1 otherwise (each error is printed with its
        file, field and reason).
    """
    istio = [p for p in paths if _is_istio(p)]
    status = _validate_istio(istio, out, err) if istio else 0
    loader = ConfigLoader(FilterRegistry.from_plugins())
    for path in paths:
        if path in istio:
            continue
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
    v = commands.add_parser("validate", help="check proxy configs and Istio documents offline "
                                             "(file, field and reason on error)")
    v.add_argument("-f", "--file", action="append", default=[], metavar="FILE", dest="flagged",
                   help="a file to check (repeatable)")
    v.add_argument("files", nargs="*", metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "validate":
        files = args.flagged + args.files
        if not files:
            v.error("name at least one FILE")
        return validate(files)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
