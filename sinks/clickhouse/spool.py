"""A local append-only spool for batches ClickHouse could not take.

When ClickHouse is unreachable the sink appends each batch here instead, so it can commit its
Kafka offsets and keep consuming; once ClickHouse answers again it drains the spool, in order,
before anything newer of the same topic-partition (see :class:`~sinks.clickhouse.ClickHouseSink`).

Layout: one file per topic-partition in one directory, locked by one process at a time
(``flock`` on ``.lock``, released by the kernel when the process dies, even by SIGKILL). A
file is a sequence of frames, one per batch::

    frame   = magic "CHSP" | version u8 | payload length u32 | crc32(payload) u32 | payload
    payload = topic length u16 | topic utf-8 | partition i32 | count u32 | record * count
    record  = offset i64 | timestamp ms i64 | key length i32 (-1: no key) | key
              | value length u32 | value

(big-endian). Each append is written whole and fsynced before :meth:`Spool.append` returns,
so a batch the sink acknowledged is on disk. A crash mid-append leaves a torn last frame: it
is cut off when the spool is opened again (that batch was never acknowledged, so Kafka still
has it). A bad frame that is NOT the last one is damage, not a crash: opening the spool then
fails with :class:`SpoolCorruptError` naming the file and position, and nothing is dropped
silently.

The disk budget (``max_bytes``) counts every frame of every file; an append that would pass it
raises :class:`SpoolFullError` and writes nothing, and so does a failing write (a full disk):
what was written of it is cut off again.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote

from metering.errors import ConfigError
from sinks.errors import SinkError

__all__ = [
    "SPOOL_SUFFIX",
    "Spool",
    "SpoolCorruptError",
    "SpoolEntry",
    "SpoolFile",
    "SpoolFullError",
    "inspect_spool",
    "spool_files",
]

log = logging.getLogger(__name__)

TP = tuple[str, int]

SPOOL_SUFFIX = ".spool"
_MAGIC = b"CHSP"
_VERSION = 1
_FRAME = struct.Struct(">4sBII")
_BATCH = struct.Struct(">iI")
_RECORD = struct.Struct(">qqi")
_VALUE_LEN = struct.Struct(">I")
_TOPIC_LEN = struct.Struct(">H")
_LOCK_NAME = ".lock"


class SpoolFullError(SinkError):
    """The append would pass the spool's disk budget (or the disk is full); nothing was written."""


class SpoolCorruptError(SinkError):
    """A spool file is damaged before its last frame; it needs an operator, not a retry."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One Kafka message as spooled: its coordinates and its value bytes."""

    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes


@dataclass(slots=True)
class _File:
    path: Path
    size: int = 0
    frames: int = 0
    records: int = 0
    first_offset: int = -1
    last_offset: int = -1
    fd: int | None = None


def spool_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The spool files in ``directory`` (for inspection: does not lock, does not validate)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.endswith(SPOOL_SUFFIX))


@dataclass(frozen=True, slots=True)
class SpoolFile:
    """What one spool file holds, as :func:`inspect_spool` reads it."""

    topic: str
    partition: int
    frames: int
    records: int
    offsets: tuple[int, ...]
    torn_tail: bool


def inspect_spool(directory: str | os.PathLike[str]) -> list[SpoolFile]:
    """Read the spool files in ``directory`` without locking or changing them (for operators
    and tests); a file being appended to may show a torn tail."""
    out: list[SpoolFile] = []
    for path in spool_files(directory):
        topic_part, _, part = path.name[: -len(SPOOL_SUFFIX)].rpartition("@")
        frames = records = 0
        offsets: list[int] = []
        torn = False
        try:
            for _, _, entries in _frames(path):
                if entries is None:
                    torn = True
                    break
                frames += 1
                records += len(entries)
                offsets.extend(e.offset for e in entries)
        except FileNotFoundError:  # drained and deleted meanwhile
            continue
        out.append(SpoolFile(unquote(topic_part), int(part), frames, records, tuple(offsets), torn))
    return out


def _file_name(topic: str, partition: int) -> str:
    return f"{quote(topic, safe='._-')}@{partition}{SPOOL_SUFFIX}"


def _encode_frame(topic: str, partition: int, entries: Sequence[SpoolEntry]) -> bytes:
    name = topic.encode("utf-8")
    parts: list[bytes] = [_TOPIC_LEN.pack(len(name)), name, _BATCH.pack(partition, len(entries))]
    for e in entries:
        if e.key is None:
            parts.append(_RECORD.pack(e.offset, e.timestamp_ms, -1))
        else:
            parts.append(_RECORD.pack(e.offset, e.timestamp_ms, len(e.key)))
            parts.append(e.key)
        parts.append(_VALUE_LEN.pack(len(e.value)))
        parts.append(e.value)
    payload = b"".join(parts)
    return _FRAME.pack(_MAGIC, _VERSION, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> tuple[str, int, list[SpoolEntry]]:
    (n,) = _TOPIC_LEN.unpack_from(payload, 0)
    pos = _TOPIC_LEN.size
    topic = payload[pos:pos + n].decode("utf-8")
    pos += n
    partition, count = _BATCH.unpack_from(payload, pos)
    pos += _BATCH.size
    entries: list[SpoolEntry] = []
    for _ in range(count):
        offset, ts, key_len = _RECORD.unpack_from(payload, pos)
        pos += _RECORD.size
        key: bytes | None = None
        if key_len >= 0:
            key = payload[pos:pos + key_len]
            pos += key_len
        (value_len,) = _VALUE_LEN.unpack_from(payload, pos)
        pos += _VALUE_LEN.size
        entries.append(SpoolEntry(offset, ts, key, payload[pos:pos + value_len]))
        pos += value_len
    if pos != len(payload):
        raise ValueError(f"{len(payload) - pos} bytes left over after {count} records")
    return topic, partition, entries


def _frames(path: Path) -> Iterator[tuple[int, int, list[SpoolEntry] | None]]:
    """Yield ``(start, end, entries)`` per frame; ``entries`` is None for a bad frame, which is
    then the last thing yielded."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(_FRAME.size)
            if len(head) < _FRAME.size:
                yield pos, size, None
                return
            magic, version, length, crc = _FRAME.unpack(head)
            if magic != _MAGIC or version != _VERSION:
                # a torn append starts with our magic; only zeros (a file extended by a
                # crash, its data never written) may stand here at the end of a file
                rest = head + f.read()
                yield pos, (pos if rest.strip(b"\0") else size), None
                return
            payload = f.read(length)
            end = pos + _FRAME.size + length
            if len(payload) < length or zlib.crc32(payload) != crc:
                yield pos, min(end, size), None
                return
            try:
                _, _, entries = _decode_payload(payload)
            except (ValueError, struct.error, UnicodeDecodeError):
                yield pos, end, None
                return
            yield pos, end, entries
            pos = end


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Append-only per-topic-partition batch files under ``directory``, within ``max_bytes``.

    Not thread-safe: the sink calls it under its own lock. Opening validates every file (see
    the module docstring) and takes the directory's lock; :meth:`close` releases it.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(self._lock_fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConfigError(
                f"spool directory {self.directory} is in use by another sink process "
                f"(pid {holder or '?'}); give each sink instance its own SPOOL_DIR"
            ) from exc
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._files: dict[TP, _File] = {}
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ---- opening -------------------------------------------------------------------------

    def _load(self) -> None:
        for path in spool_files(self.directory):
            name = path.name[: -len(SPOOL_SUFFIX)]
            topic_part, _, part = name.rpartition("@")
            try:
                tp = (unquote(topic_part), int(part))
            except ValueError:
                raise SpoolCorruptError(f"unexpected file in the spool directory: {path}") from None
            info = _File(path)
            for start, end, entries in _frames(path):
                if entries is None:
                    if end < path.stat().st_size:
                        raise SpoolCorruptError(
                            f"spool file {path} is damaged at byte {start} with data after it; "
                            "move it aside to inspect it (its batches are committed in Kafka)"
                        )
                    log.warning("spool file %s: cutting off a torn last frame at byte %d "
                                "(a crash mid-append; Kafka still has that batch)", path, start)
                    with open(path, "r+b") as f:
                        f.truncate(start)
                        os.fsync(f.fileno())
                    break
                if entries:
                    if info.first_offset < 0:
                        info.first_offset = entries[0].offset
                    info.last_offset = max(info.last_offset, entries[-1].offset)
                info.frames += 1
                info.records += len(entries)
                info.size = end
            if info.frames == 0:
                path.unlink()
                continue
            self._files[tp] = info
            log.warning("spool %s holds %d messages of %s[%d] (offsets %d..%d) to drain",
                        path, info.records, tp[0], tp[1], info.first_offset, info.last_offset)

    # ---- what is in it -------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of every frame of every file."""
        return sum(f.size for f in self._files.values())

    def partitions(self) -> list[TP]:
        """The topic-partitions with spooled messages, sorted."""
        return sorted(self._files)

    def has(self, tp: TP) -> bool:
        """Whether ``tp`` has spooled messages."""
        return tp in self._files

    def next_offset(self, tp: TP) -> int | None:
        """The offset after the highest spooled message of ``tp`` (None: nothing spooled)."""
        info = self._files.get(tp)
        return None if info is None else info.last_offset + 1

    def records(self, tp: TP | None = None) -> int:
        """Spooled messages of ``tp`` (of all partitions without it)."""
        if tp is not None:
            info = self._files.get(tp)
            return 0 if info is None else info.records
        return sum(f.records for f in self._files.values())

    # ---- writing and reading ---------------------------------------------------------------

    def append(self, topic: str, partition: int, entries: Sequence[SpoolEntry]) -> int:
        """Append one batch as one frame and fsync it; return the bytes written.

        Raises :class:`SpoolFullError` (nothing written) past the budget or on a full disk.
        """
        if not entries:
            return 0
        frame = _encode_frame(topic, partition, entries)
        total = self.total_bytes
        if total + len(frame) > self.max_bytes:
            raise SpoolFullError(
                f"spool full: {total} + {len(frame)} bytes would pass the budget of "
                f"{self.max_bytes} bytes"
            )
        tp = (topic, partition)
        info = self._files.get(tp)
        created = info is None
        if info is None:
            info = _File(self.directory / _file_name(topic, partition))
        if info.fd is None:
            info.fd = os.open(info.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(frame)
            while view:
                written = os.write(info.fd, view)
                view = view[written:]
            os.fsync(info.fd)
            if created:
                _fsync_dir(self.directory)
        except OSError as exc:
            # never leave a partial frame in front of the next append
            try:
                os.ftruncate(info.fd, info.size)
            except OSError:
                log.exception("spool %s: cannot cut off a failed append", info.path)
            if created:
                os.close(info.fd)
                info.fd = None
                info.path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool disk full: {exc}") from exc
            raise
        info.size += len(frame)
        info.frames += 1
        info.records += len(entries)
        if info.first_offset < 0:
            info.first_offset = entries[0].offset
        info.last_offset = max(info.last_offset, entries[-1].offset)
        self._files[tp] = info
        return len(frame)

    def read(self, tp: TP) -> Iterator[list[SpoolEntry]]:
        """The spooled batches of ``tp``, oldest first, one list per appended batch."""
        info = self._files.get(tp)
        if info is None:
            return
        for start, _end, entries in _frames(info.path):
            if start >= info.size:
                return
            if entries is None:
                raise SpoolCorruptError(f"spool file {info.path} became unreadable at byte {start}")
            yield entries

    def clear(self, tp: TP) -> None:
        """Forget ``tp``'s spooled batches (once they are stored) and delete its file."""
        info = self._files.pop(tp, None)
        if info is None:
            return
        if info.fd is not None:
            os.close(info.fd)
        info.path.unlink(missing_ok=True)
        _fsync_dir(self.directory)

    def close(self) -> None:
        """Close the files and release the directory lock; calling it twice is harmless."""
        for info in self._files.values():
            if info.fd is not None:
                os.close(info.fd)
                info.fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
