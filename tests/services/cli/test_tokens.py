"""The stack's tokens: made once, kept owner-only in DATA_DIR, reused by every `cattube up`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from services.cli import main, tokens
from services.common.settings import CommonSettings


def settings(data_dir: Path, **given: str) -> CommonSettings:
    return CommonSettings(data_dir=data_dir, **given)


def test_the_tokens_are_kept_across_starts(tmp_path: Path) -> None:
    first = tokens.prepare(settings(tmp_path))
    second = tokens.prepare(settings(tmp_path))
    assert second == first
    assert len({first.admin, first.service, first.user}) == 3
    path = tmp_path / "tokens.json"
    assert json.loads(path.read_text()) == {"admin": first.admin, "service": first.service, "user": first.user}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rotating_makes_new_ones(tmp_path: Path) -> None:
    first = tokens.prepare(settings(tmp_path))
    rotated = tokens.prepare(settings(tmp_path), rotate=True)
    assert {rotated.admin, rotated.service, rotated.user}.isdisjoint({first.admin, first.service, first.user})
    assert tokens.prepare(settings(tmp_path)) == rotated


def test_deleting_the_file_makes_new_ones(tmp_path: Path) -> None:
    first = tokens.prepare(settings(tmp_path))
    (tmp_path / "tokens.json").unlink()
    assert tokens.prepare(settings(tmp_path)).user != first.user


def test_set_variables_win_over_the_file(tmp_path: Path) -> None:
    first = tokens.prepare(settings(tmp_path))
    chosen = tokens.prepare(settings(tmp_path, token="from-env", user_token="user-env"))
    assert (chosen.admin, chosen.service, chosen.user) == ("from-env", first.service, "user-env")
    env = chosen.environment()
    assert env == {
        "CATTUBE_TOKEN": "from-env",
        "CATTUBE_SERVICE_TOKEN": first.service,
        "CATTUBE_USER_TOKEN": "user-env",
    }


def test_the_one_token_of_an_older_stack_stays_the_admin_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("old-admin\n")
    assert tokens.prepare(settings(tmp_path)).admin == "old-admin"


def test_upload_and_demo_use_the_user_token(tmp_path: Path) -> None:
    assert tokens.user_token(settings(tmp_path)) is None
    made = tokens.prepare(settings(tmp_path))
    assert tokens.user_token(settings(tmp_path)) == made.user
    assert tokens.user_token(settings(tmp_path, user_token="mine")) == "mine"
    assert tokens.user_token(settings(tmp_path / "elsewhere", token="only-one")) == "only-one"


def test_up_help_says_how_to_set_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["up", "--help"])
    text = capsys.readouterr().out
    for needed in ("CATTUBE_USER_TOKEN", "CATTUBE_SERVICE_TOKEN", "CATTUBE_TOKEN", "--rotate-tokens", "tokens.json"):
        assert needed in text
