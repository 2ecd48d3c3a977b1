"""The store's two web pages, filled in on the server: the home page (upload, the poster grid, the autoscaler)
and the watch page of one video (`/watch/{id}`), with the headers both are served with.

    pages = Pages(STATIC)
    html, headers = pages.home(settings, bucket_origin)
    html, headers = pages.watch(settings, record, bucket_origin)   # record: the video's public record, or None

Each page gets its settings as JSON in a `<script type="application/json">` (its `<` escaped, so no
value can close the element), and a strict content security policy: scripts and styles from the
store only, media and images from the store's own public address too (and the bucket's, when
playback redirects there), requests to the upload service only. The watch page also carries what
a link preview shows (Open Graph: title, description, poster), built from the record's public URLs.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from services.common.blobs import BlobStore
from services.common.contract import RENDITION_NAMES
from services.store.settings import StoreSettings

DEFAULT_RENDITIONS = ("720p", "360p")
SITE = "CatTube"


class Pages:
    def __init__(self, static: Path) -> None:
        self.home_html = (static / "index.html").read_text(encoding="utf-8")
        self.watch_html = (static / "watch.html").read_text(encoding="utf-8")

    def home(self, settings: StoreSettings, bucket_origin: str) -> tuple[str, dict[str, str]]:
        config = {
            "upload_url": settings.upload_base_url,
            "processing_url": settings.processing_base_url,
            "token_required": settings.auth_enabled,
            "renditions": RENDITION_NAMES,
            "default_renditions": DEFAULT_RENDITIONS,
        }
        html = self.home_html.replace("{{CONFIG}}", _script_json(config)).replace(
            "{{UPLOAD_ACTION}}", escape(f"{settings.upload_base_url}/videos")
        )
        return html, headers(settings, bucket_origin)

    def watch(
        self, settings: StoreSettings, video_id: str, record: dict[str, Any] | None, bucket_origin: str
    ) -> tuple[str, dict[str, str]]:
        """The page of `video_id`; `record` is None when the store has not heard of it (yet) or it was deleted."""
        config = {"video_id": video_id, "token_required": settings.auth_enabled, "video": record}
        title = (record or {}).get("title") or ("A video" if record else "Video not found")
        html = (
            self.watch_html.replace("{{CONFIG}}", _script_json(config))
            .replace("{{TITLE}}", escape(f"{title} · {SITE}"))
            .replace("{{META}}", _share_meta(record, title))
        )
        return html, headers(settings, bucket_origin)


def headers(settings: StoreSettings, bucket_origin: str) -> dict[str, str]:
    """What every page is served with: its content security policy, no sniffing, always revalidated."""
    upload = urlsplit(settings.upload_base_url)
    origin = f"{upload.scheme}://{upload.netloc}"
    public = urlsplit(settings.public_base_url)
    own = f"{public.scheme}://{public.netloc}"  # the records' links, when the page is reached by another name
    media = f"'self' {own}"
    if bucket_origin:  # players and posters follow the 307 to the bucket
        media += f" {bucket_origin}"
    csp = (
        f"default-src 'self'; img-src 'self' data: {media}; media-src {media}; style-src 'self'; "
        "script-src 'self'; "
        f"connect-src 'self' {origin}; form-action 'self' {origin}; frame-ancestors 'none'; base-uri 'none'"
    )
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def bucket_origin(settings: StoreSettings, blobs: BlobStore) -> str:
    """The origin presigned URLs point at (path- or virtual-host-style, as the store signs them), when playback
    redirects there; else empty."""
    if settings.playback != "redirect":
        return ""
    url = await blobs.presigned_url("origin", "GET", 60)
    if url is None:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _script_json(value: Any) -> str:
    # `<` escaped: the JSON cannot close its <script> element whatever a title or URL holds.
    return json.dumps(value).replace("<", "\\u003c")


def _share_meta(record: dict[str, Any] | None, title: str) -> str:
    """Open Graph tags (what a chat or social site shows for a shared link), escaped for attributes."""
    if record is None:
        return '<meta name="robots" content="noindex">'
    tags = [
        ("og:site_name", SITE),
        ("og:type", "video.other"),
        ("og:title", title),
        ("og:url", record.get("watch_url")),
        ("og:description", (record.get("description") or "")[:300] or None),
        ("og:image", record.get("poster_url")),
    ]
    lines = [f'<meta property="{name}" content="{escape(str(value))}">' for name, value in tags if value]
    if record.get("watch_url"):
        lines.append(f'<link rel="canonical" href="{escape(str(record["watch_url"]))}">')
    return "\n  ".join(lines)
