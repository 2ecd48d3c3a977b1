"""A PostgreSQL server of our own, from Debian's server package: for `cattube up --cluster` and the tests.

Debian installs the server programs beside their version, off PATH (`/usr/lib/postgresql/15/bin`).
`initdb` refuses to run as root, so as root every server program runs as the `postgres` user the
package creates (`runuser`), and the data directory is handed to it. Authentication is a password
(scram-sha-256), not trust: anyone else on the machine could otherwise reach it on loopback. The
server listens on 127.0.0.1 only, keeps its unix socket in its own directory, and commits durably
(fsync on).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

SERVER_PACKAGE = "postgresql"
DEBIAN_BIN_DIRS = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be had here; the message says what to install or change."""


def server_bin_dir() -> Path:
    """The newest directory holding both `initdb` and `pg_ctl`, from Debian's layout or else PATH."""
    candidates = sorted(DEBIAN_BIN_DIRS.glob("*/bin"), key=lambda path: _version_key(path.parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise PostgresUnavailable(
        f"PostgreSQL's server programs (initdb, pg_ctl) were not found under {DEBIAN_BIN_DIRS}/*/bin or on PATH: "
        f"install Debian's `{SERVER_PACKAGE}` package (`apt-get install {SERVER_PACKAGE}`)"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def run_as() -> list[str]:
    """The prefix that runs a server program as the `postgres` user when we are root (else nothing)."""
    return ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []


def hand_over(path: Path) -> None:
    """As root, give `path` to the `postgres` user, which must also be able to reach it."""
    if os.geteuid() != 0:
        return
    try:
        shutil.chown(path, user=SERVER_USER, group=SERVER_USER)
    except LookupError:
        raise PostgresUnavailable(
            f"running as root, PostgreSQL runs as the `{SERVER_USER}` user (initdb refuses root), and there is "
            f"no such user: install Debian's `{SERVER_PACKAGE}` package, which creates it"
        ) from None
    reach = subprocess.run([*run_as(), "test", "-w", str(path)], stdin=subprocess.DEVNULL, check=False)
    if reach.returncode != 0:
        raise PostgresUnavailable(
            f"running as root, PostgreSQL runs as the `{SERVER_USER}` user, which cannot reach {path} "
            "(a directory above it is closed to other users, as /root is): choose a data directory it can "
            "reach, e.g. `--data-dir /srv/cattube`"
        )


def initdb(directory: Path, password: str) -> Path:
    """Make a new cluster in `directory/data`, listening on loopback with its socket in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    hand_over(directory)
    data = directory / "data"
    password_file = directory / "password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    hand_over(password_file)
    try:
        # --no-sync only skips initdb's own flush of the new files; the running server keeps fsync on.
        _run([*run_as(), str(server_bin_dir() / "initdb"), "--pgdata", str(data), "--username", SERVER_USER,
              "--pwfile", str(password_file), "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C",
              "--no-sync"], "initdb")  # fmt: skip
    finally:
        password_file.unlink(missing_ok=True)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            "\n# Written by CatTube: loopback only, socket beside the data, durable commits.\n"
            f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{directory}'\n"
            "fsync = on\nsynchronous_commit = on\n"
        )
    return data


def is_running(data: Path) -> bool:
    status = subprocess.run(
        [*run_as(), str(server_bin_dir() / "pg_ctl"), "status", "--pgdata", str(data)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    return status.returncode == 0  # 3: not running; 4: no data directory


def start(data: Path, port: int, log: Path) -> None:
    """`pg_ctl start --wait`: returns once the server accepts connections."""
    if not log.exists():
        log.touch()
        hand_over(log)
    _run([*run_as(), str(server_bin_dir() / "pg_ctl"), "start", "--wait", "--timeout", str(START_TIMEOUT_S),
          "--pgdata", str(data), "--log", str(log), "-o", f"-p {port}"], "pg_ctl start", log)  # fmt: skip


def stop(data: Path, log: Path | None = None) -> None:
    """Fast shutdown: open transactions are rolled back, clients disconnected, everything committed kept."""
    _run([*run_as(), str(server_bin_dir() / "pg_ctl"), "stop", "--wait", "--mode", "fast", "--pgdata", str(data)],
         "pg_ctl stop", log)  # fmt: skip


def url(password: str, port: int, database: str = "postgres") -> str:
    return f"postgresql://{SERVER_USER}:{quote(password, safe='')}@127.0.0.1:{port}/{quote(database, safe='')}"


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        server_log = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
        raise PostgresUnavailable(
            f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{result.stdout}{result.stderr}{server_log}"
        )
