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
    # The cluster profile's second replicas: the same image and settings, published on other host ports.
    "router-2": ("router", RouterSettings, "router_port"),
    "processing-2": ("services.processing", ProcessingSettings, "processing_port"),
}
HOST_PORTS = {"router-2": 8710, "processing-2": 8712}
THIRD_PARTY = {"postgres", "s3"}
"""The cluster profile's PostgreSQL and S3 server: images of their own."""
READ_BY_OBSTORE = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return loaded


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(SERVICES) | THIRD_PARTY
    cluster_only = {name for name, service in compose["services"].items() if service.get("profiles")}
    assert cluster_only == {"router-2", "processing-2"} | THIRD_PARTY
    assert all(compose["services"][name]["profiles"] == ["cluster"] for name in cluster_only)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_matches_its_settings(compose: dict[str, Any], name: str) -> None:
    module, settings_type, port_field = SERVICES[name]
    service = compose["services"][name]
    assert service["command"] == ["python", "-m", module]
    importlib.import_module(module)
    assert (REPO / module.replace(".", "/") / "__main__.py").exists()

    env = service["environment"]
    fields = {f"CATTUBE_{field.upper()}" for field in settings_type.model_fields}
    unknown = sorted(set(env) - fields - READ_BY_OBSTORE)
    assert not unknown, f"{name}: variables no setting reads: {unknown}"

    default_port = settings_type.model_fields[port_field].default
    assert int(env[f"CATTUBE_{port_field.upper()}"]) == default_port
    assert service["ports"] == [f"{HOST_PORTS.get(name, default_port)}:{default_port}"]
    probe = " ".join(service["healthcheck"]["test"])
    assert re.search(rf"127\.0\.0\.1:{default_port}/(healthz|readyz)", probe)

    assert env["CATTUBE_DATA_DIR"] == "/data"
    assert service["volumes"] == [f"{name}-data:/data" if name in HOST_PORTS else "cattube-data:/data"]
    assert env["CATTUBE_ROUTER_URL"] == "${CATTUBE_ROUTER_URLS:-http://router:8700}"
    if module == "router":
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    else:
        assert service["depends_on"]["router"]["condition"] == "service_healthy"
    if module == "services.processing":
        assert env["CATTUBE_INSTANCE"] == name if name in HOST_PORTS else env["CATTUBE_INSTANCE"] == "processing-1"


def test_the_cluster_env_file_names_only_what_is_read() -> None:
    """cluster.env turns the profile on and fills the variables compose.yaml interpolates."""
    compose_text = (REPO / "compose.yaml").read_text()
    lines = [line for line in (REPO / "cluster.env").read_text().splitlines() if line and not line.startswith("#")]
    assigned = dict(line.split("=", 1) for line in lines)
    assert assigned.pop("COMPOSE_PROFILES") == "cluster"
    for variable in assigned:
        assert f"${{{variable}:-" in compose_text, f"{variable} is set in cluster.env but compose.yaml never reads it"
    routers = assigned["CATTUBE_ROUTER_URLS"].split(",")
    assert routers == ["http://router:8700", "http://router-2:8700"]
    assert (
        assigned["CATTUBE_DATABASE_URL"].startswith("postgresql://cattube:")
        and "@postgres:5432/" in assigned["CATTUBE_DATABASE_URL"]
    )
    assert assigned["CATTUBE_BLOB_URL"] == "s3://cattube" and "-bucket=cattube" in compose_text


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
