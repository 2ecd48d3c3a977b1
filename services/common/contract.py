"""The contract between services, in code: event types, the rendition ladder, and each event's `data`.

Producers build an event's data from its model, consumers read it back through `parse`, so a
field renamed on one side fails the other side's tests instead of a running pipeline.

    data = TranscodeStarted(video_id="v1", worker="worker-1", attempt=1)
    event = new_event(TRANSCODE_STARTED, "cattube/processing", data.dump(), id=..., partitionkey="v1")

    started = parse(event, TranscodeStarted)    # InvalidInput("data.attempt", "a valid integer") if malformed
    anything = parse(event)                     # the model is chosen by the event's `type`

Models accept more fields than they name (docs/architecture.md: more fields may be added, none
renamed) and keep them; `dump()` gives back what was set, so a consumer that passes data on
(the store's retry repeats the upload's master and probe) passes it on unchanged. Numbers are
strict: `true` is not an attempt count and `"5"` is not a percentage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, TypeVar, overload

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError
from pydantic_core import PydanticCustomError

from services.common.blobs import video_key
from services.common.errors import InvalidInput

UPLOADED: Final = "cattube.video.uploaded"
RETRY_REQUESTED: Final = "cattube.video.retry-requested"
VIDEO_READY: Final = "cattube.video.ready"
VIDEO_FAILED: Final = "cattube.video.failed"
VIDEO_DELETED: Final = "cattube.video.deleted"
VIDEO_UPDATED: Final = "cattube.video.updated"
TRANSCODE_STARTED: Final = "cattube.transcode.started"
TRANSCODE_PROGRESS: Final = "cattube.transcode.progress"
TRANSCODE_COMPLETED: Final = "cattube.transcode.completed"
TRANSCODE_FAILED: Final = "cattube.transcode.failed"
PROCESSING_SCALED: Final = "cattube.processing.scaled"
DEAD_LETTERED: Final = "cattube.router.dead-lettered"

LADDER: Final[Mapping[str, int]] = {
    "2160p": 2160,
    "1440p": 1440,
    "1080p": 1080,
    "720p": 720,
    "480p": 480,
    "360p": 360,
    "240p": 240,
    "144p": 144,
}
"""Every rendition name and its shorter side in pixels (as displayed, rotation applied), largest first."""
RENDITION_NAMES: Final[tuple[str, ...]] = tuple(LADDER)

VIDEO_ID_EXPECTED: Final = "a video id: 1 to 64 characters of A-Z a-z 0-9 _ -"

# The HLS package's layout, which processing writes and the store serves (links inside it are relative):
# {version}/master.m3u8, {version}/{rendition}/index.m3u8, .../init.mp4, .../seg-00000.m4s, ...
HLS_MASTER: Final = "master.m3u8"
HLS_MEDIA_PLAYLIST: Final = "index.m3u8"
HLS_INIT: Final = "init.mp4"
HLS_SEGMENT_TEMPLATE: Final = "seg-%05d.m4s"
"""ffmpeg's template; the numbers grow past five digits in a video longer than 4.6 days of 4 s segments."""
HLS_FILE_PATTERN: Final = r"^(index\.m3u8|init\.mp4|seg-[0-9]{5,9}\.m4s)$"
"""Every name a rendition's folder may hold."""


def _video_id(value: Any) -> Any:
    try:
        video_key(value, "x")
    except InvalidInput:
        raise PydanticCustomError("video_id", VIDEO_ID_EXPECTED) from None
    return value


def _rendition_name(value: Any) -> Any:
    if value not in LADDER:
        raise PydanticCustomError("rendition_name", "a rendition name out of {names}", {"names": ", ".join(LADDER)})
    return value


VideoId = Annotated[str, BeforeValidator(_video_id)]
RenditionName = Annotated[str, BeforeValidator(_rendition_name)]
Uri = Annotated[str, Field(min_length=1)]


class EventData(BaseModel):
    """The `data` of one CloudEvent; `dump()` is what goes on the wire."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Master(EventData):
    uri: Uri
    size_bytes: int | None = None
    sha256: str | None = None
    content_type: str | None = None


class Probe(EventData):
    """What the upload's probe found (`services.upload.probe`); the processing service checks the values."""

    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    video_codec: str | None = None
    audio_codec: str | None = None
    rotation: int | float | None = None


class VideoUploaded(EventData):
    """`cattube.video.uploaded`; a retry request repeats it (`RetryRequested`)."""

    video_id: VideoId
    title: str | None = None
    master: Master | None = None
    probe: Probe | None = None
    renditions: list[RenditionName] | None = None


class RetryRequested(VideoUploaded):
    round: int | None = None


class TranscodeStarted(EventData):
    video_id: VideoId
    worker: str | None = None
    attempt: int | None = None
    instance: str | None = None
    """The processing instance running the job (`CATTUBE_INSTANCE`)."""


class TranscodeProgress(EventData):
    video_id: VideoId
    percent: float
    speed: float | None = None


class Rendition(EventData):
    name: RenditionName
    uri: Uri
    width: int | None = None
    height: int | None = None
    bitrate: int | None = None
    size_bytes: int | None = None
    duration_s: float | None = None


class Poster(EventData):
    uri: Uri


class Hls(EventData):
    uri: Uri
    """The HLS master playlist's URI in the bucket; its media playlists and segments sit beside it."""


class TranscodeCompleted(EventData):
    video_id: VideoId
    renditions: list[Rendition]
    skipped: list[RenditionName] | None = None
    poster: Poster | None = None
    hls: Hls | None = None
    """None in events from before HLS packaging: such a video plays its MP4 rungs only."""
    elapsed_s: float | None = None
    worker: str | None = None
    attempt: int | None = None


class TranscodeFailed(EventData):
    video_id: VideoId
    attempt: int | None = None
    permanent: bool = False
    reason: str | None = None
    input_rejected: bool = False
    """The master itself cannot become what was asked (undecodable, smaller than every rendition asked for,
    larger than the deployment takes): a retry of the same request cannot succeed, only a new upload."""


class ProcessingScaled(EventData):
    from_: NonNegativeInt = Field(alias="from")
    to: NonNegativeInt
    backlog: NonNegativeInt = 0
    in_flight: NonNegativeInt = 0
    """Queue-wide: jobs received by any instance and not yet settled."""
    busy: NonNegativeInt | None = None
    """This instance's own running jobs (what it sized itself on, with the backlog)."""
    reason: str = ""
    instance: str | None = None
    """The processing instance that scaled (`CATTUBE_INSTANCE`); each instance has its own fleet."""


class RecordRendition(EventData):
    name: RenditionName
    url: str
    uri: str | None = None
    width: int | None = None
    height: int | None = None
    size_bytes: int | None = None
    bitrate: int | None = None
    duration_s: float | None = None


class VideoRecord(EventData):
    """`cattube.video.ready` / `.failed`: the catalog record (`GET /videos/{id}`) plus the bucket URIs."""

    video_id: VideoId
    status: str
    title: str | None = None
    description: str | None = None
    renditions: list[RecordRendition] = []
    poster_url: str | None = None
    error: str | None = None
    last_error: str | None = None
    progress: float | None = None
    speed: float | None = None
    requested: list[RenditionName] = []
    skipped: list[RenditionName] = []
    attempt: int | None = None
    retries: int | None = None
    master: Master | None = None
    poster_uri: str | None = None
    hls_url: str | None = None
    """The HLS master playlist as the store serves it (None for a video made before HLS packaging)."""
    hls_uri: str | None = None


class VideoDeleted(EventData):
    video_id: VideoId
    blob_uris: list[str] = []
    prefix: str | None = None


class VideoUpdated(EventData):
    """`cattube.video.updated`: a person edited the title or description; `revision` counts the edits of the video.

    The data is the whole of what a person edits, not the difference: a consumer keeps the highest
    revision it has seen and ignores older ones, whatever order they arrive in.
    """

    video_id: VideoId
    title: str | None = None
    description: str | None = None
    revision: PositiveInt


class DeadLettered(EventData):
    """`cattube.router.dead-lettered`; the router adds why it gave up (`limit`, ...) as more fields."""

    subscription: str
    event_id: str | None = None
    event_source: str | None = None
    event_type: str | None = None
    attempts: int | None = None
    last_error: str | None = None


MODELS: Final[Mapping[str, type[EventData]]] = {
    UPLOADED: VideoUploaded,
    RETRY_REQUESTED: RetryRequested,
    VIDEO_READY: VideoRecord,
    VIDEO_FAILED: VideoRecord,
    VIDEO_DELETED: VideoDeleted,
    VIDEO_UPDATED: VideoUpdated,
    TRANSCODE_STARTED: TranscodeStarted,
    TRANSCODE_PROGRESS: TranscodeProgress,
    TRANSCODE_COMPLETED: TranscodeCompleted,
    TRANSCODE_FAILED: TranscodeFailed,
    PROCESSING_SCALED: ProcessingScaled,
    DEAD_LETTERED: DeadLettered,
}
"""The model of every event type of the contract."""

D = TypeVar("D", bound=EventData)


@overload
def parse(event: Mapping[str, Any]) -> EventData: ...
@overload
def parse(event: Mapping[str, Any], model: type[D]) -> D: ...
def parse(event: Mapping[str, Any], model: type[EventData] | None = None) -> EventData:
    """The event's `data` as `model` (by default the model of its `type`).

    Raises `InvalidInput` naming the first bad field as a path into the event (`data.renditions[0].uri`).
    """
    kind = event.get("type")
    if model is None:
        if not isinstance(kind, str) or kind not in MODELS:
            raise InvalidInput("type", f"one of the contract's event types ({', '.join(MODELS)})")
        model = MODELS[kind]
    data = event.get("data")
    if not isinstance(data, dict):
        raise InvalidInput("data", f"a JSON object (the payload of {kind})")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InvalidInput(_path(first["loc"]), _expected(first["type"], first["msg"])) from None


def video_id_of(event: Mapping[str, Any]) -> str | None:
    """The valid `data.video_id` of any event about a video, else None."""
    try:
        return parse(event, _AboutVideo).video_id
    except InvalidInput:
        return None


class _AboutVideo(EventData):
    video_id: VideoId


def _path(loc: tuple[int | str, ...]) -> str:
    path = "data"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _expected(kind: str, message: str) -> str:
    if kind == "missing":
        return "a value (the field is required)"
    return message.removeprefix("Input should be ")
