"""compose.yaml against the code: every service, port and variable must be one the settings know.

No Docker engine runs here, so the file is checked, not run: a renamed setting or a wrong port
in compose.yaml fails this test instead of a deployment.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from router.settings import RouterSettings
from services.processing.settings import ProcessingSettings
from services.store.settings import StoreSettings
from services.upload.settings import UploadSettings

REPO = Path(__file__).resolve().parents[1]
SERVICES: dict[str, tuple[str, type[BaseSettings], str]] = {
    "router": ("router", RouterSettings, "router_port"),
    "upload": ("services.upload", UploadSettings, "upload_port"),
    "processing": ("services.processing", ProcessingSettings, "processing_port"),
    "store": ("services.store", StoreSettings, "store_port"),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return loaded


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_matches_its_settings(compose: dict[str, Any], name: str) -> None:
    module, settings_type, port_field = SERVICES[name]
    service = compose["services"][name]
    assert service["command"] == ["python", "-m", module]
    importlib.import_module(module)
    assert (REPO / module.replace(".", "/") / "__main__.py").exists()

    env = service["environment"]
    fields = {f"CATTUBE_{field.upper()}" for field in settings_type.model_fields}
    unknown = sorted(set(env) - fields)
    assert not unknown, f"{name}: variables no setting reads: {unknown}"

    default_port = settings_type.model_fields[port_field].default
    assert int(env[f"CATTUBE_{port_field.upper()}"]) == default_port
    assert service["ports"] == [f"{default_port}:{default_port}"]
    probe = " ".join(service["healthcheck"]["test"])
    assert re.search(rf"127\.0\.0\.1:{default_port}/(healthz|readyz)", probe)

    assert env["CATTUBE_DATA_DIR"] == "/data"
    assert "cattube-data:/data" in service["volumes"]
    assert env["CATTUBE_ROUTER_URL"] == "http://router:8700"
    if name != "router":
        assert service["depends_on"]["router"]["condition"] == "service_healthy"


def test_the_store_is_pushed_to_on_the_compose_network(compose: dict[str, Any]) -> None:
    env = compose["services"]["store"]["environment"]
    assert env["CATTUBE_STORE_PUBLIC_URL"] == "http://store:8703"


def test_the_image_installs_the_packages_it_runs() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for path in ("router", "services", "pyproject.toml"):
        assert re.search(rf"^COPY {re.escape(path)} ", dockerfile, re.M), path
    assert "pip install" in dockerfile


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_gets_the_three_tokens(compose: dict[str, Any], name: str) -> None:
    env = compose["services"][name]["environment"]
    for variable in ("CATTUBE_TOKEN", "CATTUBE_SERVICE_TOKEN", "CATTUBE_USER_TOKEN"):
        assert env[variable].startswith(f"${{{variable}:?"), variable  # required, from the operator
