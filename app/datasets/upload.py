"""Streaming multipart uploads: the file part goes straight to a temporary file in storage while its
sha256 is computed, and the size limit is enforced as bytes arrive (also without Content-Length). The
body is never held whole in memory, and a failed or refused upload leaves no file behind."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.core.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from graft.errors import GraftError, StorageFull
from graft.storage import Storage, is_disk_full

MAX_FIELD_BYTES = 64 * 1024  # a text field of a form; a route may allow more (a model import's config)
MAX_FIELDS = 32
# Room for the multipart framing and the text fields around the file.
FRAMING_BYTES = 64 * 1024
HEAD_BYTES = 512
# RFC 2046 allows 70 characters; clients that send more still work up to what the parser takes.
MAX_BOUNDARY_CHARS = 256


@dataclass
class ReceivedUpload:
    fields: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    head: bytes = b""

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# File data is written (and hashed) in threads, this many bytes at a time: the event loop never waits for
# the disk, and one thread hop per megabyte costs little.
WRITE_BUFFER_BYTES = 1024 * 1024


class _Receiver:
    """python-multipart's callbacks collect the file's bytes; `flush` writes them off the event loop."""

    def __init__(self, storage: Storage, file_field: str, max_bytes: int, max_field_bytes: int) -> None:
        self.storage = storage
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.max_field_bytes = max_field_bytes
        self.result = ReceivedUpload()
        self._hash = hashlib.sha256()
        self._handle: BinaryIO | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._file_ended = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._field_name: str | None = None
        self._field_data = bytearray()
        self._is_file = False

    # python-multipart callbacks (no I/O) ------------------------------------------------------
    def on_part_begin(self) -> None:
        self._headers = {}
        self._field_name = None
        self._field_data = bytearray()
        self._is_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _kind, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise InvalidRequest("a multipart part has no name")
        self._field_name = name
        if name == self.file_field:
            if self.result.path is not None:
                raise InvalidRequest(f"send one '{self.file_field}' part, not several", param=self.file_field)
            filename = options.get(b"filename")
            self.result.filename = filename.decode("utf-8", "replace") if filename else None
            self.result.path = self.storage.new_temp_path()
            self._is_file = True
        elif len(self.result.fields) >= MAX_FIELDS:
            raise InvalidRequest(f"more than {MAX_FIELDS} form fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.result.size += len(chunk)
            if self.result.size > self.max_bytes:
                raise PayloadTooLarge(
                    f"the file is larger than the limit of {self.max_bytes} bytes", param=self.file_field
                )
            if len(self.result.head) < HEAD_BYTES:
                self.result.head += chunk[: HEAD_BYTES - len(self.result.head)]
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
        else:
            self._field_data += chunk
            if len(self._field_data) > self.max_field_bytes:
                raise InvalidRequest(
                    f"form field '{self._field_name}' is longer than {self.max_field_bytes} bytes",
                    param=self._field_name,
                )

    def on_part_end(self) -> None:
        if self._is_file:
            self._file_ended = True
            self._is_file = False
            return
        assert self._field_name is not None
        try:
            self.result.fields[self._field_name] = self._field_data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"form field '{self._field_name}' is not UTF-8", param=self._field_name
            ) from None

    # file I/O, in threads ------------------------------------------------------------------------
    def _write_pending(self, data: bytes, end: bool) -> None:
        if self._handle is None:
            assert self.result.path is not None
            self._handle = self.result.path.open("wb")
        self._handle.write(data)
        self._hash.update(data)
        if end:
            self._handle.close()
            self._handle = None
            self.result.sha256 = self._hash.hexdigest()

    async def flush(self, *, force: bool = False) -> None:
        end = self._file_ended
        if not (end or (self._pending_bytes and (force or self._pending_bytes >= WRITE_BUFFER_BYTES))):
            return
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._file_ended = False
        await anyio.to_thread.run_sync(self._write_pending, data, end)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


async def receive_multipart(
    request: Request,
    storage: Storage,
    *,
    max_bytes: int,
    file_field: str = "file",
    max_field_bytes: int = MAX_FIELD_BYTES,
) -> ReceivedUpload:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(
            f"send multipart/form-data with a '{file_field}' part (curl -F {file_field}=@data.csv)",
            param=file_field,
        )
    if len(boundary) > MAX_BOUNDARY_CHARS:
        raise InvalidRequest(
            f"the multipart boundary is {len(boundary)} characters long; at most {MAX_BOUNDARY_CHARS}",
            param="Content-Type",
        )
    body_limit = max_bytes + FRAMING_BYTES + MAX_FIELDS * max_field_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise PayloadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes", param=file_field)

    receiver = _Receiver(storage, file_field, max_bytes, max_field_bytes)
    received = 0
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": receiver.on_part_begin,
                "on_header_field": receiver.on_header_field,
                "on_header_value": receiver.on_header_value,
                "on_header_end": receiver.on_header_end,
                "on_headers_finished": receiver.on_headers_finished,
                "on_part_data": receiver.on_part_data,
                "on_part_end": receiver.on_part_end,
            },
        )
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise PayloadTooLarge(
                    f"the upload is larger than the limit of {max_bytes} bytes", param=file_field
                )
            parser.write(chunk)
            await receiver.flush()
        parser.finalize()
        await receiver.flush(force=True)
        if receiver.result.path is not None and not receiver.result.sha256:
            raise InvalidRequest("the upload ended before the file was complete", param=file_field)
    except ClientDisconnect:
        await anyio.to_thread.run_sync(_abandon, receiver)
        raise InvalidRequest("the client disconnected before the upload finished", param=file_field) from None
    except Exception as exc:
        await anyio.to_thread.run_sync(_abandon, receiver)
        if isinstance(exc, GraftError):
            raise
        if is_disk_full(exc):
            raise StorageFull(
                f"the service's storage is full: no space left for this upload after {received} bytes; nothing "
                "was stored. Retry once space is freed",
                param=file_field,
            ) from None
        raise InvalidRequest(f"malformed multipart body ({exc})", param=file_field) from None
    return receiver.result


def _abandon(receiver: _Receiver) -> None:
    receiver.close()
    receiver.result.discard()
