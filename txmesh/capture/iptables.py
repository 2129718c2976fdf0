"""
The netfilter rules of transparent capture, as Istio's C{istio-iptables}
writes them, with txmesh's own chain names (pure: values in, argument lists
out; nothing is run here).

In the C{nat} table:

  - C{PREROUTING -p tcp -j TXMESH_INBOUND}: inbound connections go to
    C{TXMESH_INBOUND}, which sends the captured ports to
    C{TXMESH_IN_REDIRECT} (C{REDIRECT --to-ports} the inbound capture port,
    15006);
  - C{OUTPUT -p tcp -j TXMESH_OUTPUT}: connections the host makes go to
    C{TXMESH_OUTPUT}, which lets the proxy's own traffic (its uid, and gid)
    and loopback traffic through and sends the rest of the included CIDRs to
    C{TXMESH_REDIRECT} (C{REDIRECT --to-ports} the outbound capture port,
    15001).

Chains are filled before the two jumps from C{PREROUTING} and C{OUTPUT} are
added, so a half-built chain never sees traffic, and L{clean_rules} removes
exactly the jumps and chains these rules add.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

INBOUND = "TXMESH_INBOUND"
IN_REDIRECT = "TXMESH_IN_REDIRECT"
OUTPUT = "TXMESH_OUTPUT"
REDIRECT = "TXMESH_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
"""
txmesh's chains in the C{nat} table, in the order they are made.
"""

ALL = "*"

# The source address the proxy binds for inbound passthrough connections to
# the application (Istio's 127.0.0.6 and ::6): never redirected.
_PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}
_LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
PROGRAMS = {4: "iptables", 6: "ip6tables"}


class CaptureSpecError(ValueError):
    """
    A capture option is invalid.

    @ivar option: the L{CaptureSpec} attribute at fault, e.g.
        C{"inbound_ports"}.
    @ivar reason: what is wrong with it.
    """

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


def _port(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise CaptureSpecError(option, f"{value!r} is not a port number (1-65535)")
    return value


def _ports(option: str, values: Iterable[Any]) -> tuple[int, ...]:
    if isinstance(values, str | bytes):
        raise CaptureSpecError(option, f"expected a list of ports, not {values!r}")
    ports = tuple(_port(option, v) for v in values)
    return tuple(dict.fromkeys(ports))  # duplicates would make duplicate rules


def _cidrs(option: str, values: Iterable[Any]) -> tuple[str, ...]:
    if isinstance(values, str | bytes):
        raise CaptureSpecError(option, f"expected a list of CIDRs, not {values!r}")
    cidrs = []
    for value in values:
        try:
            network = ipaddress.ip_network(str(value).strip(), strict=False)
        except ValueError:
            raise CaptureSpecError(option, f"{value!r} is not an IP address or CIDR") from None
        cidrs.append(str(network))
    return tuple(dict.fromkeys(cidrs))


def _id(option: str, value: Any, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CaptureSpecError(option, f"{value!r} is not a user or group id (an integer >= 0)")
    return value


@attrs.frozen
class CaptureSpec:
    """
    What to capture, in the terms of Istio's C{istio-iptables} options.

    @ivar proxy_uid: the uid the proxy runs as (C{-u}); its connections are
        never redirected (no loop).
    @ivar proxy_gid: the proxy's gid (C{-g}), also let through, or C{None}.
    @ivar inbound_capture_port: where inbound connections are redirected
        (C{-z}, 15006).
    @ivar outbound_capture_port: where outbound connections are redirected
        (C{-p}, 15001).
    @ivar inbound_ports: C{"*"} (every port) or the ports whose inbound
        connections are captured (C{-b}); empty: no inbound capture.
    @ivar exclude_inbound_ports: ports not captured when C{inbound_ports} is
        C{"*"} (C{-d}), e.g. 22 or the proxy's own admin port.
    @ivar exclude_outbound_ports: destination ports never captured (C{-o}).
    @ivar exclude_outbound_cidrs: destination networks never captured
        (C{-x}).
    @ivar include_outbound_cidrs: C{"*"} (every destination) or the networks
        whose outbound connections are captured (C{-i}); empty: no outbound
        capture.
    @ivar ipv6: also write the rules for C{ip6tables}.
    """

    proxy_uid: int = 1337
    proxy_gid: int | None = None
    inbound_capture_port: int = 15006
    outbound_capture_port: int = 15001
    inbound_ports: str | tuple[int, ...] = ALL
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    include_outbound_cidrs: str | tuple[str, ...] = ALL
    ipv6: bool = False

    def __attrs_post_init__(self) -> None:
        """
        Check and normalise every option.

        @raise CaptureSpecError: an option is invalid; the message names it.
        """
        set_ = object.__setattr__  # frozen: normalise in place, once
        set_(self, "proxy_uid", _id("proxy_uid", self.proxy_uid, optional=False))
        set_(self, "proxy_gid", _id("proxy_gid", self.proxy_gid, optional=True))
        set_(self, "inbound_capture_port", _port("inbound_capture_port", self.inbound_capture_port))
        set_(self, "outbound_capture_port", _port("outbound_capture_port", self.outbound_capture_port))
        if self.inbound_ports != ALL:
            set_(self, "inbound_ports", _ports("inbound_ports", self.inbound_ports))
        set_(self, "exclude_inbound_ports", _ports("exclude_inbound_ports", self.exclude_inbound_ports))
        if self.exclude_inbound_ports and self.inbound_ports != ALL:
            raise CaptureSpecError("exclude_inbound_ports",
                                   "only applies when every inbound port is captured ('*'); "
                                   "with a list, leave the port out")
        set_(self, "exclude_outbound_ports", _ports("exclude_outbound_ports", self.exclude_outbound_ports))
        set_(self, "exclude_outbound_cidrs", _cidrs("exclude_outbound_cidrs", self.exclude_outbound_cidrs))
        if self.include_outbound_cidrs != ALL:
            set_(self, "include_outbound_cidrs", _cidrs("include_outbound_cidrs", self.include_outbound_cidrs))
        if not isinstance(self.ipv6, bool):
            raise CaptureSpecError("ipv6", f"expected true or false, not {self.ipv6!r}")
        if not self.ipv6:
            for option in ("exclude_outbound_cidrs", "include_outbound_cidrs"):
                value = getattr(self, option)
                v6 = [c for c in (() if value == ALL else value) if ipaddress.ip_network(c).version == 6]
                if v6:
                    raise CaptureSpecError(option, f"{v6[0]} is an IPv6 network but ipv6 capture is off")

    @property
    def families(self) -> tuple[int, ...]:
        """
        @return: the IP versions the rules are written for: C{(4,)} or
            C{(4, 6)}.
        """
        return (4, 6) if self.ipv6 else (4,)


def _of_family(cidrs: Sequence[str], family: int) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_network(c).version == family]


def _family_rules(spec: CaptureSpec, family: int) -> list[list[str]]:
    """
    @return: the C{iptables -t nat} arguments (without the program) for one
        IP version.
    """
    rules: list[list[str]] = [["-N", chain] for chain in CHAINS]
    rules.append(["-A", REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(spec.outbound_capture_port)])
    rules.append(["-A", IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(spec.inbound_capture_port)])

    capture_inbound = spec.inbound_ports == ALL or bool(spec.inbound_ports)
    if spec.inbound_ports == ALL:
        for port in spec.exclude_inbound_ports:
            rules.append(["-A", INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN"])
        rules.append(["-A", INBOUND, "-p", "tcp", "-j", IN_REDIRECT])
    else:
        for port in spec.inbound_ports:
            rules.append(["-A", INBOUND, "-p", "tcp", "--dport", str(port), "-j", IN_REDIRECT])

    # Port exclusions come first: they hold for the proxy's calls back to
    # the workload too.
    for port in spec.exclude_outbound_ports:
        rules.append(["-A", OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN"])
    rules.append(["-A", OUTPUT, "-o", "lo", "-s", _PASSTHROUGH_SOURCE[family], "-j", "RETURN"])
    owners = [("--uid-owner", str(spec.proxy_uid))]
    if spec.proxy_gid is not None:
        owners.append(("--gid-owner", str(spec.proxy_gid)))
    for flag, owner in owners:
        if capture_inbound:
            # The proxy calling the workload's own (non-loopback) address is
            # inbound traffic to the workload: give it the inbound treatment.
            rules.append(["-A", OUTPUT, "-o", "lo", "!", "-d", _LOOPBACK[family], "-m", "owner", flag, owner,
                          "-j", IN_REDIRECT])
        # The workload calling itself over loopback stays local.
        rules.append(["-A", OUTPUT, "-o", "lo", "-m", "owner", "!", flag, owner, "-j", "RETURN"])
        # The proxy's own connections go out as they are: no loop.
        rules.append(["-A", OUTPUT, "-m", "owner", flag, owner, "-j", "RETURN"])
    rules.append(["-A", OUTPUT, "-d", _LOOPBACK[family], "-j", "RETURN"])
    for cidr in _of_family(spec.exclude_outbound_cidrs, family):
        rules.append(["-A", OUTPUT, "-d", cidr, "-j", "RETURN"])
    if spec.include_outbound_cidrs == ALL:
        rules.append(["-A", OUTPUT, "-j", REDIRECT])
    else:
        for cidr in _of_family(spec.include_outbound_cidrs, family):
            rules.append(["-A", OUTPUT, "-d", cidr, "-j", REDIRECT])

    # The jumps last: the chains are complete before traffic enters them.
    if capture_inbound:
        rules.append(["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND])
    rules.append(["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT])
    return [[PROGRAMS[family], "-t", "nat", *rule] for rule in rules]


def rules(spec: CaptureSpec) -> list[list[str]]:
    """
    The commands that set capture up, in the order they must run.

    @param spec: what to capture.
    @return: argument lists, e.g. C{["iptables", "-t", "nat", "-N",
        "TXMESH_INBOUND"]}; the C{iptables} ones, then (with C{spec.ipv6}) the
        C{ip6tables} ones.
    """
    return [command for family in spec.families for command in _family_rules(spec, family)]


_JUMPS = (("PREROUTING", INBOUND), ("OUTPUT", OUTPUT))


def _jumps_in(listing: str) -> list[list[str]]:
    """
    @param listing: the output of C{iptables -t nat -S}.
    @return: each rule of a built-in chain that jumps to a txmesh chain, as
        C{-D} arguments (repeated if the rule is there twice).
    """
    found = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "-A" and not words[1].startswith("TXMESH_") \
                and any(w in CHAINS for w in words[2:]):
            found.append(["-D", *words[1:]])
    return found


def _chains_in(listing: str) -> list[str]:
    present = {line.split()[1] for line in listing.splitlines() if line.startswith("-N ") and len(line.split()) > 1}
    return [chain for chain in CHAINS if chain in present]


def clean_rules(spec: CaptureSpec, listings: dict[str, str] | None = None) -> list[list[str]]:
    """
    The commands that remove what L{rules} adds: the jumps from
    C{PREROUTING} and C{OUTPUT}, then txmesh's chains (flushed, then
    deleted).  Nothing else in the table is touched.

    @param spec: the capture (only C{spec.ipv6} matters: which programs).
    @param listings: the current C{-t nat -S} output of each program (keys
        C{"iptables"}, C{"ip6tables"}); then only what is present is removed,
        so running the result always succeeds and a second clean has nothing
        to do.  C{None}: every command, as if all were present.
    @return: argument lists, as L{rules} returns.
    """
    commands: list[list[str]] = []
    for family in spec.families:
        program = PROGRAMS[family]
        if listings is None:
            jumps = [["-D", chain, "-p", "tcp", "-j", target] for chain, target in _JUMPS]
            chains = list(CHAINS)
        else:
            listing = listings.get(program, "")
            jumps = _jumps_in(listing)
            chains = _chains_in(listing)
        steps = jumps + [["-F", c] for c in chains] + [["-X", c] for c in chains]
        commands.extend([program, "-t", "nat", *step] for step in steps)
    return commands


def undo(command: Sequence[str]) -> list[str] | None:
    """
    @param command: one command of L{rules}.
    @return: the command that reverses it (C{-N} by C{-X}, C{-A} by C{-D}),
        or C{None} if it has none.
    """
    inverse = {"-N": "-X", "-A": "-D", "-I": "-D"}
    for i, word in enumerate(command):
        if word in inverse:
            return [*command[:i], inverse[word], *command[i + 1:]]
    return None
