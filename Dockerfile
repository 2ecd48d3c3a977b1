# One image for every CatTube service; compose.yaml picks the service with its command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY router ./router
COPY services ./services
RUN pip install --no-cache-dir .
ENV CATTUBE_DATA_DIR=/data \
    CATTUBE_HOST=0.0.0.0
VOLUME /data
