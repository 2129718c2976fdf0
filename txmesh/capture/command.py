"""
C{txmesh iptables}: print, apply or remove the transparent capture rules.

    txmesh iptables [-u UID] [-g GID] [-p PORT] [-z PORT] [-b PORTS|*] [-d PORTS]
                    [-o PORTS] [-x CIDRS] [-i CIDRS|*] [--ipv6] [--apply | --clean] [--dry-run]

The options are Istio's C{istio-iptables} ones.  Without C{--apply} or
C{--clean} (or with C{--dry-run}) the commands are only printed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from txmesh.capture.apply import CaptureError, Runner, apply, clean, run_command
from txmesh.capture.iptables import ALL, CaptureSpec, CaptureSpecError, clean_rules, rules

# CaptureSpec attribute -> the option that sets it, for error messages.
OPTIONS = {
    "proxy_uid": "--proxy-uid",
    "proxy_gid": "--proxy-gid",
    "inbound_capture_port": "--inbound-capture-port",
    "outbound_capture_port": "--outbound-capture-port",
    "inbound_ports": "--inbound-ports",
    "exclude_inbound_ports": "--exclude-inbound-ports",
    "exclude_outbound_ports": "--exclude-outbound-ports",
    "exclude_outbound_cidrs": "--exclude-outbound-cidrs",
    "include_outbound_cidrs": "--include-outbound-cidrs",
    "ipv6": "--ipv6",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """
    Add the C{txmesh iptables} options to a (sub)parser.

    @param p: the parser of the C{iptables} subcommand.
    """
    p.add_argument("-u", "--proxy-uid", type=int, default=1337, help="the proxy's uid, never captured (default: 1337)")
    p.add_argument("-g", "--proxy-gid", type=int, default=None, help="the proxy's gid, never captured")
    p.add_argument("-p", "--outbound-capture-port", type=int, default=15001, metavar="PORT",
                   help="where outbound connections are redirected (default: 15001)")
    p.add_argument("-z", "--inbound-capture-port", type=int, default=15006, metavar="PORT",
                   help="where inbound connections are redirected (default: 15006)")
    p.add_argument("-b", "--inbound-ports", default=ALL, metavar="PORTS",
                   help="comma-separated inbound ports to capture, '*' for all (default), '' for none")
    p.add_argument("-d", "--exclude-inbound-ports", default="", metavar="PORTS",
                   help="with -b '*': comma-separated inbound ports not to capture (e.g. 22,15020)")
    p.add_argument("-o", "--exclude-outbound-ports", default="", metavar="PORTS",
                   help="comma-separated destination ports never captured")
    p.add_argument("-x", "--exclude-outbound-cidrs", default="", metavar="CIDRS",
                   help="comma-separated destination networks never captured")
    p.add_argument("-i", "--include-outbound-cidrs", default=ALL, metavar="CIDRS",
                   help="comma-separated destination networks captured, '*' for all (default), '' for none")
    p.add_argument("--ipv6", action="store_true", help="also write the ip6tables rules")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true",
                        help="run the commands (all or none: a failure undoes what ran); needs root/CAP_NET_ADMIN")
    action.add_argument("--clean", action="store_true",
                        help="remove txmesh's chains and jumps (and nothing else); safe to repeat")
    p.add_argument("--dry-run", action="store_true",
                   help="only print the commands (the default without --apply or --clean)")


class _Usage(Exception):
    pass


def _list(option: str, text: str, item: type) -> tuple[Any, ...]:
    values = []
    for word in text.split(","):
        word = word.strip()
        if not word:
            continue
        try:
            values.append(item(word))
        except ValueError:
            raise _Usage(f"{option}: {word!r} is not {'a port number' if item is int else 'a CIDR'}") from None
    return tuple(values)


def spec_from_args(args: argparse.Namespace) -> CaptureSpec:
    """
    @param args: parsed C{txmesh iptables} options.
    @return: the L{CaptureSpec} they describe.
    @raise ValueError: an option is invalid; the message names the option.
    """
    try:
        inbound = ALL if args.inbound_ports.strip() == ALL else _list("--inbound-ports", args.inbound_ports, int)
        include = (ALL if args.include_outbound_cidrs.strip() == ALL
                   else _list("--include-outbound-cidrs", args.include_outbound_cidrs, str))
        return CaptureSpec(
            proxy_uid=args.proxy_uid,
            proxy_gid=args.proxy_gid,
            inbound_capture_port=args.inbound_capture_port,
            outbound_capture_port=args.outbound_capture_port,
            inbound_ports=inbound,
            exclude_inbound_ports=_list("--exclude-inbound-ports", args.exclude_inbound_ports, int),
            exclude_outbound_ports=_list("--exclude-outbound-ports", args.exclude_outbound_ports, int),
            exclude_outbound_cidrs=_list("--exclude-outbound-cidrs", args.exclude_outbound_cidrs, str),
            include_outbound_cidrs=include,
            ipv6=args.ipv6,
        )
    except _Usage as e:
        raise ValueError(str(e)) from None
    except CaptureSpecError as e:
        raise ValueError(f"{OPTIONS.get(e.option, e.option)}: {e.reason}") from None


def main(args: argparse.Namespace, out: Any = sys.stdout, err: Any = sys.stderr,
         run: Runner = run_command) -> int:
    """
    Run C{txmesh iptables}.

    @param args: parsed options (see L{add_arguments}).
    @param run: runs one command (see L{txmesh.capture.apply}).
    @return: the exit code: 0, 1 if applying or cleaning failed (the reason,
        and what is needed, on C{err}), 2 for an invalid option.
    """
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        err.write(f"txmesh iptables: {e}\n")
        return 2
    if args.dry_run or not (args.apply or args.clean):
        for command in (clean_rules(spec) if args.clean else rules(spec)):
            out.write(shlex.join(command) + "\n")
        return 0
    try:
        commands = apply(spec, run) if args.apply else clean(spec, run)
    except CaptureError as e:
        err.write(f"txmesh iptables: {e}{'' if args.apply else ' (cleaning stopped)'}\n")
        return 1
    for command in commands:
        out.write(shlex.join(command) + "\n")
    if args.clean and not commands:
        out.write("txmesh iptables: nothing to clean\n")
    return 0
