"""`python -m services.store`: run the store service (catalog, playback, web page)."""

from services.common.server import serve
from services.store.app import create_app
from services.store.settings import StoreSettings

if __name__ == "__main__":
    serve("services.store", StoreSettings, create_app, "store_port")
