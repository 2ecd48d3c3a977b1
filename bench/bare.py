"""The baseline: a bare FastAPI endpoint that reads the body and answers 202, under the same uvicorn."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()
RESULT = b'{"results":[{"id":"x","sequence":1,"duplicate":false}]}'


@app.post("/events")
async def events(request: Request) -> Response:
    await request.body()
    # One result, as the router answers a single publish (the SDK's publish reads it).
    return Response(RESULT, status_code=202, media_type="application/json")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
