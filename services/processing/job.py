"""One transcoding job: the message's master in, renditions and a poster into the bucket, `completed` out.

    jobs = TranscodeJobs(store, sink, settings, is_deleted=deletions.is_deleted)
    await jobs.run(message, JobContext(worker="worker-1", threads=2))   # or raises a verdict

The job reads `cattube.video.uploaded` and `cattube.video.retry-requested` events. Both must
carry `video_id`, `master.uri`, `probe` and `renditions`: the store service's retry event
repeats the master and probe of the original upload, since nothing else knows them (this
service keeps no catalog, and probing again would mean decoding an untrusted file once more).
A retry event without them fails permanently with a reason that says so.

Outputs go to the bucket under the video's prefix: `videos/{id}/{rendition}.mp4`, `poster.jpg`, and the
HLS package under `videos/{id}/hls/{version}/` (`master.m3u8`, `{rendition}/index.m3u8`, `init.mp4`,
`seg-00000.m4s`, ...). `version` is drawn from the job's run, so a job run twice (at-least-once
delivery) never rewrites a segment a player or a cache may hold: the store serves segments as
immutable, and `completed` names the version it made.

The master is read in place when the bucket is local (`BlobStore.local_path`), otherwise
downloaded into the job's work directory first. ffmpeg writes into that work directory
(`CATTUBE_DATA_DIR/processing/work`, on the bucket's filesystem by default, so outputs are
linked into the bucket rather than copied); it is removed whatever happens, and what a killed
process could not remove is swept at the next start (`sweep_work_dir`). A bucket that cannot be
used meanwhile (S3 unreachable, credentials refused) hands the job back to the queue (`RetryLater`,
saying why), like any other trouble that may pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from router.client import ReceivedMessage
from services.common import contract
from services.common.blobs import BlobInfo, BlobStore, video_key
from services.common.errors import InvalidInput, Unavailable
from services.common.media import ProcessTimeout
from services.processing import events, hls
from services.processing.events import EventSink, OutboxUnavailable, run_id
from services.processing.settings import ProcessingSettings
from services.processing.transcode import TranscodeError, TranscodeResult, transcode
from services.processing.worker import JobCancelled, JobContext, PermanentFailure, RetryLater

log = logging.getLogger(__name__)

HLS_UPLOADS_AT_ONCE = 8  # segments are small and many: several stores at once hide each one's latency (S3, fsync)


@dataclass(frozen=True)
class TranscodeRequest:
    video_id: str
    master_uri: str
    probe: contract.Probe
    renditions: list[str]


def parse_request(event: Mapping[str, Any]) -> TranscodeRequest:
    """What an uploaded or retry-requested event asks for, or `PermanentFailure` saying what is missing."""
    try:
        data = contract.parse(event, contract.VideoUploaded)
    except InvalidInput as exc:
        if exc.field == "data.video_id":
            video_id = event["data"].get("video_id")
            raise PermanentFailure(f"The job's video_id {video_id!r} is not a valid video id.") from None
        raise PermanentFailure(f"The job's event is malformed: {exc.detail}.") from None
    if data.master is None or data.probe is None:
        if event.get("type") == contract.RETRY_REQUESTED:
            raise PermanentFailure(
                "The retry request carries no master and probe (data.master.uri, data.probe); the processing "
                "service needs those of the original upload to run the video again. Upload the video again."
            )
        raise PermanentFailure("The upload event carries no master (data.master.uri) or no probe (data.probe).")
    if not data.renditions:
        raise PermanentFailure("The job asks for no renditions (data.renditions must list names such as 720p).")
    return TranscodeRequest(data.video_id, data.master.uri, data.probe, data.renditions)


def sweep_work_dir(work_dir: Path) -> tuple[int, int]:
    """Remove every job's work directory left by an earlier run (killed mid-job); returns (directories, bytes).

    Call before any worker starts: every entry belongs to a job that no longer runs (its message
    comes back after the visibility timeout, or its video was deleted meanwhile). One processing
    instance per data directory (the service holds a lock on it), so nothing here belongs to a live job.
    """
    if not work_dir.is_dir():
        return 0, 0
    swept = size = 0
    for entry in work_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            size += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(entry, ignore_errors=True)
        else:
            size += entry.lstat().st_size
            entry.unlink(missing_ok=True)
        swept += 1
    return swept, size


class TranscodeJobs:
    """The `JobHandler` of the transcode queue (see `services.processing.worker`)."""

    def __init__(
        self,
        store: BlobStore,
        sink: EventSink,
        settings: ProcessingSettings,
        *,
        is_deleted: Callable[[str], bool] = lambda video_id: False,
    ) -> None:
        self.store = store
        self.sink = sink
        self.settings = settings
        self.is_deleted = is_deleted

    async def run(self, message: ReceivedMessage, context: JobContext) -> None:
        request = parse_request(message.event)
        video_id = request.video_id
        if self.is_deleted(video_id):
            raise JobCancelled(video_id)
        run = run_id(message)
        self.sink.announce(
            events.started(
                video_id, run, worker=context.worker, attempt=message.attempt, instance=self.settings.instance
            )
        )
        await aiofiles.os.makedirs(self.settings.work_dir, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{video_id}.", dir=self.settings.work_dir))
        try:
            master = await self._master(request, work)
            result = await self._transcode(request, master, work / "out", context, run)
            if self.is_deleted(video_id):
                raise JobCancelled(video_id)
            renditions, poster_uri = await self._store_outputs(video_id, result)
            hls_uri = await self._store_hls(video_id, result.hls_dir, hls_version(run))
        finally:
            # Synchronous on purpose: it must finish even when the job is being cancelled.
            shutil.rmtree(work, ignore_errors=True)
        event = events.completed(
            video_id,
            run,
            renditions=renditions,
            skipped=result.skipped,
            poster_uri=poster_uri,
            hls_uri=hls_uri,
            elapsed_s=result.elapsed_s,
            worker=context.worker,
            attempt=message.attempt,
        )
        try:
            await self.sink.publish(event)
        except OutboxUnavailable as exc:
            raise RetryLater(f"The renditions are stored but the news could not be recorded ({exc}).") from exc

    async def report_failure(
        self, message: ReceivedMessage, context: JobContext, *, permanent: bool, reason: str, input_rejected: bool
    ) -> None:
        video_id = contract.video_id_of(message.event)
        if video_id is None:
            log.error("not announcing the failure of a job without a valid video id: %s", reason)
            return
        event = events.failed(
            video_id,
            run_id(message),
            attempt=message.attempt,
            permanent=permanent,
            reason=reason,
            input_rejected=input_rejected,
        )
        await self.sink.publish(event)

    async def _master(self, request: TranscodeRequest, work: Path) -> Path:
        gone = (
            f"The master of video {request.video_id} is no longer in the bucket (was the video deleted?); "
            "upload it again."
        )
        try:
            key = self.store.key_of(request.master_uri)
        except InvalidInput:
            raise PermanentFailure(f"The master {request.master_uri!r} is not in this service's bucket.") from None
        if not key.startswith(f"videos/{request.video_id}/"):
            raise PermanentFailure(f"The master {request.master_uri!r} does not belong to video {request.video_id}.")
        try:
            if await self.store.stat(key) is None:
                raise PermanentFailure(gone)
            local = self.store.local_path(key)
            if local is not None:
                return local
            # A remote bucket: fetch the master first, under a name of our choosing.
            path = work / f"master{Path(key).suffix}"
            async with aiofiles.open(path, "wb") as file:
                async for chunk in self.store.read(key):
                    await file.write(chunk)
            return path
        except OSError as exc:
            raise RetryLater(f"The master could not be read from the bucket ({exc}).") from exc
        except Unavailable as exc:  # S3 unreachable, or refusing the credentials: the job goes back to the queue
            raise RetryLater(f"The master could not be read from the bucket: {exc.detail}.") from exc

    async def _transcode(
        self, request: TranscodeRequest, master: Path, out_dir: Path, context: JobContext, run: str
    ) -> TranscodeResult:
        duration = request.probe.duration_s
        duration_s = duration if duration is not None and math.isfinite(duration) else 0.0
        timeout_s = self.settings.job_timeout_s(duration_s)
        reports = 0

        def on_progress(percent: float, speed: float) -> None:
            nonlocal reports
            reports += 1
            self.sink.announce(events.progress(request.video_id, run, reports, percent=percent, speed=speed))

        try:
            return await transcode(
                master,
                out_dir,
                probe=request.probe.dump(),
                renditions=request.renditions,
                threads=context.threads,
                preset=self.settings.ffmpeg_preset,
                timeout_s=timeout_s,
                max_pixels=self.settings.max_pixels,
                on_progress=on_progress,
                ffmpeg=self.settings.ffmpeg,
                memory_limit_bytes=self.settings.ffmpeg_memory_limit_bytes,
            )
        except TranscodeError as exc:
            if exc.permanent:  # undecodable or unsuitable: the master itself is at fault
                raise PermanentFailure(exc.reason, input_rejected=True) from exc
            raise RetryLater(exc.reason) from exc
        except ProcessTimeout as exc:
            raise RetryLater(
                f"The transcode ran past its time limit of {timeout_s:g} s (10x the video's length plus a minute) "
                "and was stopped; it will be tried again."
            ) from exc
        except InvalidInput as exc:
            raise PermanentFailure(f"The job cannot be done as asked: {exc.detail}.") from exc
        except FileNotFoundError as exc:
            raise PermanentFailure(
                f"The master of video {request.video_id} disappeared from the bucket before it could be read."
            ) from exc
        except OSError as exc:
            raise RetryLater(f"The transcode could not run ({exc}).") from exc

    async def _store_outputs(self, video_id: str, result: TranscodeResult) -> tuple[list[contract.Rendition], str]:
        try:
            renditions = []
            for rendition in result.renditions:
                info = await self.store.put_file(video_key(video_id, rendition.path.name), rendition.path)
                renditions.append(
                    contract.Rendition(
                        name=rendition.name,
                        uri=info.uri,
                        width=rendition.width,
                        height=rendition.height,
                        bitrate=rendition.bitrate,
                        size_bytes=info.size_bytes,
                        duration_s=rendition.duration_s,
                    )
                )
            poster = await self.store.put_file(video_key(video_id, result.poster.name), result.poster)
        except OSError as exc:
            raise RetryLater(f"The renditions could not be stored in the bucket ({exc}).") from exc
        except Unavailable as exc:
            raise RetryLater(f"The renditions could not be stored in the bucket: {exc.detail}.") from exc
        return renditions, poster.uri

    async def _store_hls(self, video_id: str, hls_dir: Path, version: str) -> str:
        """Store the HLS package under `videos/{id}/hls/{version}/`, files of a batch side by side; the master's URI."""
        gate = asyncio.Semaphore(HLS_UPLOADS_AT_ONCE)

        async def put(path: Path) -> BlobInfo:
            async with gate:
                key = video_key(video_id, hls.HLS_DIR, version, *path.relative_to(hls_dir).parts)
                return await self.store.put_file(key, path)

        stored: list[asyncio.Task[BlobInfo]] = []
        try:
            for batch in hls.upload_order(hls_dir):
                # A task group: one failing store stops the others before the work directory goes away.
                async with asyncio.TaskGroup() as group:
                    stored = [group.create_task(put(path)) for path in batch]
        except* (OSError, Unavailable) as failed:  # a full disk; S3 unreachable or refusing: back to the queue
            first = failed.exceptions[0]
            reason = first.detail if isinstance(first, Unavailable) else str(first)
            raise RetryLater(f"The HLS segments could not be stored in the bucket ({reason}).") from first
        return stored[-1].result().uri


def hls_version(run: str) -> str:
    """The folder of one run's HLS package: a digest of the run (its delivery), so another run never shares it."""
    return hashlib.sha256(run.encode()).hexdigest()[:12]
