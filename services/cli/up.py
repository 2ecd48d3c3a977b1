"""`cattube up`: the whole stack on one machine, four processes with embedded defaults."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass

from services.cli import tokens
from services.common.settings import CommonSettings

# Each service: its name, the module `python -m` runs, and the setting holding its port.
SERVICES = [
    ("router", "router", "router_port"),
    ("upload", "services.upload", "upload_port"),
    ("processing", "services.processing", "processing_port"),
    ("store", "services.store", "store_port"),
]
RESTART_BACKOFF_MAX_S = 30.0
STABLE_S = 60.0
"""A service that ran this long before it died starts its restart backoff over."""


@dataclass
class Child:
    name: str
    module: str
    port: int
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0


def settings_help() -> str:
    """Every setting of every service, for `cattube up --help` (read from the settings classes)."""
    from router.settings import RouterSettings
    from services.processing.settings import ProcessingSettings
    from services.store.settings import StoreSettings
    from services.upload.settings import UploadSettings

    lines = ["settings (environment variables, CATTUBE_<NAME>):", "", "  every service:"]
    lines += _describe(CommonSettings, set())
    shared = set(CommonSettings.model_fields)
    services: list[tuple[str, type[CommonSettings]]] = [
        ("router", RouterSettings),
        ("upload", UploadSettings),
        ("processing", ProcessingSettings),
        ("store", StoreSettings),
    ]
    for title, settings_type in services:
        lines += ["", f"  {title}:", *_describe(settings_type, shared)]
    return "\n".join(lines)


def _describe(settings_type: type[CommonSettings], skip: set[str]) -> list[str]:
    lines = []
    for name, info in settings_type.model_fields.items():
        if name in skip:
            continue
        if info.default_factory is not None:
            default: object = "(computed)"
        else:
            default = "-" if info.default is None else info.default
        lines.append(f"    CATTUBE_{name.upper():<30} {str(default):<22} {info.description or ''}".rstrip())
    return lines


async def pump(child: Child, stream: asyncio.StreamReader) -> None:
    async for raw in stream:
        sys.stdout.write(f"{child.name:>10} | {raw.decode(errors='replace')}")
        sys.stdout.flush()


async def supervise(child: Child, env: dict[str, str], stopping: asyncio.Event) -> None:
    """Run one service; restart it with backoff whenever it dies while the stack is up."""
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        started = loop.time()
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", child.module, "--port", str(child.port),
            env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert child.proc.stdout is not None
        await pump(child, child.proc.stdout)
        code = await child.proc.wait()
        if stopping.is_set():
            return
        if loop.time() - started > STABLE_S:
            child.restarts = 0
        child.restarts += 1
        delay = min(RESTART_BACKOFF_MAX_S, 0.5 * 2 ** min(child.restarts, 6))
        print(f"{child.name:>10} | exited with status {code}; restarting in {delay:.1f}s (restart #{child.restarts})")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)


async def up(settings: CommonSettings, *, rotate_tokens: bool = False) -> int:
    env = dict(os.environ)
    stack_tokens = tokens.prepare(settings, rotate=rotate_tokens)
    env.update(stack_tokens.environment(), CATTUBE_DATA_DIR=str(settings.data_dir.resolve()))
    children = [Child(name, module, getattr(settings, port_field)) for name, module, port_field in SERVICES]
    print(
        f"CatTube: data in {settings.data_dir.resolve()}; tokens in {tokens.tokens_file(settings.data_dir.resolve())}"
    )
    for child in children:
        print(f"  {child.name:<10} http://{settings.host}:{child.port}  (API docs: /docs)")
    print(f"Open the page: http://{settings.host}:{settings.store_port}/#token={stack_tokens.user}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    tasks = [asyncio.create_task(supervise(child, env, stopping)) for child in children]
    await stopping.wait()
    print("CatTube: stopping every service")
    for child in children:
        if child.proc is not None and child.proc.returncode is None:
            child.proc.send_signal(signal.SIGTERM)
    _, pending = await asyncio.wait(tasks, timeout=40)
    for child in children:
        if child.proc is not None and child.proc.returncode is None:
            child.proc.kill()
    await asyncio.gather(*pending, return_exceptions=True)
    return 0
