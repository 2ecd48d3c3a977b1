"""`python -m services.processing`: run the processing service (autoscaler + transcoding workers)."""

from services.common.server import serve
from services.processing.app import create_app
from services.processing.settings import ProcessingSettings

if __name__ == "__main__":
    serve("services.processing", ProcessingSettings, create_app, "processing_port")
