"""
Running the capture rules: all of them or none (L{apply}), and removing them
again (L{clean}).

The commands run one at a time through an injectable C{run} function
(default: L{run_command}, which uses C{subprocess}), so the all-or-nothing
logic is tested without netfilter.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Sequence

import attrs

from txmesh.capture.iptables import PROGRAMS, CaptureSpec, clean_rules, rules, undo


@attrs.frozen
class Result:
    """
    How one command ended.

    @ivar code: its exit status; C{None} if it could not be started at all
        (the program is missing).
    @ivar stderr: what it printed on stderr (or why it could not start).
    @ivar stdout: what it printed on stdout.
    """

    code: int | None
    stderr: str = ""
    stdout: str = ""


Runner = Callable[[Sequence[str]], Result]


def run_command(command: Sequence[str]) -> Result:
    """
    Run one command and wait for it.

    @param command: the argument list; C{command[0]} is looked up on C{PATH}.
    @return: its L{Result}.
    """
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return Result(None, f"{command[0]}: command not found")
    except OSError as e:
        return Result(None, f"{command[0]}: {e.strerror or e}")
    except subprocess.TimeoutExpired:
        return Result(1, f"{shlex.join(command)}: no answer in 60s")
    return Result(done.returncode, done.stderr.strip(), done.stdout)


class CaptureError(Exception):
    """
    Capture could not be set up or removed; the message says what is needed.

    @ivar command: the command that failed.
    @ivar result: its L{Result}.
    """

    def __init__(self, message: str, command: Sequence[str], result: Result) -> None:
        super().__init__(message)
        self.command = list(command)
        self.result = result


def _explain(command: Sequence[str], result: Result) -> str:
    program = command[0]
    detail = " ".join(result.stderr.split()) or f"exit status {result.code}"
    if result.code is None:
        return f"{program} not found: install iptables (Debian/Ubuntu: apt-get install iptables)"
    lowered = detail.lower()
    if "permission denied" in lowered or "must be root" in lowered or "operation not permitted" in lowered:
        return f"{shlex.join(command)}: {detail}: needs root/CAP_NET_ADMIN"
    if "chain already exists" in lowered or "file exists" in lowered:
        return f"{shlex.join(command)}: {detail}: capture is already set up (txmesh iptables --clean first)"
    return f"{shlex.join(command)}: {detail}"


def apply(spec: CaptureSpec, run: Runner = run_command) -> list[list[str]]:
    """
    Run L{rules} in order; if one fails, reverse the ones that ran, newest
    first, so nothing is left half-applied.

    @param spec: what to capture.
    @param run: runs one command.
    @return: the commands run.
    @raise CaptureError: a command failed (and what ran before it was
        undone); the message names the command and what is needed.
    """
    done: list[list[str]] = []
    for command in rules(spec):
        result = run(command)
        if result.code != 0:
            stuck = []
            for previous in reversed(done):
                reverse = undo(previous)
                if reverse is not None and run(reverse).code != 0:
                    stuck.append(shlex.join(reverse))
            outcome = (f"undoing failed, left in place: run txmesh iptables --clean ({'; '.join(stuck)})" if stuck
                       else "nothing was applied")
            raise CaptureError(f"{_explain(command, result)} ({outcome})", command, result)
        done.append(command)
    return done


def clean(spec: CaptureSpec, run: Runner = run_command) -> list[list[str]]:
    """
    Remove txmesh's jumps and chains, and nothing else; removing what is not
    there is not an error, so cleaning twice is fine.

    @param spec: only C{spec.ipv6} matters (whether C{ip6tables} is cleaned).
    @param run: runs one command.
    @return: the commands run (empty if there was nothing to remove).
    @raise CaptureError: the table could not be listed or a removal failed.
    """
    listings = {}
    for family in spec.families:
        command = [PROGRAMS[family], "-t", "nat", "-S"]
        result = run(command)
        if result.code != 0:
            raise CaptureError(_explain(command, result), command, result)
        listings[PROGRAMS[family]] = result.stdout
    commands = clean_rules(spec, listings)
    for command in commands:
        result = run(command)
        if result.code != 0:
            raise CaptureError(_explain(command, result), command, result)
    return commands
