"""How many workers this process can run at once before it runs out of open files.

    cap = fleet_cap()                # from this process's RLIMIT_NOFILE
    cap.workers, cap.reason          # 96, "the open-file limit (RLIMIT_NOFILE) is 1024: ..."

Every file descriptor counts against the soft limit: the listening socket, clients' connections,
connections to the router, the outbox's SQLite files, and what each running job holds. An idle
worker holds nothing of its own (the pool's one receive loop polls for all of them), but any
worker may become busy at once, so the fleet is capped by what busy workers would need:

    FILES_PER_JOB = 8    ffmpeg's stdout and stderr pipes for the whole run (measured: 2 per job),
                         plus, for moments, the pipes of spawning it (4 + 2), the outputs being
                         measured, and a file being copied into the bucket
    FILES_RESERVED = 256 the server's own sockets and files, whatever the fleet

    workers = (soft limit - FILES_RESERVED) // FILES_PER_JOB     1,024 -> 96; 65,536 -> 8,160

A fleet past that does not slow down: it fails jobs with "Too many open files" and refuses
clients, so the autoscaler never grows past it, and `GET /autoscaler` says why.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

FILES_PER_JOB = 8
FILES_RESERVED = 256


@dataclass(frozen=True)
class FleetCap:
    workers: int | None
    """The most workers this process's limits allow; None when no limit binds."""
    reason: str


def open_files_limit() -> int | None:
    """This process's soft RLIMIT_NOFILE, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def fleet_cap(limit: int | None = None) -> FleetCap:
    """The fleet size the open-file limit allows (`limit` defaults to this process's)."""
    limit = open_files_limit() if limit is None else limit
    if limit is None:
        return FleetCap(None, "the open-file limit (RLIMIT_NOFILE) is unlimited")
    workers = max(0, (limit - FILES_RESERVED) // FILES_PER_JOB)
    return FleetCap(
        workers,
        f"the open-file limit (RLIMIT_NOFILE) is {limit}: {FILES_RESERVED} kept for the service's own "
        f"connections and files, {FILES_PER_JOB} per running job (ffmpeg's pipes, outputs being measured "
        f"and stored) leave room for {workers} workers; raise it (ulimit -n) for more",
    )
