"""Settings shared by every service: one value, read from `CATTUBE_*` variables, passed to `create_app`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """What every CatTube service needs to know: where its data lives, where the router is, the token.

    Build one in `__main__` (it reads the environment then, never at import) and pass it on:

        settings = RouterSettings(data_dir=tmp_path)
        app = create_app(settings)
    """

    # An empty variable is an unset one: compose.yaml passes `${CATTUBE_BLOB_URL:-}` and the like through.
    model_config = SettingsConfigDict(env_prefix="CATTUBE_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(Path(".cattube"), description="Where every service keeps its files and databases.")
    token: SecretStr | None = Field(
        None, description="The admin token: everything, router management and the autoscaler; unset = open."
    )
    service_token: SecretStr | None = Field(
        None, description="The service token: publish, receive/ack, subscriptions (what services call with)."
    )
    user_token: SecretStr | None = Field(
        None, description="The user token: upload, list, edit, retry, delete videos (what the page holds)."
    )
    host: str = Field("127.0.0.1", description="Interface the service listens on.")
    router_port: int = Field(8700, ge=1, le=65535)
    upload_port: int = Field(8701, ge=1, le=65535)
    processing_port: int = Field(8702, ge=1, le=65535)
    store_port: int = Field(8703, ge=1, le=65535)
    router_url: str | None = Field(
        None,
        description="Base URL of the router, or a comma-separated list of replicas (the client moves on when one "
        "fails); default http://127.0.0.1:ROUTER_PORT.",
    )
    database_url: str | None = Field(
        None,
        description="One database for the services, each in a schema of its own: postgresql://user:pass@host/db;"
        " CATTUBE_<SERVICE>_DATABASE_URL overrides it per service. A sqlite:/// URL here is the router's alone"
        " (the other services keep their files). Default: SQLite files under DATA_DIR.",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    blob_url: str | None = Field(
        None,
        description="The bucket: file:///abs/dir or s3://bucket/prefix (AWS_* variables); default file://DATA_DIR/bucket.",
    )
    # What one client can make a service hold (docs/architecture.md, Limits): see services/common/connections.py.
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request line + headers of one request (431 above)."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time a client has to send a request's headers once it starts one (408 after)."
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest pause in a request's body once its headers are in (408 after, the connection closed).",
    )
    max_connections: int = Field(
        1000, ge=1, description="Open connections served at once; requests on connections beyond get 503."
    )
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest request body on endpoints that read it whole (413 above); streaming ones bound their own.",
    )

    @property
    def router_base_url(self) -> str:
        """The router's URL, or the replicas' URLs joined by commas (for messages: clients take `router_urls`)."""
        return ",".join(self.router_urls)

    @property
    def router_urls(self) -> tuple[str, ...]:
        """The router replicas, in the order a client tries them."""
        if self.router_url is None:
            return (f"http://127.0.0.1:{self.router_port}",)
        return tuple(url.strip().rstrip("/") for url in self.router_url.split(","))

    @field_validator("router_url")
    @classmethod
    def _router_urls_valid(cls, value: str | None) -> str | None:
        # Refused at start, naming the variable: a typo here would otherwise surface as a router "down".
        if value is None or not value.strip():
            return None  # empty means unset, as it always has: the default router
        for position, url in enumerate(value.split(","), start=1):
            if not _is_http_url(url.strip()):
                raise ValueError(
                    f"CATTUBE_ROUTER_URL: expected http(s)://host[:port] URLs separated by commas; "
                    f"entry {position} ({url.strip()!r}) is not one"
                )
        return value

    def service_database_url(self, own: str | None) -> str | None:
        """A service's database: its own URL, else DATABASE_URL when that is PostgreSQL, else None (its SQLite
        file under DATA_DIR). Two services cannot share one SQLite file: their tables have the same names."""
        if own:
            return own
        if self.database_url and urlsplit(self.database_url).scheme.lower() in ("postgresql", "postgres"):
            return self.database_url
        return None

    @property
    def blob_base_url(self) -> str:
        """The bucket every service shares (upload writes masters, processing renditions, store serves)."""
        return self.blob_url or (self.data_dir / "bucket").resolve().as_uri()

    @model_validator(mode="after")
    def _tokens_differ(self) -> CommonSettings:
        # One value for two scopes would make the token's scope ambiguous.
        given = [t for t in (self.token_value, self.service_token_value, self.user_token_value) if t]
        if len(set(given)) != len(given):
            raise ValueError("CATTUBE_TOKEN, CATTUBE_SERVICE_TOKEN and CATTUBE_USER_TOKEN must differ")
        return self

    @property
    def hidden_roots(self) -> tuple[str, ...]:
        """Server paths never shown to clients, even inside an error message: the data dir and the bucket."""
        roots = [str(self.data_dir.resolve())]
        bucket = urlsplit(self.blob_base_url)
        if bucket.scheme == "file":
            roots.append(unquote(bucket.path))
        return tuple(roots)

    @property
    def token_value(self) -> str | None:
        """The admin token."""
        return self.token.get_secret_value() if self.token else None

    @property
    def service_token_value(self) -> str | None:
        return self.service_token.get_secret_value() if self.service_token else None

    @property
    def user_token_value(self) -> str | None:
        return self.user_token.get_secret_value() if self.user_token else None

    @property
    def router_token(self) -> str | None:
        """What a service calls the router with: the service token; the admin token in a one-token deployment."""
        return self.service_token_value or self.token_value

    @property
    def auth_enabled(self) -> bool:
        return any((self.token, self.service_token, self.user_token))


def check_database_url(value: str | None, variable: str) -> str | None:
    """A service's own database URL, checked at start (the message does not repeat it: it may hold a password)."""
    if value is None or not value.strip():
        return None  # empty means unset
    scheme = urlsplit(value).scheme.lower()
    if scheme not in ("postgresql", "postgres", "sqlite"):
        raise ValueError(
            f"{variable}: expected postgresql://user:password@host:port/database or sqlite:///file.db, "
            f"got a URL of scheme {scheme or 'none'!r}"
        )
    return value


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (reading it checks it: "host:x" or a port past 65535 raises)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
