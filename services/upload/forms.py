"""multipart/form-data read as it arrives: the `file` part streams on, the text fields are kept.

    form = FormStream(request.headers["content-type"], request.stream(), max_body_bytes=limit)
    info = await store.write(key, form.file_chunks(), max_bytes=limit)
    form.fields.get("title"), form.filename

python-multipart's streaming parser is fed each chunk of the body as it comes in, and the file
part's bytes are handed on as they are found, so neither memory nor a spooled temporary file ever
holds the file. Text fields are small and bounded; a field we do not take, a second file or a
body that ends before its closing boundary is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from services.common.errors import BadRequest, InvalidInput, PayloadTooLarge

__all__ = ["FIELDS", "FormStream"]

FIELDS = ("file", "title", "renditions")
MAX_FIELD_BYTES = 4096


class FormStream:
    """One multipart/form-data body. `on_field(name, value)` sees each text field as soon as it is complete
    (and may raise to refuse it), so a bad title sent before the file is refused before the file is read."""

    def __init__(
        self,
        content_type: str,
        body: AsyncIterable[bytes],
        *,
        max_body_bytes: int,
        on_field: Callable[[str, str], None] | None = None,
    ) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary or len(boundary) > 70:
            raise InvalidInput("header.Content-Type", "multipart/form-data with a boundary of 1 to 70 characters")
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.has_file = False
        self.received_bytes = 0
        self._body = body
        self._max_body_bytes = max_body_bytes
        self._on_field = on_field
        self._ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part: str | None = None
        self._text = bytearray()
        self._file_data: list[bytes] = []
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The bytes of the `file` part, as the body arrives; raises if the body is not a complete form."""
        async for chunk in self._body:
            self.received_bytes += len(chunk)
            if self.received_bytes > self._max_body_bytes:
                raise PayloadTooLarge("body", f"a form of at most {self._max_body_bytes} bytes")
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise BadRequest("body", f"a well-formed multipart/form-data body ({exc})") from None
            if self._file_data:
                pieces, self._file_data = self._file_data, []
                for piece in pieces:
                    yield piece
        self._parser.finalize()
        if not self._ended:
            raise BadRequest("body", "a complete multipart/form-data body (it ended before its closing boundary)")
        if not self.has_file:
            raise InvalidInput("file", "a form field 'file' holding the video")

    # -- parser callbacks -------------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}
        self._part = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or name not in FIELDS:
            raise InvalidInput(f"form.{name[:40] or '?'}", "only the form fields file, title and renditions")
        if name == "file":
            if self.has_file:
                raise InvalidInput("file", "one file per upload")
            self.has_file = True
            filename = params.get(b"filename")
            self.filename = None if filename is None else filename.decode("utf-8", "replace")
        elif name in self.fields:
            raise InvalidInput(name, "one value")
        self._part = name
        self._text.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self._file_data.append(data[start:end])
            return
        self._text += data[start:end]
        if len(self._text) > MAX_FIELD_BYTES:
            raise InvalidInput(str(self._part), f"a value of at most {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._part is None or self._part == "file":
            return
        try:
            value = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(self._part, "UTF-8 text") from None
        self.fields[self._part] = value
        if self._on_field is not None:
            self._on_field(self._part, value)

    def _end(self) -> None:
        self._ended = True
