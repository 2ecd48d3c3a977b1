"""The processing service's settings (`CATTUBE_*` variables): the autoscaler's numbers and the workers' limits."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.common.settings import CommonSettings, check_database_url

MAX_WORKERS_LIMIT = 10_000
X264_PRESETS = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
]  # fmt: skip


def cpu_count() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ProcessingSettings(CommonSettings):
    instance: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=253,
        pattern=r"^\S+$",
        description="This instance's name, stable across restarts (its deletion queue is named after it); "
        "default the hostname.",
    )
    min_workers: int = Field(0, ge=0, le=MAX_WORKERS_LIMIT, description="Workers kept even with an empty queue.")
    max_workers: int = Field(
        default_factory=cpu_count,
        ge=0,
        le=MAX_WORKERS_LIMIT,
        description="Most workers at once (0 pauses); default CPU count.",
    )
    target_backlog_per_worker: int = Field(
        1, ge=1, le=MAX_WORKERS_LIMIT, description="Messages (waiting + running here) one worker is meant to cover."
    )
    scale_in_cooldown_s: float = Field(15, ge=0, description="How long the queue must ask for fewer workers first.")
    visibility_timeout_s: float = Field(
        60, ge=1, le=43_200, description="How long a received job stays hidden; extended every third of it."
    )
    receive_wait_s: float = Field(20, gt=0, le=20, description="Long-poll wait of the receive for idle workers.")
    retry_delay_s: float = Field(10, ge=0, le=43_200, description="Delay before a transiently failed job runs again.")
    max_receive_count: int = Field(3, ge=1, le=1000, description="Receives of a job before the router dead-letters it.")
    ffmpeg_preset: X264_PRESETS = Field("veryfast", description="libx264 preset: speed against size.")
    ffmpeg_threads: int = Field(
        0, ge=0, le=256, description="ffmpeg threads per job; 0 = CPU count divided by the running workers."
    )
    ffmpeg_memory_limit_bytes: int | None = Field(None, gt=0, description="Address-space limit of each ffmpeg run.")
    job_timeout_factor: float = Field(10, gt=0, description="A job's time limit is this times the video's duration…")
    job_timeout_base_s: float = Field(60, ge=0, description="…plus this many seconds.")
    shutdown_grace_s: float = Field(
        0, ge=0, description="How long running jobs may finish after SIGTERM; 0: hand them back to the queue at once."
    )
    max_pixels: int = Field(7680 * 4320, gt=0, description="Largest picture (width x height) a master may have.")
    ffmpeg: str | None = Field(None, description="The ffmpeg binary; default the one from imageio-ffmpeg.")
    history_size: int = Field(100, ge=1, le=10_000, description="Scaling changes kept for GET /autoscaler.")
    processing_database_url: str | None = Field(
        None,
        description="The outbox's database, overriding DATABASE_URL: postgresql://... (schema `processing`, each "
        "instance's rows its own) or sqlite:///file.",
    )

    @model_validator(mode="after")
    def _min_at_most_max(self) -> ProcessingSettings:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed max_workers ({self.max_workers})")
        return self

    @field_validator("processing_database_url")
    @classmethod
    def _processing_database_url_valid(cls, value: str | None) -> str | None:
        return check_database_url(value, "CATTUBE_PROCESSING_DATABASE_URL")

    @property
    def work_dir(self) -> Path:
        """Where jobs write their outputs before they go into the bucket (same filesystem: linked, not copied)."""
        return self.data_dir / "processing" / "work"

    @property
    def outbox_file(self) -> Path:
        """The SQLite outbox of the events this service owes the router (kept across restarts)."""
        return self.data_dir / "processing" / "outbox.db"

    @property
    def outbox_database_url(self) -> str | None:
        """Where the outbox is, as a URL; None: the SQLite file `outbox_file`."""
        return self.service_database_url(self.processing_database_url)

    def job_timeout_s(self, duration_s: float) -> float:
        return self.job_timeout_factor * max(duration_s, 0.0) + self.job_timeout_base_s
