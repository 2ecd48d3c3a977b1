"""`python -m router`: run the event router."""

from fastapi import FastAPI

from router.app import create_app
from router.settings import RouterSettings
from router.stores import StoreConfigError
from services.common.server import serve


def _create_app(settings: RouterSettings) -> FastAPI:
    try:
        return create_app(settings)
    except StoreConfigError as exc:  # a sentence and exit status 1, not a traceback
        raise SystemExit(f"router: {exc}") from None


if __name__ == "__main__":
    serve("router", RouterSettings, _create_app, "router_port")
