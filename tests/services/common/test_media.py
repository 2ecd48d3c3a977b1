"""The hardened ffmpeg options and the child-process runner that nothing can outlive."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.common.media import (
    ProcessResult,
    ProcessTimeout,
    ffmpeg_exe,
    hardened_input_args,
    run_process,
)
from tests.media import make_clip


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def read_pids(path: Path, count: int, within_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.exists():
            pids = path.read_text().split()
            if len(pids) >= count:
                return [int(pid) for pid in pids[:count]]
        time.sleep(0.02)
    raise AssertionError(f"{path} never listed {count} pids")


# A child that starts a grandchild `sleep`, writes both pids and waits forever.
FAMILY = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen(["sleep", "300"])
    with open(sys.argv[1], "w") as f:
        f.write(f"{__import__('os').getpid()} {grandchild.pid}\\n")
    print("ready", flush=True)
    time.sleep(300)
    """
)


def test_ffmpeg_exe_prefers_the_override() -> None:
    assert ffmpeg_exe("/opt/ffmpeg") == "/opt/ffmpeg"
    assert os.access(ffmpeg_exe(), os.X_OK)


def test_hardened_args_shape() -> None:
    args = hardened_input_args(1920 * 1080)
    assert args[0] == "-nostdin"
    assert args[args.index("-protocol_whitelist") + 1] == "file"
    assert args[args.index("-max_pixels") + 1] == str(1920 * 1080)
    assert args[args.index("-max_alloc") + 1] == "268435456"
    assert "-xerror" in args
    assert "hls" not in args[args.index("-format_whitelist") + 1].split(",")
    with pytest.raises(ValueError):
        hardened_input_args(0)


async def test_hardened_args_are_accepted_by_the_bundled_ffmpeg(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "in.mp4", 320, 240, 1.0)
    out = tmp_path / "out.mp4"
    argv = [ffmpeg_exe(), "-hide_banner", *hardened_input_args(320 * 240), "-i", str(source)]
    argv += ["-map", "0:v:0", "-map", "0:a:0?", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(out)]
    result = await run_process(argv, timeout_s=60)
    assert result.returncode == 0, result.stderr_tail
    assert out.stat().st_size > 1000


async def test_hardened_args_enforce_max_pixels(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "in.mp4", 320, 240, 0.5, audio=False)
    argv = [ffmpeg_exe(), "-hide_banner", *hardened_input_args(160 * 120), "-i", str(source), "-f", "null", "-"]
    result = await run_process(argv, timeout_s=60)
    assert result.returncode != 0


async def test_returns_stdout_lines_and_stderr_tail() -> None:
    lines: list[str] = []
    code = "import sys\nfor i in range(3): print(f'line={i}', flush=True)\nsys.stderr.write('x' * 10000 + 'END')"
    result = await run_process([sys.executable, "-c", code], timeout_s=30, on_stdout_line=lines.append)
    assert result == ProcessResult(returncode=0, stderr_tail=result.stderr_tail)
    assert lines == ["line=0", "line=1", "line=2"]
    assert result.stderr_tail.endswith("END") and len(result.stderr_tail) <= 4096


async def test_stdin_is_devnull_and_exit_status_is_reported() -> None:
    code = "import sys; sys.exit(3 if sys.stdin.read() == '' else 4)"
    result = await run_process([sys.executable, "-c", code], timeout_s=30)
    assert result.returncode == 3


async def test_stdout_lines_arrive_while_the_child_runs() -> None:
    seen = asyncio.Event()
    code = "import time\nprint('progress=continue', flush=True)\ntime.sleep(30)"
    task = asyncio.create_task(
        run_process([sys.executable, "-c", code], timeout_s=60, on_stdout_line=lambda _line: seen.set())
    )
    try:
        async with asyncio.timeout(10):
            await seen.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    with pytest.raises(ProcessTimeout) as caught:  # raised at the timeout, not after the family's 300 s
        await run_process([sys.executable, "-c", FAMILY, str(pids_file)], timeout_s=1.0)
    assert caught.value.timeout_s == 1.0
    child, grandchild = read_pids(pids_file, 2)
    assert wait_gone(child) and wait_gone(grandchild)


async def test_timeout_kills_children_that_ignore_sigterm(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    stubborn = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + FAMILY
    with pytest.raises(ProcessTimeout):
        await run_process([sys.executable, "-c", stubborn, str(pids_file)], timeout_s=0.5)
    child, grandchild = read_pids(pids_file, 2)
    assert wait_gone(child) and wait_gone(grandchild)


async def test_cancelling_the_awaiting_task_kills_the_group(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    ready = asyncio.Event()
    argv = [sys.executable, "-c", FAMILY, str(pids_file)]
    task = asyncio.create_task(run_process(argv, timeout_s=60, on_stdout_line=lambda _line: ready.set()))
    async with asyncio.timeout(10):
        await ready.wait()
    child, grandchild = read_pids(pids_file, 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Cleanup has awaited wait(): the child is reaped, not a zombie, once the task is done.
    assert not alive(child)
    assert wait_gone(grandchild)


async def test_a_raising_line_callback_kills_the_child(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    code = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\nprint('hi', flush=True)\n"
    code += "time.sleep(60)"

    def explode(_line: str) -> None:
        raise RuntimeError("bad line")

    with pytest.raises(RuntimeError, match="bad line"):
        await run_process([sys.executable, "-c", code, str(pids_file)], timeout_s=60, on_stdout_line=explode)
    assert not alive(read_pids(pids_file, 1)[0])


async def test_memory_limit_makes_a_large_allocation_fail() -> None:
    code = "b = bytearray(512 * 1024 * 1024)\nprint('allocated')"
    limited = await run_process([sys.executable, "-c", code], timeout_s=30, memory_limit_bytes=256 * 1024 * 1024)
    assert limited.returncode != 0
    assert "MemoryError" in limited.stderr_tail
    unlimited = await run_process([sys.executable, "-c", code], timeout_s=30)
    assert unlimited.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    """kill -9 of the process awaiting run_process takes its ffmpeg with it."""
    pids_file = tmp_path / "pids"
    parent_code = textwrap.dedent(
        """
        import asyncio, sys
        from services.common.media import ffmpeg_exe, run_process

        def on_line(line):
            if line.startswith("progress="):
                open(sys.argv[1], "a").write(f"{__import__('os').getpid()} {sys.argv[2]}\\n")

        argv = [ffmpeg_exe(), "-nostdin", "-re", "-f", "lavfi", "-i", "testsrc2=s=64x64:r=5",
                "-f", "null", "-progress", "pipe:1", "-"]
        asyncio.run(run_process(argv, timeout_s=120, on_stdout_line=on_line))
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(pids_file), "ffmpeg"], cwd=Path(__file__).parents[3]
    )
    try:
        parent_pid = read_pids(pids_file, 1, within_s=30)[0]
        assert parent_pid == parent.pid
        children = [
            int(pid)
            for pid in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
            if "ffmpeg" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert len(children) == 1
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_gone(children[0], within_s=5), "ffmpeg outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
