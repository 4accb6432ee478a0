"""Typed configuration, read once at start-up from env vars and an optional TOML file.

Precedence: environment variables, then the file named by ``METERING_CONFIG``, then defaults.
A wrong value fails fast with a :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from metering.errors import ConfigError

__all__ = ["DEFAULT_SCORE_WEIGHTS", "Settings", "load_settings"]

#: billaged's composite score: cpu_seconds*1.0 + memory_gb*0.5 + disk_mb*0.3
DEFAULT_SCORE_WEIGHTS: dict[str, Decimal] = {
    "cpu_seconds": Decimal("1.0"),
    "memory_gb": Decimal("0.5"),
    "disk_mb": Decimal("0.3"),
}

#: a host name or IPv4 address alone: no scheme, port, path or spaces
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _is_ip(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


class Settings(BaseSettings):
    """Every setting of the pipeline; env var names are the field names upper-cased."""

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False)

    kafka_bootstrap_servers: str | None = Field(
        default=None, description="Existing Kafka; unset means start the embedded Tansu broker."
    )
    topic_partitions: int = Field(default=4, ge=1, le=1024)
    topic_replication_factor: int = Field(default=1, ge=-1, description="-1: the broker's default")
    topic_prefix: str = Field(default="", description="Prepended to every topic name.")
    consumer_group_prefix: str = Field(default="metering")

    clickhouse_url: str | None = Field(
        default=None,
        description="clickhouse://user:password@host:9000/database; unset means embedded chdb.",
    )
    chdb_path: str = Field(default=".metering/chdb")

    window_sizes_seconds: list[int] = Field(
        default_factory=lambda: [60, 3600], description="Tumbling window sizes (event time)."
    )
    allowed_lateness_seconds: int = Field(default=10, ge=0)
    idle_close_seconds: float = Field(
        default=30.0, gt=0, description="Advance an idle partition's watermark by wall clock."
    )
    vm_heartbeat_timeout_seconds: int = Field(
        default=60, ge=0, description="A VM silent in heartbeats this long marks a window as gapped."
    )
    dedup_horizon_seconds: int = Field(
        default=86_400, ge=0, description="Drop a repeated event_id seen within this long; 0 disables."
    )
    score_weights: dict[str, Decimal] = Field(default_factory=lambda: dict(DEFAULT_SCORE_WEIGHTS))
    metric_aggregations: dict[str, str] = Field(
        default_factory=dict,
        description="metric -> sum|count|max|latest|unique_count|resource_mean|time_weighted; "
        "extends and overrides the built-in table (streams/aggregations.py).",
    )

    quota_file: str | None = Field(
        default=None, description="TOML file of quota limits; run-time limits go to quota.limits."
    )
    quota_thresholds_percent: list[int] = Field(
        default_factory=lambda: [80, 100], description="Alert thresholds of a limit that sets none."
    )

    webhook_url: str | None = None
    webhook_secret: str | None = Field(default=None, description="whsec_<base64>")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_alerts: bool = Field(
        default=True, description="The webhook sink also delivers quota.alerts (usage.window format)."
    )

    sink_batch_size: int = Field(default=10_000, ge=1)
    sink_flush_seconds: float = Field(default=1.0, gt=0)
    retention_months: int = Field(default=36, ge=1)
    spool_dir: str = Field(
        default=".metering/spool",
        description="Where the ClickHouse sink spools batches while ClickHouse is unreachable; "
        "empty disables spooling.",
    )
    spool_max_bytes: int = Field(
        default=1 << 30, ge=1 << 20, description="Disk budget of the spool; past it the sink pauses."
    )
    clickhouse_cluster: str | None = Field(
        default=None, description="Run DDL ON CLUSTER with replicated engines (cluster mode)."
    )

    worker_datadir: str = Field(default=".metering/faust")
    worker_web_port: int = Field(default=6066, ge=0, le=65535)
    worker_web_bind: str = Field(
        default="127.0.0.1",
        description="Interface the live views listen on; 0.0.0.0 when other workers (or users) "
        "reach them from other hosts or containers.",
    )
    worker_web_host: str = Field(
        default="",
        description="Host name other workers use to reach this one (views are forwarded to the "
        "tenant's owner); empty: 127.0.0.1 when bound to loopback, else this machine's host name.",
    )

    @field_validator("score_weights")
    @classmethod
    def _known_weights(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        unknown = set(v) - set(DEFAULT_SCORE_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown score terms {sorted(unknown)}; known: cpu_seconds, memory_gb, disk_mb")
        negative = {term: str(w) for term, w in v.items() if w < 0}
        if negative:
            # a negative weight makes a score fall as usage grows: a bill that pays the tenant
            raise ValueError(f"negative weights {negative}; a weight is 0 or more")
        return {**DEFAULT_SCORE_WEIGHTS, **v}

    @field_validator("metric_aggregations")
    @classmethod
    def _aggregations(cls, v: dict[str, str]) -> dict[str, str]:
        from streams.aggregations import AGGREGATIONS, DEFAULT_METRIC_AGGREGATIONS

        bad = {m: a for m, a in v.items() if a not in AGGREGATIONS}
        if bad:
            raise ValueError(f"unknown aggregations {bad}; known: {', '.join(AGGREGATIONS)}")
        return {**DEFAULT_METRIC_AGGREGATIONS, **v}

    @field_validator("window_sizes_seconds")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("must be a non-empty list of positive seconds, e.g. [60, 3600]")
        return sorted(set(v))

    @field_validator("quota_thresholds_percent")
    @classmethod
    def _thresholds(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= x <= 1000 for x in v):
            raise ValueError("must be a non-empty list of whole percentages from 1 to 1000, e.g. [80, 100]")
        return sorted(set(v))

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, v: str | None) -> str | None:
        if v is not None:
            if not v.startswith("whsec_"):
                raise ValueError("must start with 'whsec_' (Standard Webhooks secret format)")
            try:
                key = base64.b64decode(v[6:], validate=True)
            except ValueError as exc:
                raise ValueError("the part after 'whsec_' must be base64") from exc
            if not key:
                raise ValueError("the key after 'whsec_' is empty")
        return v

    @field_validator("topic_replication_factor")
    @classmethod
    def _replicas(cls, v: int) -> int:
        if v == 0:  # Kafka refuses it when creating the topics
            raise ValueError("must be -1 (the broker's default) or at least 1")
        return v

    @field_validator("worker_web_bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        if not (_HOST_NAME.fullmatch(v) or _is_ip(v)):
            raise ValueError("must be an interface address or host name, e.g. 127.0.0.1 or 0.0.0.0 (all)")
        return v

    @field_validator("worker_web_host")
    @classmethod
    def _web_host(cls, v: str) -> str:
        # peers forward to http://<host>:<WORKER_WEB_PORT>, so the host stands alone
        if v and not (_HOST_NAME.fullmatch(v) or (v[:1] == "[" and v[-1:] == "]" and _is_ip(v[1:-1]))):
            raise ValueError("must be a bare host name or address (no scheme or port; IPv6 in brackets)")
        return v

    def topic(self, name: str) -> str:
        """The full name of a logical topic (``usage.records`` ...)."""
        return f"{self.topic_prefix}{name}"


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read and validate the settings once; raise ConfigError naming the bad setting."""
    path = config_file or os.environ.get("METERING_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"METERING_CONFIG={path}: cannot read: {exc}") from exc
    env_names = {k.lower() for k in os.environ}
    # env vars win over the file: drop file keys the environment also sets
    merged = {k: v for k, v in file_values.items() if k.lower() not in env_names}
    merged.update(overrides)
    try:
        return Settings(**merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
    except SettingsError as exc:
        # a list or table from the environment is decoded as JSON before validation
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1).upper() if field else "environment"
        raise ConfigError(
            f"invalid configuration: {name}: not valid JSON ({exc.__cause__}), e.g. [60, 3600] or "
            '{"cpu_seconds": "1.0"}'
        ) from exc
