"""Every service's OpenAPI document tells the truth: schemathesis, every check, against a real process.

Schemathesis (pinned in the test extra) generates requests from each service's `/openapi.json`,
valid and invalid, and checks every answer against the document: documented status codes and
content types, response schemas, that schema-valid requests are accepted and invalid ones refused,
the `Allow` header of 405s, that auth is enforced. Any finding fails the test with schemathesis'
own report (and a `curl` line to reproduce it). Generation is deterministic and bounded so CI
stays fast and repeatable; run `st run` by hand with more examples to dig deeper.
"""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.process import REPO, service

TOKEN = "openapi-truth-admin-token"
# Per-operation settings and hooks: statuses a protocol prescribes (tus' 412), media types schemathesis lacks.
CONFIG = REPO / "tests" / "schemathesis.toml"
EXAMPLES = 25

SERVICES = ["router", "services.upload", "services.processing", "services.store"]

UNSAYABLE: dict[str, dict[str, str]] = {
    # Operations whose acceptance hangs on what no JSON schema can say: each is still checked with
    # every other check (bad input refused, documented answers, auth), in a run of its own.
    "router": {
        "POST /events": "CloudEvents' type system (no control characters, surrogates or noncharacters in "
        "strings, 32-bit integers, data depth, event size) is the router's to check",
        "POST /patterns/test": "an EventBridge pattern's grammar (leaves are lists, operators, numeric ranges) "
        "and its limits are the pattern compiler's",
        "PUT /subscriptions/{name}": "the same pattern grammar, and a push URL's address must be in "
        "CATTUBE_PUSH_ALLOWED_NETWORKS",
    },
    "services.upload": {
        "POST /videos": "only a real, self-contained video is accepted: a schema-valid body may be refused "
        "as empty (400), too large (413), not a video (415) or hostile / truncated (422)",
        "POST /uploads": "tus' Upload-Metadata values are base64: that they decode to UTF-8 text, a title of at most "
        "200 characters and rendition names is past what a schema can say of the header",
    },
    "services.processing": {
        "PUT /autoscaler": "min_workers <= max_workers relates two fields, which a JSON schema cannot",
    },
    "services.store": {
        "POST /inbox": "a delivery is accepted only with a valid Standard Webhooks signature (401 otherwise)",
    },
}


async def schemathesis(url: str, cwd: Path, *selection: str) -> tuple[int, str]:
    st = Path(sys.executable).with_name("st")
    run = await asyncio.create_subprocess_exec(
        str(st), "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(EXAMPLES),
        "--generation-deterministic",
        "--workers", "1",
        "--header", f"Authorization: Bearer {TOKEN}",
        *selection,
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await run.communicate()
    assert run.returncode is not None
    return run.returncode, output.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("module", SERVICES)
async def test_openapi_document_is_the_truth(module: str, tmp_path: Path) -> None:
    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), "CATTUBE_TOKEN": TOKEN}
    unsayable = UNSAYABLE.get(module, {})
    async with AsyncExitStack() as stack:
        if module != "router":
            # A real router, so the service is ready (its subscriptions made) as in production.
            router = await stack.enter_async_context(service("router", env))
            env["CATTUBE_ROUTER_URL"] = router.url
        proc = await stack.enter_async_context(service(module, env))
        runs = [await schemathesis(proc.url, tmp_path, *(f"--exclude-name={name}" for name in unsayable))]
        for name in unsayable:
            runs.append(
                await schemathesis(
                    proc.url, tmp_path, f"--include-name={name}", "--exclude-checks=positive_data_acceptance"
                )
            )
    for code, report in runs:
        assert code == 0, f"schemathesis found mismatches in {module}'s OpenAPI document:\n{report}"
