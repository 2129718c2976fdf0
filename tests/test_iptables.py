"""
Tests for L{txmesh.capture.iptables}, L{txmesh.capture.apply} and
C{txmesh iptables}: the rules as tables, all-or-nothing apply with a fake
runner, and the real thing in a network namespace.
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
import sys
from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from tests.netns import NetworkNamespace, skip_reason
from txmesh import cli
from txmesh.capture import command
from txmesh.capture.apply import CaptureError, Result, apply, clean
from txmesh.capture.iptables import CaptureSpec, CaptureSpecError, clean_rules, rules, undo


def _lines(commands: Sequence[Sequence[str]]) -> list[str]:
    return [" ".join(c) for c in commands]


DEFAULT_V4 = [
    "iptables -t nat -N TXMESH_INBOUND",
    "iptables -t nat -N TXMESH_IN_REDIRECT",
    "iptables -t nat -N TXMESH_OUTPUT",
    "iptables -t nat -N TXMESH_REDIRECT",
    "iptables -t nat -A TXMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    "iptables -t nat -A TXMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "iptables -t nat -A TXMESH_INBOUND -p tcp -j TXMESH_IN_REDIRECT",
    "iptables -t nat -A TXMESH_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    "iptables -t nat -A TXMESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j TXMESH_IN_REDIRECT",
    "iptables -t nat -A TXMESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "iptables -t nat -A TXMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "iptables -t nat -A TXMESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "iptables -t nat -A TXMESH_OUTPUT -j TXMESH_REDIRECT",
    "iptables -t nat -A PREROUTING -p tcp -j TXMESH_INBOUND",
    "iptables -t nat -A OUTPUT -p tcp -j TXMESH_OUTPUT",
]


class RulesTests(SynchronousTestCase):
    """
    L{rules} writes Istio's rules with txmesh's chain names.
    """

    def test_default(self) -> None:
        """
        The defaults are Istio's injected sidecar's: every inbound port to
        15006, every outbound destination to 15001, uid 1337 let through.
        """
        self.assertEqual(_lines(rules(CaptureSpec())), DEFAULT_V4)

    def test_table(self) -> None:
        """
        Each option changes exactly its rules.
        """
        cases: list[tuple[dict, list[str], list[str]]] = [
            # (options, rules that must be there, rules that must not)
            ({"outbound_capture_port": 16001, "inbound_capture_port": 16006},
             ["-A TXMESH_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
              "-A TXMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006"],
             ["--to-ports 15001", "--to-ports 15006"]),
            ({"inbound_ports": [8080, 9090]},
             ["-A TXMESH_INBOUND -p tcp --dport 8080 -j TXMESH_IN_REDIRECT",
              "-A TXMESH_INBOUND -p tcp --dport 9090 -j TXMESH_IN_REDIRECT",
              "-A PREROUTING -p tcp -j TXMESH_INBOUND"],
             ["-A TXMESH_INBOUND -p tcp -j TXMESH_IN_REDIRECT"]),
            ({"inbound_ports": []},
             ["-A OUTPUT -p tcp -j TXMESH_OUTPUT"],
             ["-A PREROUTING", "-A TXMESH_INBOUND", "-j TXMESH_IN_REDIRECT"]),
            ({"exclude_inbound_ports": [22, 15020]},
             ["-A TXMESH_INBOUND -p tcp --dport 22 -j RETURN",
              "-A TXMESH_INBOUND -p tcp --dport 15020 -j RETURN"],
             []),
            ({"exclude_outbound_ports": [5432]},
             ["-A TXMESH_OUTPUT -p tcp --dport 5432 -j RETURN"], []),
            ({"exclude_outbound_cidrs": ["10.0.0.0/8", "169.254.169.254"]},
             ["-A TXMESH_OUTPUT -d 10.0.0.0/8 -j RETURN",
              "-A TXMESH_OUTPUT -d 169.254.169.254/32 -j RETURN",
              "-A TXMESH_OUTPUT -j TXMESH_REDIRECT"], []),
            ({"include_outbound_cidrs": ["10.96.0.0/12"]},
             ["-A TXMESH_OUTPUT -d 10.96.0.0/12 -j TXMESH_REDIRECT"],
             ["-A TXMESH_OUTPUT -j TXMESH_REDIRECT"]),
            ({"include_outbound_cidrs": []},
             ["-A OUTPUT -p tcp -j TXMESH_OUTPUT"],
             ["-j TXMESH_REDIRECT"]),
            ({"proxy_uid": 1000, "proxy_gid": 2000},
             ["-A TXMESH_OUTPUT -m owner --uid-owner 1000 -j RETURN",
              "-A TXMESH_OUTPUT -o lo -m owner ! --gid-owner 2000 -j RETURN",
              "-A TXMESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 2000 -j TXMESH_IN_REDIRECT",
              "-A TXMESH_OUTPUT -m owner --gid-owner 2000 -j RETURN"],
             ["1337"]),
        ]
        for options, present, absent in cases:
            text = "\n".join(_lines(rules(CaptureSpec(**options))))
            for rule in present:
                self.assertIn(f"iptables -t nat {rule}", text, options)
            for fragment in absent:
                self.assertNotIn(fragment, text, options)

    def test_order(self) -> None:
        """
        Chains come first and the jumps into them last; in C{TXMESH_OUTPUT}
        port exclusions come before the owner rules, CIDR exclusions after
        the loopback rule and before the redirect.
        """
        spec = CaptureSpec(exclude_outbound_ports=[5432], exclude_outbound_cidrs=["10.0.0.0/8"])
        text = _lines(rules(spec))
        self.assertEqual(text[-2:], ["iptables -t nat -A PREROUTING -p tcp -j TXMESH_INBOUND",
                                     "iptables -t nat -A OUTPUT -p tcp -j TXMESH_OUTPUT"])
        output = [line.split(" TXMESH_OUTPUT ", 1)[1] for line in text if " -A TXMESH_OUTPUT " in line]
        self.assertEqual(output[0], "-p tcp --dport 5432 -j RETURN")
        self.assertEqual(output[-3:], ["-d 127.0.0.1/32 -j RETURN", "-d 10.0.0.0/8 -j RETURN",
                                       "-j TXMESH_REDIRECT"])

    def test_ipv6(self) -> None:
        """
        With C{ipv6}, the same rules follow for C{ip6tables}, with IPv6
        loopback addresses and only the IPv6 networks.
        """
        spec = CaptureSpec(ipv6=True, exclude_outbound_cidrs=["10.0.0.0/8", "fd00::/8"])
        commands = rules(spec)
        v4 = [c for c in commands if c[0] == "iptables"]
        v6 = [c for c in commands if c[0] == "ip6tables"]
        self.assertEqual(len(v4), len(v6))
        self.assertEqual(commands, v4 + v6)
        text6 = "\n".join(_lines(v6))
        for rule in ["-A TXMESH_OUTPUT -o lo -s ::6/128 -j RETURN",
                     "-A TXMESH_OUTPUT -o lo ! -d ::1/128 -m owner --uid-owner 1337 -j TXMESH_IN_REDIRECT",
                     "-A TXMESH_OUTPUT -d ::1/128 -j RETURN",
                     "-A TXMESH_OUTPUT -d fd00::/8 -j RETURN"]:
            self.assertIn(f"ip6tables -t nat {rule}", text6)
        self.assertNotIn("10.0.0.0/8", text6)
        self.assertNotIn("fd00::/8", "\n".join(_lines(v4)))

    def test_invalid(self) -> None:
        """
        An invalid option raises L{CaptureSpecError} naming it.
        """
        cases = [
            ({"proxy_uid": -1}, "proxy_uid"),
            ({"proxy_uid": "1337"}, "proxy_uid"),
            ({"proxy_gid": -5}, "proxy_gid"),
            ({"inbound_capture_port": 0}, "inbound_capture_port"),
            ({"outbound_capture_port": 70000}, "outbound_capture_port"),
            ({"inbound_ports": "8080"}, "inbound_ports"),
            ({"inbound_ports": [80, 65536]}, "inbound_ports"),
            ({"exclude_inbound_ports": [22], "inbound_ports": [80]}, "exclude_inbound_ports"),
            ({"exclude_outbound_ports": [True]}, "exclude_outbound_ports"),
            ({"exclude_outbound_cidrs": ["10.0.0.300/8"]}, "exclude_outbound_cidrs"),
            ({"exclude_outbound_cidrs": ["fd00::/8"]}, "exclude_outbound_cidrs"),
            ({"include_outbound_cidrs": ["everything"]}, "include_outbound_cidrs"),
            ({"include_outbound_cidrs": ["2001:db8::/32"]}, "include_outbound_cidrs"),
            ({"ipv6": "yes"}, "ipv6"),
        ]
        for options, option in cases:
            with self.assertRaises(CaptureSpecError, msg=options) as raised:
                CaptureSpec(**options)
            self.assertEqual(raised.exception.option, option)
            self.assertTrue(str(raised.exception).startswith(f"{option}: "))

    def test_duplicates(self) -> None:
        """
        A port or network named twice gives one rule.
        """
        spec = CaptureSpec(exclude_outbound_ports=[53, 53], exclude_outbound_cidrs=["10.1.2.3/8", "10.0.0.0/8"])
        self.assertEqual(spec.exclude_outbound_ports, (53,))
        self.assertEqual(spec.exclude_outbound_cidrs, ("10.0.0.0/8",))


class CleanRulesTests(SynchronousTestCase):
    """
    L{clean_rules} removes txmesh's jumps and chains and nothing else.
    """

    def test_everything(self) -> None:
        """
        Without listings, every jump and chain is removed: jumps, flushes,
        deletes.
        """
        self.assertEqual(_lines(clean_rules(CaptureSpec())), [
            "iptables -t nat -D PREROUTING -p tcp -j TXMESH_INBOUND",
            "iptables -t nat -D OUTPUT -p tcp -j TXMESH_OUTPUT",
            "iptables -t nat -F TXMESH_INBOUND",
            "iptables -t nat -F TXMESH_IN_REDIRECT",
            "iptables -t nat -F TXMESH_OUTPUT",
            "iptables -t nat -F TXMESH_REDIRECT",
            "iptables -t nat -X TXMESH_INBOUND",
            "iptables -t nat -X TXMESH_IN_REDIRECT",
            "iptables -t nat -X TXMESH_OUTPUT",
            "iptables -t nat -X TXMESH_REDIRECT",
        ])
        self.assertEqual({c[0] for c in clean_rules(CaptureSpec(ipv6=True))}, {"iptables", "ip6tables"})

    def test_listing(self) -> None:
        """
        With listings, only what is present is removed (a jump there twice
        twice); other chains and rules are left alone.
        """
        listing = "\n".join([
            "-P PREROUTING ACCEPT",
            "-P OUTPUT ACCEPT",
            "-N DOCKER",
            "-N TXMESH_OUTPUT",
            "-N TXMESH_REDIRECT",
            "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
            "-A OUTPUT -p tcp -j TXMESH_OUTPUT",
            "-A OUTPUT -p tcp -j TXMESH_OUTPUT",
            "-A TXMESH_OUTPUT -j TXMESH_REDIRECT",
        ])
        self.assertEqual(_lines(clean_rules(CaptureSpec(), {"iptables": listing})), [
            "iptables -t nat -D OUTPUT -p tcp -j TXMESH_OUTPUT",
            "iptables -t nat -D OUTPUT -p tcp -j TXMESH_OUTPUT",
            "iptables -t nat -F TXMESH_OUTPUT",
            "iptables -t nat -F TXMESH_REDIRECT",
            "iptables -t nat -X TXMESH_OUTPUT",
            "iptables -t nat -X TXMESH_REDIRECT",
        ])
        self.assertEqual(clean_rules(CaptureSpec(), {"iptables": "-P OUTPUT ACCEPT\n"}), [])

    def test_undo(self) -> None:
        """
        L{undo} reverses a chain or a rule.
        """
        self.assertEqual(undo(["iptables", "-t", "nat", "-N", "TXMESH_OUTPUT"]),
                         ["iptables", "-t", "nat", "-X", "TXMESH_OUTPUT"])
        self.assertEqual(undo(["ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "TXMESH_OUTPUT"]),
                         ["ip6tables", "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "TXMESH_OUTPUT"])
        self.assertIsNone(undo(["iptables", "-t", "nat", "-S"]))


class FakeRunner:
    """
    Runs nothing; records commands and fails the chosen ones.
    """

    def __init__(self, fail: dict[int, Result] | None = None, listing: str = "") -> None:
        self.fail = fail or {}
        self.listing = listing
        self.ran: list[list[str]] = []

    def __call__(self, command: Sequence[str]) -> Result:
        self.ran.append(list(command))
        failure = self.fail.get(len(self.ran) - 1)
        if failure is not None:
            return failure
        return Result(0, "", self.listing if command[-1] == "-S" else "")


class ApplyTests(SynchronousTestCase):
    """
    L{apply} runs all the rules or leaves none behind; L{clean} removes
    what is there.
    """

    def test_all(self) -> None:
        """
        When every command succeeds, they all ran, in order.
        """
        run = FakeRunner()
        spec = CaptureSpec(ipv6=True)
        self.assertEqual(apply(spec, run), rules(spec))
        self.assertEqual(run.ran, rules(spec))

    def test_rollback(self) -> None:
        """
        When a command fails, the ones before it are undone, newest first,
        and the error names the command.
        """
        spec = CaptureSpec(ipv6=True)
        commands = rules(spec)
        failing = len(commands) // 2 + 3  # an ip6tables command: the iptables ones are undone too
        run = FakeRunner({failing: Result(1, "ip6tables: No chain/target/match by that name.")})
        with self.assertRaises(CaptureError) as raised:
            apply(spec, run)
        self.assertEqual(raised.exception.command, commands[failing])
        self.assertIn("No chain/target/match by that name", str(raised.exception))
        self.assertIn("nothing was applied", str(raised.exception))
        self.assertEqual(run.ran[:failing + 1], commands[:failing + 1])
        self.assertEqual(run.ran[failing + 1:], [undo(c) for c in reversed(commands[:failing])])

    def test_missing_program(self) -> None:
        """
        A missing C{iptables} says to install it.
        """
        run = FakeRunner({0: Result(None, "iptables: command not found")})
        with self.assertRaises(CaptureError) as raised:
            apply(CaptureSpec(), run)
        self.assertIn("install iptables", str(raised.exception))
        self.assertEqual(len(run.ran), 1)

    def test_permission(self) -> None:
        """
        A permission error says root or C{CAP_NET_ADMIN} is needed.
        """
        denied = Result(4, "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: "
                           "Permission denied (you must be root)")
        with self.assertRaises(CaptureError) as raised:
            apply(CaptureSpec(), FakeRunner({0: denied}))
        self.assertIn("needs root/CAP_NET_ADMIN", str(raised.exception))
        with self.assertRaises(CaptureError) as raised:
            clean(CaptureSpec(), FakeRunner({0: denied}))
        self.assertIn("needs root/CAP_NET_ADMIN", str(raised.exception))

    def test_undo_fails(self) -> None:
        """
        If undoing fails too, the error says what was left and to clean.
        """
        run = FakeRunner({5: Result(1, "boom"), 6: Result(1, "still boom")})
        with self.assertRaises(CaptureError) as raised:
            apply(CaptureSpec(), run)
        self.assertIn("txmesh iptables --clean", str(raised.exception))
        self.assertNotIn("nothing was applied", str(raised.exception))

    def test_clean(self) -> None:
        """
        L{clean} lists the table and removes what is there.
        """
        listing = "-N TXMESH_REDIRECT\n-A OUTPUT -p tcp -j TXMESH_OUTPUT\n"
        run = FakeRunner(listing=listing)
        done = clean(CaptureSpec(), run)
        self.assertEqual(run.ran[0], ["iptables", "-t", "nat", "-S"])
        self.assertEqual(_lines(done), ["iptables -t nat -D OUTPUT -p tcp -j TXMESH_OUTPUT",
                                        "iptables -t nat -F TXMESH_REDIRECT",
                                        "iptables -t nat -X TXMESH_REDIRECT"])
        self.assertEqual(run.ran[1:], done)


def _parse(*argv: str) -> argparse.Namespace:
    return cli.parser({}).parse_args(["iptables", *argv])


class CommandTests(SynchronousTestCase):
    """
    C{txmesh iptables}.
    """

    def _main(self, *argv: str, run: FakeRunner | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = command.main(_parse(*argv), out, err, run or FakeRunner())
        return code, out.getvalue(), err.getvalue()

    def test_dry_run_default(self) -> None:
        """
        Without C{--apply} or C{--clean} the commands are printed, shell
        quoted, and nothing runs.
        """
        run = FakeRunner()
        code, out, err = self._main("-b", "8080", "-x", "10.0.0.0/8, 192.168.0.0/16", run=run)
        self.assertEqual((code, err, run.ran), (0, "", []))
        self.assertIn("iptables -t nat -A TXMESH_INBOUND -p tcp --dport 8080 -j TXMESH_IN_REDIRECT\n", out)
        self.assertIn("iptables -t nat -A TXMESH_OUTPUT -d 192.168.0.0/16 -j RETURN\n", out)
        self.assertIn("iptables -t nat -A TXMESH_OUTPUT -o lo '!' -d 127.0.0.1/32", out)
        code, out, _ = self._main("--apply", "--dry-run", run=run)
        self.assertEqual((code, run.ran), (0, []))
        self.assertEqual(out.splitlines()[0], "iptables -t nat -N TXMESH_INBOUND")
        code, out, _ = self._main("--clean", "--dry-run", "--ipv6", run=run)
        self.assertEqual(out.splitlines()[-1], "ip6tables -t nat -X TXMESH_REDIRECT")

    def test_options(self) -> None:
        """
        Istio's short options map to the spec.
        """
        spec = command.spec_from_args(_parse("-u", "1000", "-g", "1001", "-p", "16001", "-z", "16006", "-b", "*",
                                             "-d", "22,15020", "-o", "5432", "-x", "10.0.0.0/8",
                                             "-i", "10.96.0.0/12", "--ipv6"))
        self.assertEqual(spec, CaptureSpec(proxy_uid=1000, proxy_gid=1001, outbound_capture_port=16001,
                                           inbound_capture_port=16006, exclude_inbound_ports=(22, 15020),
                                           exclude_outbound_ports=(5432,), exclude_outbound_cidrs=("10.0.0.0/8",),
                                           include_outbound_cidrs=("10.96.0.0/12",), ipv6=True))
        self.assertEqual(command.spec_from_args(_parse("-b", "", "-i", "")).inbound_ports, ())

    def test_invalid_option(self) -> None:
        """
        An invalid option is one line naming it, and exit code 2.
        """
        for argv, option in [(("-b", "80,http"), "--inbound-ports"),
                             (("-x", "10.0.0.300"), "--exclude-outbound-cidrs"),
                             (("-b", "80", "-d", "22"), "--exclude-inbound-ports"),
                             (("-p", "0"), "--outbound-capture-port")]:
            code, out, err = self._main(*argv)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertTrue(err.startswith(f"txmesh iptables: {option}: "), err)

    def test_apply_and_clean_exclusive(self) -> None:
        """
        C{--apply} and C{--clean} together are a usage error.
        """
        self.patch(cli.argparse.ArgumentParser, "_print_message", lambda *a, **k: None)
        with self.assertRaises(SystemExit):
            _parse("--apply", "--clean")

    def test_apply_failure(self) -> None:
        """
        A failed C{--apply} exits 1 with the reason.
        """
        code, out, err = self._main("--apply", run=FakeRunner({0: Result(None, "iptables: command not found")}))
        self.assertEqual((code, out), (1, ""))
        self.assertIn("install iptables", err)
        self.assertIn("nothing was applied", err)

    def test_apply_and_clean(self) -> None:
        """
        C{--apply} prints what it ran; C{--clean} with nothing there says so.
        """
        code, out, _ = self._main("--apply")
        self.assertEqual((code, out.splitlines()), (0, [shlex.join(c) for c in rules(CaptureSpec())]))
        code, out, _ = self._main("--clean")
        self.assertEqual((code, out), (0, "txmesh iptables: nothing to clean\n"))


class NamespaceTests(SynchronousTestCase):
    """
    C{txmesh iptables --apply} and C{--clean} for real, in a network
    namespace of the test's own.
    """

    def setUp(self) -> None:
        reason = skip_reason("iptables")
        if reason:
            self.skipTest(reason)
        self.ns = NetworkNamespace(self)

    def _nat(self, program: str = "iptables") -> str:
        return self.ns.check([program, "-t", "nat", "-S"])

    def test_apply_clean(self) -> None:
        """
        C{--apply} makes the chains and jumps; C{--clean} removes exactly
        them, and again finds nothing to do; a second C{--apply} refuses
        and leaves the first in place.
        """
        ipv6 = self.ns.run(["ip6tables", "-t", "nat", "-S"]).returncode == 0
        options = ["-d", "22", "-o", "5432", "-x", "10.0.0.0/8", "-g", "1337"] + (["--ipv6"] if ipv6 else [])
        # Someone else's rule, which --clean must leave alone.
        self.ns.check(["iptables", "-t", "nat", "-N", "OTHER"])
        self.ns.check(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "OTHER"])
        before = self._nat()
        applied = self.ns.txmesh("iptables", "--apply", *options)
        self.assertEqual(applied.returncode, 0, applied.stderr)
        nat = self._nat()
        for line in ["-N TXMESH_INBOUND", "-N TXMESH_IN_REDIRECT", "-N TXMESH_OUTPUT", "-N TXMESH_REDIRECT",
                     "-A PREROUTING -p tcp -j TXMESH_INBOUND", "-A OUTPUT -p tcp -j TXMESH_OUTPUT",
                     "-A TXMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                     "-A TXMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                     "-A TXMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                     "-A TXMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                     "-A TXMESH_OUTPUT -d 10.0.0.0/8 -j RETURN"]:
            self.assertIn(line + "\n", nat)
        if ipv6:
            self.assertIn("-A TXMESH_OUTPUT -d ::1/128 -j RETURN\n", self._nat("ip6tables"))

        again = self.ns.txmesh("iptables", "--apply", *options)
        self.assertEqual(again.returncode, 1)
        self.assertIn("already set up", again.stderr)
        self.assertEqual(self._nat(), nat)

        cleaned = self.ns.txmesh("iptables", "--clean", *options)
        self.assertEqual(cleaned.returncode, 0, cleaned.stderr)
        self.assertEqual(self._nat(), before)
        if ipv6:
            self.assertNotIn("TXMESH", self._nat("ip6tables"))
        twice = self.ns.txmesh("iptables", "--clean", *options)
        self.assertEqual((twice.returncode, twice.stdout), (0, "txmesh iptables: nothing to clean\n"))

    def test_half_applied_is_undone(self) -> None:
        """
        When a command fails midway (here: a chain of ours already exists),
        what ran before it is undone.
        """
        self.ns.check(["iptables", "-t", "nat", "-N", "TXMESH_REDIRECT"])
        before = self._nat()
        applied = self.ns.txmesh("iptables", "--apply")
        self.assertEqual(applied.returncode, 1)
        self.assertIn("iptables -t nat -N TXMESH_REDIRECT", applied.stderr)
        self.assertIn("nothing was applied", applied.stderr)
        self.assertEqual(self._nat(), before)

    def test_no_permission(self) -> None:
        """
        Without C{CAP_NET_ADMIN}, C{--apply} says what it needs.
        """
        if shutil.which("setpriv") is None:
            self.skipTest("setpriv not found (util-linux)")
        done = self.ns.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                            sys.executable, "-m", "txmesh.cli", "iptables", "--apply"])
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("needs root/CAP_NET_ADMIN", done.stderr)
        self.assertNotIn("TXMESH", self._nat())
