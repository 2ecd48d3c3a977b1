"""What a person says about an upload: its title and the renditions it asks for.

    clean_title("Whiskers\\non the beach\\x07")   # "Whiskers on the beach"
    parse_renditions("720p, 360p")                # ("720p", "360p"), in the order given

Both raise `InvalidInput` naming the field and what would do.
"""

from __future__ import annotations

from services.common.contract import RENDITION_NAMES
from services.common.errors import InvalidInput
from services.common.text import MAX_TITLE_CHARS, one_line

__all__ = ["MAX_TITLE_CHARS", "UNTITLED", "clean_title", "parse_renditions", "title_from_filename"]

_NAME = "(?:" + "|".join(name[:-1] for name in RENDITION_NAMES) + ")[pP]"
RENDITIONS_PATTERN = rf"^\s*(?:{_NAME}\s*)?(?:,\s*(?:{_NAME}\s*)?)*$"
"""What `parse_renditions` takes, as a regular expression for the OpenAPI document."""
UNTITLED = "Untitled"


def clean_title(raw: str) -> str:
    """`raw` without control characters (line breaks and tabs become spaces), trimmed; at most 200 characters.

    An empty result is returned as is: the caller picks the default.
    """
    title = one_line(raw)
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidInput("title", f"at most {MAX_TITLE_CHARS} characters, got {len(title)}")
    return title


def title_from_filename(filename: str | None) -> str:
    """A default title from the client's file name (its stem, cleaned and shortened); never used for storage."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, _ = name.rpartition(".")
    return one_line((stem if dot and stem else name)[: MAX_TITLE_CHARS * 4])[:MAX_TITLE_CHARS].strip() or UNTITLED


def parse_renditions(raw: str, field: str = "renditions") -> tuple[str, ...]:
    """Comma-separated ladder names, in the order given, repeats dropped; empty means "not given" (`()`)."""
    names: list[str] = []
    for item in raw.split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name not in RENDITION_NAMES:
            shown = item.strip()[:20]
            raise InvalidInput(field, f"comma-separated names out of {', '.join(RENDITION_NAMES)}; got {shown!r}")
        if name not in names:
            names.append(name)
    return tuple(names)
