"""`python -m services.processing`: run the processing service (autoscaler + transcoding workers)."""

import logging

from services.common.server import serve
from services.processing.app import create_app
from services.processing.settings import ProcessingSettings

if __name__ == "__main__":
    # Workers and the autoscaler hold long polls: httpx would log every one of them at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve("services.processing", ProcessingSettings, create_app, "processing_port")
