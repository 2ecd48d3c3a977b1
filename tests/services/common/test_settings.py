"""The settings every service shares: the router's URL, or a list of its replicas; each service's database."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.settings import CommonSettings
from services.processing.settings import ProcessingSettings
from services.store.settings import StoreSettings
from services.upload.settings import UploadSettings


def test_one_router_url_is_kept_as_it_was() -> None:
    settings = CommonSettings(router_url="http://router:8700/")
    assert settings.router_urls == ("http://router:8700",)
    assert settings.router_base_url == "http://router:8700"
    assert CommonSettings(router_port=9000).router_urls == ("http://127.0.0.1:9000",)
    assert CommonSettings(router_url="", router_port=9000).router_base_url == "http://127.0.0.1:9000"


def test_a_comma_separated_list_names_the_replicas_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATTUBE_ROUTER_URL", "http://r1:8700, https://r2/")
    assert CommonSettings().router_urls == ("http://r1:8700", "https://r2")


@pytest.mark.parametrize(
    "value", ["http://,x", "http://r1:8700,", "r1:8700", "ftp://r1", "http://r1:8700,http://r2:port"]
)
def test_a_bad_list_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CATTUBE_ROUTER_URL", value)
    with pytest.raises(ValidationError, match="CATTUBE_ROUTER_URL: expected http"):
        CommonSettings()


def test_an_empty_variable_is_an_unset_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # compose.yaml passes `${CATTUBE_BLOB_URL:-}` through: empty must mean the default, not "" (an invalid URL).
    monkeypatch.setenv("CATTUBE_BLOB_URL", "")
    monkeypatch.setenv("CATTUBE_DATABASE_URL", "")
    monkeypatch.setenv("CATTUBE_ROUTER_PORT", "")
    settings = CommonSettings()
    assert (settings.blob_url, settings.database_url, settings.router_port) == (None, None, 8700)


PG = "postgresql://cattube:secret@db:5432/cattube"


def test_each_service_finds_its_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert StoreSettings(data_dir=tmp_path).catalog_database_url is None  # SQLite under DATA_DIR, as before
    monkeypatch.setenv("CATTUBE_DATABASE_URL", PG)  # one PostgreSQL for all: each service in its schema
    assert StoreSettings().catalog_database_url == PG
    assert UploadSettings().outbox_database_url == PG
    assert ProcessingSettings().outbox_database_url == PG
    monkeypatch.setenv("CATTUBE_STORE_DATABASE_URL", f"sqlite:///{tmp_path}/catalog.db")  # its own wins
    assert StoreSettings().catalog_database_url == f"sqlite:///{tmp_path}/catalog.db"
    # A SQLite file in the shared variable is the router's: the services keep their own files.
    monkeypatch.setenv("CATTUBE_DATABASE_URL", "sqlite:///bus.db")
    assert UploadSettings().outbox_database_url is None


def test_a_service_database_url_of_another_kind_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATTUBE_UPLOAD_DATABASE_URL", "mysql://cattube:secret@db/cattube")
    with pytest.raises(ValidationError, match="CATTUBE_UPLOAD_DATABASE_URL: expected postgresql://"):
        UploadSettings()
