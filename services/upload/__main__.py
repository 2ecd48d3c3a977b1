"""`python -m services.upload`: run the upload service."""

import logging

from services.common.server import serve
from services.upload.app import create_app
from services.upload.settings import UploadSettings

if __name__ == "__main__":
    # The outbox relay's publishes would each be logged by httpx at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve("services.upload", UploadSettings, create_app, "upload_port")
