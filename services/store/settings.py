"""The store service's settings (`CATTUBE_*` variables): its catalog, the bucket, and the addresses it hands out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.common.settings import CommonSettings, check_database_url


class StoreSettings(CommonSettings):
    catalog_path: Path | None = Field(
        None, description="SQLite file of the catalog; default DATA_DIR/store/catalog.db."
    )
    store_database_url: str | None = Field(
        None,
        description="The catalog's database, overriding DATABASE_URL: postgresql://... (schema `store`, shared by "
        "every store replica) or sqlite:///file.",
    )
    store_public_url: str | None = Field(
        None, description="Address the router pushes events to and pages link to; default http://127.0.0.1:STORE_PORT."
    )
    upload_public_url: str | None = Field(
        None, description="Address of the upload service the web page posts to; default http://127.0.0.1:UPLOAD_PORT."
    )
    processing_public_url: str | None = Field(
        None,
        description="Address of the processing service the page links to; default http://127.0.0.1:PROCESSING_PORT.",
    )
    subscription: str = Field("store", description="Name of the store's push subscription on the router.")
    transcode_subscription: str = Field(
        "transcode", description="The processing queue whose dead letters mean a video failed for good."
    )
    scaling_history_size: int = Field(1000, ge=1, le=100_000, description="Autoscaler changes kept for the chart.")
    applied_retention_s: float = Field(
        8 * 86_400, gt=0, description="How long applied event ids are kept to recognize repeats (> router retention)."
    )
    live_heartbeat_s: float = Field(15, gt=0, description="Keep-alive comment interval on GET /events streams.")
    live_queue_size: int = Field(1000, ge=1, description="Changes buffered per /events client before it is dropped.")
    playback: Literal["serve", "redirect"] = Field(
        "serve",
        description="serve: renditions and posters stream through the store; redirect: a 307 to a presigned URL "
        "of the object, so bytes flow straight from the bucket (needs an s3:// CATTUBE_BLOB_URL).",
    )
    playback_url_expiry_s: float = Field(
        300, gt=0, le=7 * 86_400, description="How long a redirect's presigned URL stays valid (S3 allows 7 days)."
    )

    @model_validator(mode="after")
    def _redirect_needs_a_bucket_url(self) -> StoreSettings:
        # Refused at start: a file:// store has no URL a browser could be sent to.
        if self.playback == "redirect" and not self.blob_base_url.startswith("s3://"):
            raise ValueError(
                "CATTUBE_PLAYBACK=redirect needs an s3:// CATTUBE_BLOB_URL (a file:// bucket has no URL to redirect "
                f"to; it is {self.blob_base_url}): set CATTUBE_PLAYBACK=serve or use an S3 bucket"
            )
        return self

    @field_validator("store_database_url")
    @classmethod
    def _store_database_url_valid(cls, value: str | None) -> str | None:
        return check_database_url(value, "CATTUBE_STORE_DATABASE_URL")

    @property
    def catalog_file(self) -> Path:
        return self.catalog_path or self.data_dir / "store" / "catalog.db"

    @property
    def catalog_database_url(self) -> str | None:
        """Where the catalog is, as a URL; None: the SQLite file `catalog_file`."""
        return self.service_database_url(self.store_database_url)

    @property
    def public_base_url(self) -> str:
        return (self.store_public_url or f"http://127.0.0.1:{self.store_port}").rstrip("/")

    @property
    def upload_base_url(self) -> str:
        return (self.upload_public_url or f"http://127.0.0.1:{self.upload_port}").rstrip("/")

    @property
    def processing_base_url(self) -> str:
        return (self.processing_public_url or f"http://127.0.0.1:{self.processing_port}").rstrip("/")
