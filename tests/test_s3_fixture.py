"""The fixtures the S3 tests stand on: each test's bucket is dropped afterwards, not only emptied."""

from __future__ import annotations

import httpx
import obstore
import pytest

from tests.s3 import S3Server, fresh_bucket


async def test_a_fresh_bucket_that_held_data_is_dropped_afterwards(s3: S3Server) -> None:
    """SeaweedFS keeps a volume for each bucket until the bucket goes, and has only free disk / 1 GiB of them:
    a session that left its buckets behind ran out on a fuller disk (500 "no free volumes left")."""
    if s3.filer is None:
        pytest.skip("an external S3 server: its buckets are emptied, and dropping them is up to its owner")
    async with fresh_bucket(s3) as name:
        await obstore.put_async(s3.bucket(f"s3://{name}/media").store, "held", b"x" * (5 << 20))
        async with httpx.AsyncClient() as client:
            assert (
                await client.get(f"{s3.filer}/buckets/{name}/", headers={"Accept": "application/json"})
            ).status_code == 200
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{s3.filer}/buckets/{name}/", headers={"Accept": "application/json"})
    assert answer.status_code == 404
