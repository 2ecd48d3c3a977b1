"""The upload service's settings (`CATTUBE_*` variables): limits on what is accepted, where it goes."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, field_validator

from services.common.errors import InvalidInput
from services.common.settings import CommonSettings, check_database_url
from services.upload.metadata import parse_renditions


class UploadSettings(CommonSettings):
    max_upload_bytes: int = Field(20 * 2**30, gt=0, description="Largest master accepted (413 above).")
    default_renditions: str = Field(
        "1080p,720p,480p,360p", description="Renditions made when an upload names none (comma-separated)."
    )
    max_pixels: int = Field(7680 * 4320, gt=0, description="Largest picture (width x height) a master may have.")
    max_duration_s: float = Field(21600, gt=0, description="Longest master accepted, in seconds.")
    probe_timeout_s: float = Field(60, gt=0, description="How long probing one upload may take before it is refused.")
    probe_memory_limit_bytes: int = Field(1 << 30, gt=0, description="Address space the probe's child may use.")
    max_concurrent_probes: int = Field(2, ge=1, le=64, description="Probes running at once (each is a process).")
    outbox_path: Path | None = Field(
        None, description="SQLite file of uploads and the outbox; default DATA_DIR/upload."
    )
    upload_database_url: str | None = Field(
        None,
        description="Uploads and the outbox, overriding DATABASE_URL: postgresql://... (schema `upload`, shared by "
        "every upload replica) or sqlite:///file.",
    )
    instance: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=253,
        pattern=r"^\S+$",
        description="This replica's name, stable across restarts: on a shared database it sweeps only the uploads "
        "it was receiving when it stopped; default the hostname.",
    )
    upload_public_url: str | None = Field(
        None, description="Base URL of this service in status_url; default the URL the request came to."
    )
    store_public_url: str | None = Field(
        None,
        description="The store's address (as its CATTUBE_STORE_PUBLIC_URL): status_url then leads to the video's "
        "record there, which anyone can follow; unset, status_url is this service's GET /videos/{id}.",
    )
    cors_origins: list[str] | None = Field(
        None, description="Origins allowed to POST from a browser (JSON list); default the store's page."
    )
    resumable_expiry_s: float = Field(
        24 * 3600,
        gt=0,
        description="How long an unfinished resumable (tus) upload is kept after its last write; then it is swept.",
    )
    relay_batch_size: int = Field(100, ge=1, le=1000, description="Outbox events published per request.")
    relay_backoff_initial_s: float = Field(0.5, gt=0, description="First retry delay when the router is down.")
    relay_backoff_max_s: float = Field(30, gt=0, description="Longest retry delay when the router is down.")

    @field_validator("default_renditions")
    @classmethod
    def _known_renditions(cls, value: str) -> str:
        try:
            names = parse_renditions(value, "default_renditions")
        except InvalidInput as exc:
            raise ValueError(exc.detail) from None
        if not names:
            raise ValueError("name at least one rendition")
        return value

    @field_validator("upload_database_url")
    @classmethod
    def _upload_database_url_valid(cls, value: str | None) -> str | None:
        return check_database_url(value, "CATTUBE_UPLOAD_DATABASE_URL")

    @property
    def default_rendition_names(self) -> tuple[str, ...]:
        return parse_renditions(self.default_renditions, "default_renditions")

    @property
    def outbox_file(self) -> Path:
        return self.outbox_path or self.data_dir / "upload" / "outbox.db"

    @property
    def outbox_database_url(self) -> str | None:
        """Where uploads and the outbox are, as a URL; None: the SQLite file `outbox_file`."""
        return self.service_database_url(self.upload_database_url)

    @property
    def partials_dir(self) -> Path:
        """Where unfinished resumable uploads wait for their next bytes (local scratch, never the bucket)."""
        return self.data_dir / "upload" / "partials"

    @property
    def spool_dir(self) -> Path:
        """Local scratch for the probe's copy of uploads bound for a remote bucket (emptied at start-up)."""
        return self.data_dir / "upload" / "spool"

    @property
    def allowed_origins(self) -> list[str]:
        if self.cors_origins is not None:
            return self.cors_origins
        return [f"http://127.0.0.1:{self.store_port}", f"http://localhost:{self.store_port}"]
