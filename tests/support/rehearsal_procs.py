"""Process helpers of the cluster rehearsal (tests/support/cluster_rehearsal.sh).

``ports N [B SIZE]``: N free TCP ports on 127.0.0.1 outside Ray's default ranges, one per line,
then the first port of each of B blocks of SIZE consecutive free ports (Ray's worker ports), all
distinct, so the rehearsal's Ray nodes collide neither with each other nor with another Ray on
this machine.
``running DIR TEXT``: whether a process of DIR (as for ``stop``) has TEXT in its command line,
e.g. ``ray::_ray_evaluate_chunks``: a Ray worker of that node running that task (exit 0 if so).
``stop DIR``: stop every process whose command line names DIR, and all their descendants, by PID
(TERM, then KILL): what ``ray start --temp-dir DIR/...`` started (GCS, raylets, agents, workers)
and nothing else. ``ray stop`` would stop every Ray of this machine's users.
``stop mnt:[ID]`` (DIR given as a mount namespace, as ``readlink /proc/self/ns/mnt`` prints it):
stop every process of that namespace, e.g. one rehearsal node: every node runs in a namespace of
its own, where its folder has the same path as the other nodes' (so no command line tells them
apart).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from raytrain_at.runtime.ports import free_ports


def _parents() -> dict[int, int]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return found


def _in_namespace(pid: int, namespace: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == namespace
    except OSError:
        return False


def processes_of(folder: str) -> set[int]:
    """PIDs whose command line names ``folder``, with their descendants (Ray workers rename
    themselves ``ray::...``; only the process tree finds them); for ``mnt:[ID]``, the PIDs of
    that mount namespace."""
    parents = _parents()
    # This helper and its callers (the rehearsal script, a `timeout` around it) may name the
    # folder too (--work DIR): never stop them.
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        pid = parents.get(pid, 1)
    roots = set()
    for pid in parents:
        if pid in mine:
            continue
        if folder.startswith("mnt:["):
            if _in_namespace(pid, folder):
                roots.add(pid)
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if folder.encode() in cmdline:
            roots.add(pid)
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found - mine


def stop(folder: str) -> int:
    """TERM, then KILL what is left; returns how many processes survived (0 normally)."""
    for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
        for pid in processes_of(folder):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and processes_of(folder):
            time.sleep(0.25)
        if not processes_of(folder):
            return 0
    return len(processes_of(folder))


def main(argv: list[str]) -> int:
    if argv[:1] == ["ports"] and len(argv) in (2, 4):
        print("\n".join(str(p) for p in free_ports(*(int(a) for a in argv[1:]))))
        return 0
    if len(argv) == 3 and argv[0] == "running":
        for pid in processes_of(argv[1]):
            try:
                if argv[2].encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return 0
            except OSError:
                continue
        return 1
    if len(argv) == 2 and argv[0] == "stop":
        left = stop(argv[1])
        if left:
            print(f"rehearsal_procs: {left} processes of {argv[1]} survived", file=sys.stderr)
        return 1 if left else 0
    print("usage: rehearsal_procs.py ports N [B SIZE] | running DIR TEXT | stop DIR|mnt:[ID]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
