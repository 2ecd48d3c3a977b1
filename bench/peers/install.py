"""What the benchmark needs and installs when it is missing: Debian's server packages and the peers' clients.

Servers come from Debian's packages with `apt-get install` when we are root, else the error names the
command to run. The Python clients are the project's `bench` extra, installed with this interpreter's
pip (they are never part of the test extra: CI starts no message broker).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib

from bench.harness import REPO

# Debian package -> its binary. RabbitMQ's own script, not the /usr/sbin wrapper: as root that one
# switches to the rabbitmq user, who could not write our temporary directory.
PACKAGES = {
    "nats-server": ("/usr/sbin/nats-server", "nats-server"),
    "redis-server": ("/usr/bin/redis-server", "redis-server"),
    "rabbitmq-server": ("/usr/lib/rabbitmq/bin/rabbitmq-server", None),
}
SERVER_PACKAGES = {"nats": "nats-server", "redis": "redis-server", "rabbitmq": "rabbitmq-server"}


def binary(package: str) -> str | None:
    """Where the package's server binary is, if installed."""
    path, name_on_path = PACKAGES[package]
    if os.access(path, os.X_OK):
        return path
    return shutil.which(name_on_path) if name_on_path else None


def ensure_servers(packages: set[str]) -> None:
    """Install the Debian packages whose binary is missing (as root), or exit naming what to install."""
    missing = sorted(p for p in packages if binary(p) is None)
    if not missing:
        return
    command = ["apt-get", "install", "-y", "-q", *missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(
            f"missing {', '.join(missing)}: install them with `sudo apt-get update && sudo {' '.join(command)}`"
        )
    print(f"installing {', '.join(missing)} from Debian's packages", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    if still := [p for p in missing if binary(p) is None]:
        raise SystemExit(f"installed {', '.join(missing)} but found no server binary for {', '.join(still)}")


def ensure_clients(modules: set[str]) -> None:
    """Install the `bench` extra with this interpreter's pip when a client module is missing."""
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    if not missing:
        return
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    command = [sys.executable, "-m", "pip", "install", "-q", *extra]
    print(f"installing the bench extra ({', '.join(extra)}) for {', '.join(missing)}", file=sys.stderr)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"could not install {', '.join(missing)}: run `{' '.join(command)}`")
    importlib.invalidate_caches()
