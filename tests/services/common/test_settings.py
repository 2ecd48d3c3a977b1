"""The settings every service shares: the router's URL, or a list of its replicas."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.settings import CommonSettings


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
