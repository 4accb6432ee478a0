"""Two ways to talk to ClickHouse behind one small interface.

:class:`NativeBackend` speaks the native protocol to a server (clickhouse-driver);
:class:`ChdbBackend` runs ClickHouse in-process (chdb) for the embedded default. Both return
the same Python types, take the same row tuples, and raise only :mod:`sinks.errors` types:
:class:`~sinks.errors.SinkUnavailableError` when the server cannot be reached (retry later),
:class:`ClickHouseBusyError` when it is overloaded (the batching base pauses and retries),
:class:`ClickHouseError` for everything else (a bug or a schema problem: retrying won't help).

Values: ``Decimal`` stays ``decimal.Decimal`` end to end (never a float), ``DateTime`` is a
naive ``datetime`` in UTC (aware ones are accepted on insert, and so are ``int`` epoch
seconds, which skip a conversion per value), ``Date`` is ``date``, arrays are lists.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from metering.errors import ConfigError
from sinks.errors import BackpressureError, SinkError, SinkUnavailableError

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = [
    "ChdbBackend",
    "ClickHouseBackend",
    "ClickHouseBusyError",
    "ClickHouseError",
    "NativeBackend",
    "backend_from_settings",
    "sql_string",
]

_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1)

#: server error codes that mean "overloaded, try the same thing again shortly"
_BUSY_CODES = frozenset({
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    241,  # MEMORY_LIMIT_EXCEEDED
    252,  # TOO_MANY_PARTS
})
#: server error codes that mean "cannot serve right now", like a lost connection
_UNAVAILABLE_CODES = frozenset({
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    225,  # NO_ZOOKEEPER
    242,  # TABLE_IS_READ_ONLY (a replica lost its coordinator)
    319,  # UNKNOWN_STATUS_OF_INSERT
    999,  # KEEPER_EXCEPTION
})
_BUSY_RETRY_SECONDS = 2.0
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_CODE = re.compile(r"Code:\s*(\d+)")
_NAMED_ELEMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]* (.+)$")


class ClickHouseError(SinkError):
    """ClickHouse rejected a statement (bad SQL, schema mismatch ...); retrying won't help."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ClickHouseBusyError(BackpressureError, ClickHouseError):
    """ClickHouse is overloaded (too many parts, memory, concurrent queries): retry later.

    A :class:`~sinks.errors.BackpressureError`, so the batching base pauses the consumer and
    retries the same batch instead of crashing the sink.
    """

    def __init__(self, message: str, code: int | None = None,
                 retry_after: float = _BUSY_RETRY_SECONDS) -> None:
        BackpressureError.__init__(self, message, retry_after)
        self.code = code


def sql_string(value: str) -> str:
    """Quote ``value`` as a ClickHouse string literal (backslash and quote escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_identifier(name: str) -> str:
    # table and column names are spliced into SQL, so only plain identifiers are allowed
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain ClickHouse identifier: {name!r}")
    return name


def _short(text: str, limit: int = 800) -> str:
    # 18.16 appends a long native stack trace to every message; it helps nobody in a log line
    text = text.split("Stack trace:", 1)[0].strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _sql_head(sql: str) -> str:
    # never put inserted data into an error message, only what the statement was
    return " ".join(sql.strip().split("\n", 1)[0].split())[:200]


def _classify(code: int | None, message: str) -> SinkError:
    if code in _BUSY_CODES:
        return ClickHouseBusyError(message, code)
    if code in _UNAVAILABLE_CODES:
        return SinkUnavailableError(message)
    return ClickHouseError(message, code)


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.strip().strip('"').split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    if not parts:
        raise ClickHouseError(f"cannot parse server version {text!r}")
    return tuple(parts)


class ClickHouseBackend(ABC):
    """What the sink, the migrations and the readers need from ClickHouse."""

    _version: tuple[int, ...] | None = None

    @abstractmethod
    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a SELECT and return its rows as tuples of Python values."""

    @abstractmethod
    def execute(self, sql: str) -> None:
        """Run a statement that returns no rows (DDL, INSERT ... SELECT, SYSTEM ...)."""

    @abstractmethod
    def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Insert row tuples (values in ``columns`` order) as ONE INSERT statement."""

    def insert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[Sequence[Any]]
    ) -> None:
        """Insert column lists (``data[i]`` holds column ``columns[i]``) as ONE INSERT.

        The default transposes to rows; a backend whose protocol is columnar overrides it.
        """
        if len(data) != len(columns):
            raise ValueError(f"{len(data)} column lists for {len(columns)} columns")
        self.insert(table, columns, list(zip(*data, strict=True)))

    @abstractmethod
    def close(self) -> None:
        """Release the connection or session; calling it twice is harmless."""

    def server_version(self) -> tuple[int, ...]:
        """The server's version, e.g. ``(18, 16, 1)`` or ``(26, 9, 2, 1)``."""
        if self._version is None:
            rows = self.query("SELECT version()")
            self._version = _parse_version(str(rows[0][0]))
        return self._version

    def __enter__(self) -> ClickHouseBackend:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---- native protocol ----------------------------------------------------------------------


def _naive_utc(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            return value.astimezone(_UTC).replace(tzinfo=None)
        return value
    if isinstance(value, list):
        return [_naive_utc(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_naive_utc(v) for v in value)
    return value


class NativeBackend(ClickHouseBackend):
    """A ClickHouse server over the native protocol (clickhouse-driver).

    ``url`` is ``clickhouse://user:password@host:port/database`` (``clickhouses://`` for TLS;
    query parameters such as ``?connect_timeout=5`` go to the driver). The connection is
    opened lazily and re-opened after a network error. One lock serialises calls, because a
    driver client is not thread-safe and a sink thread and a reader may share a backend.
    """

    def __init__(self, url: str) -> None:
        from clickhouse_driver import Client

        if not url.startswith(("clickhouse://", "clickhouses://")):
            raise ConfigError(
                "CLICKHOUSE_URL: expected clickhouse://user:password@host:port/database, "
                f"got {url.split('@')[-1]!r}"
            )
        try:
            self._client = Client.from_url(url)
        except ValueError as exc:
            raise ConfigError(f"CLICKHOUSE_URL: {exc}") from exc
        self._lock = threading.Lock()

    def _call(self, sql: str, fn: Callable[[], Any]) -> Any:
        from clickhouse_driver import errors as chd_errors

        with self._lock:
            try:
                return fn()
            except (chd_errors.NetworkError, chd_errors.SocketTimeoutError, OSError,
                    EOFError) as exc:
                self._client.disconnect()
                raise SinkUnavailableError(
                    f"ClickHouse unreachable during {_sql_head(sql)!r}: {_short(str(exc))}"
                ) from exc
            except (chd_errors.Error, TypeError, ValueError) as exc:
                # TypeError/ValueError: the driver could not encode a value for its column
                code = getattr(exc, "code", None)
                msg = f"ClickHouse error during {_sql_head(sql)!r}: {_short(str(exc))}"
                if code in _UNAVAILABLE_CODES:
                    self._client.disconnect()
                raise _classify(code, msg) from exc

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a SELECT; DateTime values come back as naive UTC datetimes."""
        rows, types = self._call(sql, lambda: self._client.execute(sql, with_column_types=True))
        # DateTime('UTC') columns come back tz-aware from the driver; chdb gives naive UTC
        dt_cols = [i for i, (_, typ) in enumerate(types) if "DateTime" in typ]
        if not dt_cols:
            return [tuple(r) for r in rows]
        out = []
        for r in rows:
            row = list(r)
            for i in dt_cols:
                row[i] = _naive_utc(row[i])
            out.append(tuple(row))
        return out

    def execute(self, sql: str) -> None:
        """Run a statement that returns no rows."""
        self._call(sql, lambda: self._client.execute(sql))

    def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """One INSERT; sent column-wise, which the driver encodes much faster than rows."""
        if not rows:
            return
        data = [list(col) for col in zip(*rows, strict=True)]
        if len(data) != len(columns):
            raise ValueError(f"rows have {len(data)} values, columns are {len(columns)}")
        self.insert_columns(table, columns, data)

    def insert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[Sequence[Any]]
    ) -> None:
        """One columnar INSERT of the column lists, as the native protocol sends them anyway.

        The driver may convert values inside the lists it is given (it does for Decimal):
        pass lists the caller will not read again.
        """
        if len(data) != len(columns):
            raise ValueError(f"{len(data)} column lists for {len(columns)} columns")
        if not data or not len(data[0]):
            return
        cols = ", ".join(_check_identifier(c) for c in columns)
        sql = f"INSERT INTO {_check_identifier(table)} ({cols}) VALUES"
        self._call(sql, lambda: self._client.execute(sql, data, columnar=True))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._client.disconnect()


# ---- in-process chdb -----------------------------------------------------------------------

_JSON_FORMAT = "JSONCompact"


def _json_value(value: Any) -> Any:
    """A value of a row as JSONEachRow input accepts it, without losing digits."""
    if value is None or isinstance(value, str | int | float):
        return int(value) if isinstance(value, bool) else value
    if isinstance(value, Decimal):
        # 'f' never switches to exponent notation (str(Decimal('1E-9')) would)
        return format(value, "f")
    if isinstance(value, dt.datetime):
        # epoch seconds are parsed the same whatever the column's or session's time zone;
        # a naive datetime is UTC by this module's contract
        if value.tzinfo is not None:
            value = value.astimezone(_UTC)
        return calendar.timegm(value.timetuple())
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8")
    raise TypeError(f"cannot insert a {type(value).__name__} value into ClickHouse")


def _split_type_args(inner: str) -> list[str]:
    args, depth, start, quoted = [], 0, 0, False
    for i, ch in enumerate(inner):
        if ch == "'" and (i == 0 or inner[i - 1] != "\\"):
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
    args.append(inner[start:].strip())
    return args


def _converter(typ: str) -> Callable[[Any], Any]:
    """How to turn one JSONCompact value of ClickHouse type ``typ`` into a Python value."""
    name, _, rest = typ.partition("(")
    inner = rest[:-1] if rest.endswith(")") else ""
    if name in ("Nullable", "LowCardinality"):
        conv = _converter(inner)
        return lambda v: None if v is None else conv(v)
    if name == "Array":
        conv = _converter(inner)
        return lambda v: [conv(x) for x in v]
    if name == "Tuple":
        # named elements print as "name Type"; a bare type never has a space before "("
        convs = [_converter(m.group(1) if (m := _NAMED_ELEMENT.match(a)) else a)
                 for a in _split_type_args(inner)]
        return lambda v: tuple(c(x) for c, x in zip(convs, v, strict=False))
    if name.startswith(("UInt", "Int")):
        return int
    if name.startswith("Float"):
        return lambda v: None if v is None else float(v)
    if name.startswith("Decimal"):
        return lambda v: Decimal(str(v)) if not isinstance(v, Decimal) else v
    if name == "DateTime":
        # the session prints DateTime as epoch seconds, see ChdbBackend.__init__
        return lambda v: _EPOCH + dt.timedelta(seconds=int(v))
    if name == "DateTime64":
        return lambda v: _EPOCH + dt.timedelta(
            microseconds=int(Decimal(str(v)).scaleb(6).to_integral_value())
        )
    if name in ("Date", "Date32"):
        return lambda v: dt.date.fromisoformat(v)
    if name == "Bool":
        return bool
    return lambda v: v


class ChdbBackend(ClickHouseBackend):
    """ClickHouse in this process (chdb), its data in directory ``path``.

    chdb runs one embedded server per process, bound to one path until every session on it
    is closed; sessions on the same path share it. A lock serialises the calls of this
    backend, which a sink thread and a reader thread may share. Rows are inserted as
    ``FORMAT JSONEachRow``: JSON string escaping is exact for any text, decimals go as
    decimal strings (never through float), DateTime as epoch seconds.
    """

    def __init__(self, path: str) -> None:
        from chdb import session as chdb_session

        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._session = chdb_session.Session(path)
        except Exception as exc:
            raise self._translate(exc, f"open chdb at {path}") from exc
        try:
            # UTC for anything computed without a column time zone; epoch seconds on output,
            # so query() never has to guess which zone a printed DateTime was in
            self.execute("SET session_timezone = 'UTC'")
            self.execute("SET date_time_output_format = 'unix_timestamp'")
            self.execute("SET output_format_json_quote_64bit_integers = 0")
            self.execute("SET output_format_json_quote_decimals = 0")
        except SinkError:
            self.close()  # an open session would pin the process's chdb to this path
            raise

    @staticmethod
    def _translate(exc: Exception, sql: str) -> SinkError:
        text = str(exc)
        match = _CODE.search(text)
        code = int(match.group(1)) if match else None
        return _classify(code, f"chdb error during {_sql_head(sql)!r}: {_short(text)}")

    def _run(self, sql: str, fmt: str) -> Any:
        with self._lock:
            if self._closed:
                raise ClickHouseError(f"chdb backend on {self.path} is closed")
            try:
                return self._session.query(sql, fmt)
            except Exception as exc:  # chdb raises RuntimeError subclasses for server errors
                raise self._translate(exc, sql) from exc

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a SELECT and convert its JSONCompact output by the column types it reports."""
        result = self._run(sql, _JSON_FORMAT)
        raw = result.bytes() if result is not None else b""
        if not raw.strip():
            return []
        # parse_float=Decimal keeps every printed digit of a Decimal column exact
        doc = json.loads(raw, parse_float=Decimal)
        convs = [_converter(col["type"]) for col in doc.get("meta", [])]
        return [tuple(c(v) for c, v in zip(convs, row, strict=True)) for row in doc["data"]]

    def execute(self, sql: str) -> None:
        """Run a statement that returns no rows."""
        self._run(sql, "CSV")

    def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """One ``INSERT ... FORMAT JSONEachRow`` statement carrying every row."""
        if not rows:
            return
        cols = [_check_identifier(c) for c in columns]
        head = f"INSERT INTO {_check_identifier(table)} ({', '.join(cols)}) FORMAT JSONEachRow\n"
        try:
            body = b"\n".join(
                orjson.dumps(dict(zip(cols, (_json_value(v) for v in row), strict=True)))
                for row in rows
            )
        except (TypeError, ValueError, UnicodeDecodeError, orjson.JSONEncodeError) as exc:
            raise ClickHouseError(f"cannot encode rows for {table}: {exc}") from exc
        self._run(head + body.decode("utf-8"), "CSV")

    def close(self) -> None:
        """Close the session (the embedded server stops once no session uses its path)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._session.close()
            except Exception as exc:
                raise self._translate(exc, "close chdb session") from exc


def backend_from_settings(settings: Settings) -> ClickHouseBackend:
    """``NativeBackend`` when ``CLICKHOUSE_URL`` is set, else chdb at ``CHDB_PATH``."""
    if settings.clickhouse_url:
        return NativeBackend(settings.clickhouse_url)
    return ChdbBackend(settings.chdb_path)
