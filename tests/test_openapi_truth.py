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
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.process import service

TOKEN = "openapi-truth-admin-token"
EXAMPLES = 25

SERVICES = ["router", "services.upload", "services.processing", "services.store"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("module", SERVICES)
async def test_openapi_document_is_the_truth(module: str, tmp_path: Path) -> None:
    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), "CATTUBE_TOKEN": TOKEN}
    async with AsyncExitStack() as stack:
        if module != "router":
            # A real router, so the service is ready (its subscriptions made) as in production.
            router = await stack.enter_async_context(service("router", env))
            env["CATTUBE_ROUTER_URL"] = router.url
        proc = await stack.enter_async_context(service(module, env))
        st = Path(sys.executable).with_name("st")
        run = await asyncio.create_subprocess_exec(
            str(st), "run", f"{proc.url}/openapi.json",
            "--checks", "all",
            "--max-examples", str(EXAMPLES),
            "--generation-deterministic",
            "--workers", "1",
            "--header", f"Authorization: Bearer {TOKEN}",
            cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await run.communicate()
    report = output.decode(errors="replace")
    assert run.returncode == 0, f"schemathesis found mismatches in {module}'s OpenAPI document:\n{report}"
