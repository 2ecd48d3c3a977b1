"""Failures of any `cattube` command before it reaches a service: a bad setting or an unusable data
directory is one or two clear lines on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import main
from tests.process import free_port


def test_a_bad_setting_names_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CATTUBE_UPLOAD_PORT", "eighty")
    video = tmp_path / "whiskers.mp4"
    video.write_bytes(b"\0" * 64)
    code = main(["--data-dir", str(tmp_path), "upload", str(video)])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) <= 2, err
    assert "CATTUBE_UPLOAD_PORT" in err and "eighty" in err and "Traceback" not in err


def test_a_data_dir_that_cannot_be_made_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in ("CATTUBE_ROUTER_PORT", "CATTUBE_UPLOAD_PORT", "CATTUBE_PROCESSING_PORT", "CATTUBE_STORE_PORT"):
        monkeypatch.setenv(variable, str(free_port()))  # free ports: the data dir is what fails
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    code = main(["--data-dir", str(taken / "cattube"), "up"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) <= 2, err
    assert str(taken) in err and "Traceback" not in err
