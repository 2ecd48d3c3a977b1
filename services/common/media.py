"""Running ffmpeg (and other media children) on untrusted input without letting it hurt the service.

Two things live here, shared by the upload probe and the transcoding workers:

* `hardened_input_args(max_pixels)` — the options docs/architecture.md "Untrusted media" puts before every
  `-i` of an uploaded file: only local files, only real video containers, only the codecs we
  transcode, bounded picture size and allocations, stop at the first decode error.
* `run_process(argv, timeout_s=...)` — a child in its own process group that cannot outlive us:
  a timeout or the cancellation of the awaiting task kills the whole group (SIGTERM, 2 s grace,
  SIGKILL), `PR_SET_PDEATHSIG` kills it if this process is `kill -9`-ed, and `RLIMIT_AS` caps its
  memory. `wait()` is always awaited, so no zombie is left behind.

    argv = [ffmpeg_exe(), *hardened_input_args(7680 * 4320), "-i", str(master), ..., "-progress", "pipe:1"]
    result = await run_process(argv, timeout_s=3600, on_stdout_line=progress.feed)
    if result.returncode != 0:
        raise PermanentFailure(f"ffmpeg failed: {result.stderr_tail}")
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Demuxers of self-contained video files. Everything that can pull in another file or an address
# (hls, dash, concat, sdp, image2, ...) is left out on purpose.
FORMAT_WHITELIST: tuple[str, ...] = ("mov", "matroska", "avi", "mpegts", "mpeg", "flv", "ogg", "asf")
# Decoders of the video and audio codecs we accept (ffmpeg decoder names, so `mp3float` next to `mp3`).
CODEC_WHITELIST: tuple[str, ...] = (
    "h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg", "prores",
    "theora", "vc1", "wmv3", "h263",
    "aac", "mp3", "mp3float", "mp2", "mp2float", "opus", "vorbis", "flac", "ac3", "eac3", "alac",
    "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_f32le", "wmav2",
)  # fmt: skip
PROTOCOL_WHITELIST = "file"
# ffmpeg's `-max_alloc`: no single allocation above 256 MiB (a 7680x4320 frame needs ~50 MiB).
MAX_ALLOC_BYTES = 268_435_456

STDERR_TAIL_BYTES = 4096
TERMINATE_GRACE_S = 2.0
_MAX_LINE_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1


def ffmpeg_exe(override: str | None = None) -> str:
    """The ffmpeg binary to run: `override` (the `CATTUBE_FFMPEG` setting) if given, else the bundled one.

    The bundled binary comes from the `imageio-ffmpeg` wheel, so no system install is needed.
    """
    if override:
        return override
    import imageio_ffmpeg

    exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    return exe


def hardened_input_args(max_pixels: int) -> list[str]:
    """The options to place before every `-i` of an untrusted file (docs/architecture.md, "Untrusted media").

    `-nostdin`, `-max_alloc` and `-xerror` are global options; the whitelists and `-max_pixels` are
    input options that apply to the `-i` that follows, so repeat the list before each untrusted input.

        argv = [ffmpeg_exe(), *hardened_input_args(7680 * 4320), "-i", "master.mp4", ...]
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    return [
        "-nostdin",
        "-protocol_whitelist", PROTOCOL_WHITELIST,
        "-format_whitelist", ",".join(FORMAT_WHITELIST),
        "-codec_whitelist", ",".join(CODEC_WHITELIST),
        "-max_pixels", str(max_pixels),
        "-max_alloc", str(MAX_ALLOC_BYTES),
        "-xerror",
    ]  # fmt: skip


@dataclass(frozen=True)
class ProcessResult:
    returncode: int
    """The exit status; negative when the child was killed by a signal (-9 for SIGKILL)."""
    stderr_tail: str
    """The last ~4 KB of stderr (decoded leniently), for error messages."""


class ProcessTimeout(Exception):
    """The child ran past its time limit; its process group has been killed."""

    def __init__(self, message: str, *, timeout_s: float = 0.0, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.timeout_s = timeout_s
        self.stderr_tail = stderr_tail


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # Looked up in the parent: the child between fork and exec should not be the one to dlopen.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)  # the symbols Python itself links, libc's among them
    except OSError:  # pragma: no cover - a Linux without dynamic linking
        return None


def _child_setup(memory_limit_bytes: int | None) -> Callable[[], None]:
    """The `preexec_fn`: runs in the child after fork, before exec."""
    libc = _libc()
    parent_pid = os.getpid()

    def setup() -> None:
        if libc is not None:
            # Linux sends it when the *thread* that forked exits: here the event loop's thread.
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            # The parent may have died before prctl took effect; then nobody will send the signal.
            if os.getppid() != parent_pid:
                os._exit(1)
        if memory_limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    return setup


async def run_process(
    argv: list[str],
    *,
    timeout_s: float,
    memory_limit_bytes: int | None = None,
    on_stdout_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> ProcessResult:
    """Run `argv` to completion in its own process group, which cannot outlive this call.

    stdin is `/dev/null`. Each stdout line (without its newline) goes to `on_stdout_line` as it
    arrives, e.g. ffmpeg's `-progress pipe:1` blocks; stderr is kept as a bounded tail. With
    `memory_limit_bytes` the child runs under `RLIMIT_AS`, so an allocation past it fails in the
    child. Past `timeout_s` the group is killed and `ProcessTimeout` raised; cancelling the awaiting
    task kills the group too. On Linux the child also dies with this process (`PR_SET_PDEATHSIG`).
    `env` replaces the child's environment (by default it inherits ours); `cwd` is its working directory.

        result = await run_process([ffmpeg_exe(), "-version"], timeout_s=10)
        assert result.returncode == 0
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_child_setup(memory_limit_bytes),
    )
    assert proc.stdout is not None and proc.stderr is not None
    tail = bytearray()
    readers = [
        asyncio.create_task(_pump_lines(proc.stdout, on_stdout_line)),
        asyncio.create_task(_pump_tail(proc.stderr, tail)),
    ]
    finished = False
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*readers)
                returncode = await proc.wait()
        except TimeoutError:
            raise ProcessTimeout(
                f"{os.path.basename(argv[0])} ran longer than {timeout_s:g} s and was killed",
                timeout_s=timeout_s,
                stderr_tail=_decode_tail(tail),
            ) from None
        finished = True
    finally:
        await _cleanup(proc, readers, kill=not finished)
    return ProcessResult(returncode=returncode, stderr_tail=_decode_tail(tail))


async def _cleanup(proc: asyncio.subprocess.Process, readers: list[asyncio.Task[None]], *, kill: bool) -> None:
    """Kill the group if asked, reap the child, stop the readers; finish even if cancelled again."""
    job = asyncio.ensure_future(_reap(proc, readers, kill=kill))
    cancelled = False
    while not job.done():
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break
    if job.done() and not job.cancelled() and job.exception() is not None:
        log.warning("cleaning up pid %s failed", proc.pid, exc_info=job.exception())
    if cancelled:
        raise asyncio.CancelledError


async def _reap(proc: asyncio.subprocess.Process, readers: list[asyncio.Task[None]], *, kill: bool) -> None:
    if kill:
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TERMINATE_GRACE_S):
                await proc.wait()
        # Also reaches grandchildren that ignored SIGTERM or outlived the leader.
        _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _pump_lines(stream: asyncio.StreamReader, on_line: Callable[[str], None] | None) -> None:
    buffer = bytearray()
    while chunk := await stream.read(65536):
        if on_line is None:
            continue
        buffer += chunk
        *lines, rest = buffer.split(b"\n")
        for line in lines:
            on_line(line.rstrip(b"\r").decode("utf-8", "replace"))
        # A child that never ends its line must not grow our memory without bound.
        buffer = bytearray(rest[-_MAX_LINE_BYTES:])
    if buffer and on_line is not None:
        on_line(buffer.rstrip(b"\r").decode("utf-8", "replace"))


async def _pump_tail(stream: asyncio.StreamReader, tail: bytearray) -> None:
    while chunk := await stream.read(65536):
        tail += chunk
        del tail[:-STDERR_TAIL_BYTES]


def _decode_tail(tail: bytearray) -> str:
    return bytes(tail).decode("utf-8", "replace")
