"""The `cattube` command: run the stack, upload a video, or play the lecture's demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydantic import ValidationError

from services.cli import cluster, demo, up, upload
from services.cli.failure import Failure
from services.cli.tokens import tokens_help
from services.common.settings import CommonSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cattube", description="CatTube: an event-driven video platform.")
    parser.add_argument("--data-dir", type=Path, help="where everything is kept (CATTUBE_DATA_DIR, default ./.cattube)")
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser(
        "up",
        help="run every service on this machine",
        description="Run router, upload, processing and store as processes with embedded defaults. "
        "Ctrl-C stops all.\n\n" + tokens_help(),
        epilog=up.settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up_parser.add_argument(
        "--rotate-tokens", action="store_true", help="make new tokens (old links and scripts stop working)"
    )
    up_parser.add_argument(
        "--cluster",
        action="store_true",
        help="the scaled-out architecture on this machine: PostgreSQL, an S3 server (SeaweedFS), two routers, "
        "two processing instances, upload and store (needs Debian's postgresql package and the `cluster` extra)",
    )
    upload.add_parser(commands)
    commands.add_parser(
        "demo",
        help="the lecture's story end to end",
        description="Start the stack if needed, make a few 'Whiskers on the beach' clips (one 4K), upload them, "
        "and follow the autoscaler from zero to N and back while they are transcoded.",
    )
    args = parser.parse_args(argv)
    try:
        settings = CommonSettings()
    except ValidationError as exc:
        print(f"cattube: {settings_problem(exc)}", file=sys.stderr)
        return 1
    if args.data_dir is not None:
        settings = settings.model_copy(update={"data_dir": args.data_dir})
    try:
        if args.command == "up":
            start = cluster.up if args.cluster else up.up
            return asyncio.run(start(settings, rotate_tokens=args.rotate_tokens))
        if args.command == "upload":
            return asyncio.run(upload.run(settings, args))
        return asyncio.run(demo.run(settings))
    except Failure as failure:
        print(f"cattube: {failure}", file=sys.stderr)
        return 1
    except OSError as exc:  # the file system refused (a data dir that cannot be made, a full disk): say what and where
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cattube: {where}{exc.strerror or exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def settings_problem(exc: ValidationError) -> str:
    """The first bad setting as its variable, what it holds and what was expected."""
    error = exc.errors()[0]
    said = error["msg"].removeprefix("Value error, ")
    if not error["loc"] or said.startswith("CATTUBE_"):  # the settings' own checks name their variable
        return said
    return f"CATTUBE_{str(error['loc'][0]).upper()}: {said} (got {error['input']!r})"


if __name__ == "__main__":
    sys.exit(main())
