"""`python -m router`: run the event router."""

from router.app import create_app
from router.settings import RouterSettings
from services.common.server import serve

if __name__ == "__main__":
    serve("router", RouterSettings, create_app, "router_port")
