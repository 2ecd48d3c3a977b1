"""`cattube up`: the whole stack on one machine, four processes with embedded defaults."""

from __future__ import annotations

import asyncio
import os
import signal

from services.cli import tokens
from services.cli.stack import SERVICES, Child, Stack, check_ports
from services.common.settings import CommonSettings

PAGE_LINE = "Open the page:"
"""Printed once every service is serving (`cattube demo` waits for it)."""


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


async def up(settings: CommonSettings, *, rotate_tokens: bool = False) -> int:
    children = [Child(name, module, getattr(settings, field), field) for name, module, field in SERVICES]
    check_ports(settings.host, children)
    stack_tokens = tokens.prepare(settings, rotate=rotate_tokens)
    env = {**os.environ, **stack_tokens.environment(), "CATTUBE_DATA_DIR": str(settings.data_dir.resolve())}
    return await run(settings, Stack(settings.host, children, env, settings.log_level), stack_tokens)


async def run(settings: CommonSettings, stack: Stack, stack_tokens: tokens.StackTokens) -> int:
    """Start the stack, say where everything is once it all serves, and stop it in order on Ctrl-C."""
    # Where a person follows an upload (its status_url): the store's page of the video.
    stack.env.setdefault("CATTUBE_STORE_PUBLIC_URL", f"http://{settings.host}:{settings.store_port}")
    print(
        f"CatTube: data in {settings.data_dir.resolve()}; tokens in {tokens.tokens_file(settings.data_dir.resolve())}"
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stack.ask_to_stop)
    try:
        await stack.start()
        if not stack.stopping:
            for child in stack.children.values():
                what = "(API docs: /docs)" if child.command is None else "(S3 endpoint)"
                print(f"  {child.name:<12} http://{settings.host}:{child.port}  {what}")
            print(f"{PAGE_LINE} http://{settings.host}:{settings.store_port}/#token={stack_tokens.user}", flush=True)
            await stack.until_stop_asked()
    finally:
        await stack.stop()
    return 130 if stack.killing else 0
