"""The stack's three tokens (admin, service, user): made once by `cattube up`, kept in DATA_DIR, reused.

Kept across restarts so a bookmarked `/#token=...` link and a script's token keep working; a
variable that is set (`CATTUBE_TOKEN`, `CATTUBE_SERVICE_TOKEN`, `CATTUBE_USER_TOKEN`) wins over the
file. `cattube up --rotate-tokens` (or deleting the file) makes new ones.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.settings import CommonSettings

FILE_NAME = "tokens.json"
LEGACY_FILE_NAME = "token"
"""Where one admin token was kept before scoped tokens; still read, so its holders are not locked out."""


@dataclass(frozen=True)
class StackTokens:
    admin: str
    service: str
    user: str

    def environment(self) -> dict[str, str]:
        """What the services are started with (docs/decisions.md: every service can tell every scope apart)."""
        return {"CATTUBE_TOKEN": self.admin, "CATTUBE_SERVICE_TOKEN": self.service, "CATTUBE_USER_TOKEN": self.user}


def tokens_file(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def _saved(data_dir: Path) -> dict[str, str]:
    path = tokens_file(data_dir)
    if path.exists():
        saved = json.loads(path.read_text())
        return {scope: value for scope, value in saved.items() if isinstance(value, str) and value}
    legacy = data_dir / LEGACY_FILE_NAME
    return {"admin": legacy.read_text().strip()} if legacy.exists() else {}


def _write(data_dir: Path, tokens: StackTokens) -> None:
    """Owner-only from its first byte: created with mode 0600, never readable by others in between."""
    path = tokens_file(data_dir)
    scratch = path.with_name(f".{FILE_NAME}.tmp")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(asdict(tokens), file)
    scratch.replace(path)


def prepare(settings: CommonSettings, *, rotate: bool = False) -> StackTokens:
    """The tokens `cattube up` hands out: set variables first, then the saved ones, new ones for the rest;
    saved (owner-only) for `cattube upload`, `cattube demo` and the next start."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    saved = {} if rotate else _saved(settings.data_dir)
    given = {"admin": settings.token_value, "service": settings.service_token_value, "user": settings.user_token_value}
    chosen = {scope: given[scope] or saved.get(scope) or secrets.token_urlsafe(24) for scope in given}
    tokens = StackTokens(**chosen)
    if len(set(chosen.values())) != len(chosen):
        raise SystemExit("CATTUBE_TOKEN, CATTUBE_SERVICE_TOKEN and CATTUBE_USER_TOKEN must differ")
    _write(settings.data_dir, tokens)
    return tokens


def user_token(settings: CommonSettings) -> str | None:
    """What `cattube upload` and `cattube demo` send: the user token, from the variable or the stack's file.

    With only an admin token (a one-token deployment), that one."""
    if settings.user_token_value:
        return settings.user_token_value
    saved = _saved(settings.data_dir)
    return saved.get("user") or settings.token_value or saved.get("admin")


def tokens_help() -> str:
    """For `cattube up --help`: which token does what, and how a deployment sets them."""
    return (
        "tokens: three bearer tokens, each allowing more than the one before:\n"
        "  CATTUBE_USER_TOKEN     upload, list, edit, retry, delete videos (the page's link carries it)\n"
        "  CATTUBE_SERVICE_TOKEN  publish, receive/ack, own subscriptions (services call the router with it)\n"
        "  CATTUBE_TOKEN          admin: everything, router management and PUT /autoscaler\n"
        f"Made once and kept in DATA_DIR/{FILE_NAME} (owner-only), so links and scripts survive restarts;\n"
        "a variable that is set wins. A deployment sets all three, different, to secrets of its own\n"
        "(e.g. `openssl rand -hex 24`) for every service. --rotate-tokens (or deleting the file) makes new ones."
    )
