"""Settings: the documented defaults, the documented precedence (explicit overrides, then
environment variables, then the TOML file of ``METERING_CONFIG``, then defaults) and the rule
that a wrong value fails fast with a :class:`ConfigError` naming the setting, whichever way
the value arrives (environment, file, or a caller's override)."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from metering.config import DEFAULT_SCORE_WEIGHTS, Settings, load_settings
from metering.errors import ConfigError
from streams.aggregations import DEFAULT_METRIC_AGGREGATIONS


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from an environment without settings: a developer's or CI's own
    ``KAFKA_BOOTSTRAP_SERVERS`` (or any other setting) would otherwise leak into "defaults"."""
    monkeypatch.delenv("METERING_CONFIG", raising=False)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "metering.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_documented_ones() -> None:
    # the README's settings table: a changed default changes every deployment that relies on it
    s = load_settings()
    assert s.kafka_bootstrap_servers is None  # unset: the embedded broker
    assert s.clickhouse_url is None  # unset: chdb
    assert s.chdb_path == ".metering/chdb"
    assert s.window_sizes_seconds == [60, 3600]
    assert s.allowed_lateness_seconds == 10
    assert s.idle_close_seconds == 30.0
    assert s.dedup_horizon_seconds == 86_400
    assert s.vm_heartbeat_timeout_seconds == 60
    assert s.metric_aggregations == DEFAULT_METRIC_AGGREGATIONS
    assert s.quota_file is None and s.quota_thresholds_percent == [80, 100]
    # billaged's formula, exact decimals
    assert s.score_weights == {
        "cpu_seconds": Decimal("1.0"), "memory_gb": Decimal("0.5"), "disk_mb": Decimal("0.3")
    }
    assert s.topic_partitions == 4 and s.topic_replication_factor == 1 and s.topic_prefix == ""
    assert (s.sink_batch_size, s.sink_flush_seconds) == (10_000, 1.0)
    assert (s.spool_dir, s.spool_max_bytes) == (".metering/spool", 1 << 30)
    assert s.retention_months == 36 and s.clickhouse_cluster is None
    assert s.webhook_url is None and s.webhook_secret is None and s.webhook_alerts is True
    # the live views listen on loopback only unless told otherwise
    assert (s.worker_web_bind, s.worker_web_port, s.worker_web_host) == ("127.0.0.1", 6066, "")
    assert s.topic("usage.records") == "usage.records"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # env var names are the field names upper-cased; lists and tables are JSON
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("TOPIC_PARTITIONS", "12")
    monkeypatch.setenv("TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("WINDOW_SIZES_SECONDS", "[3600, 60, 300, 60]")
    monkeypatch.setenv("SCORE_WEIGHTS", '{"memory_gb": "0.25"}')
    monkeypatch.setenv("METRIC_AGGREGATIONS", '{"api_calls": "count", "cpu_time_nanos": "max"}')
    monkeypatch.setenv("WEBHOOK_ALERTS", "false")
    s = load_settings()
    assert s.kafka_bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert s.topic_partitions == 12
    assert s.topic("usage.records") == "prod.usage.records"
    # sorted and without repeats: the window stage relies on the smallest size coming first
    assert s.window_sizes_seconds == [60, 300, 3600]
    # a partial table of weights keeps the other terms' defaults
    assert s.score_weights == {**DEFAULT_SCORE_WEIGHTS, "memory_gb": Decimal("0.25")}
    # METRIC_AGGREGATIONS extends and overrides the built-in table, it does not replace it
    assert s.metric_aggregations == {
        **DEFAULT_METRIC_AGGREGATIONS, "api_calls": "count", "cpu_time_nanos": "max"
    }
    assert s.webhook_alerts is False


def test_config_file_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, """
topic_partitions = 6
window_sizes_seconds = [300]
quota_thresholds_percent = [100, 50]
score_weights = { disk_mb = 0.1 }
""")
    monkeypatch.setenv("METERING_CONFIG", str(path))
    s = load_settings()
    assert s.topic_partitions == 6
    assert s.window_sizes_seconds == [300]
    assert s.quota_thresholds_percent == [50, 100]
    # a TOML float becomes the decimal written in the file, not its binary expansion
    # (0.1000000000000000055...): the score is money and must be exact
    assert s.score_weights["disk_mb"] == Decimal("0.1")
    assert str(s.score_weights["disk_mb"]) == "0.1"
    # a key the file does not set keeps its default
    assert s.allowed_lateness_seconds == 10

    # the file given to load_settings (the CLI's --config) is read in place of METERING_CONFIG
    other = tmp_path / "other.toml"
    other.write_text("topic_partitions = 9\n")
    assert load_settings(other).topic_partitions == 9


def test_environment_overrides_the_file_key_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "topic_partitions = 3\nwindow_sizes_seconds = [300]\n")
    monkeypatch.setenv("METERING_CONFIG", str(path))
    monkeypatch.setenv("TOPIC_PARTITIONS", "7")
    s = load_settings()
    assert s.topic_partitions == 7  # the environment wins
    assert s.window_sizes_seconds == [300]  # the file's other keys still apply


def test_explicit_overrides_win_over_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what tests, the demo and the bench rely on to point a run at their own broker and prefix
    path = _write(tmp_path, "topic_partitions = 3\ntopic_prefix = 'file.'\n")
    monkeypatch.setenv("TOPIC_PARTITIONS", "7")
    s = load_settings(path, topic_partitions=2, topic_prefix="mine.")
    assert (s.topic_partitions, s.topic_prefix) == (2, "mine.")


def test_unreadable_or_malformed_config_file_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.toml"
    monkeypatch.setenv("METERING_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="METERING_CONFIG") as exc:
        load_settings()
    assert str(missing) in str(exc.value)

    broken = _write(tmp_path, "topic_partitions = = 3\n")
    with pytest.raises(ConfigError, match="METERING_CONFIG") as exc:
        load_settings(broken)
    assert str(broken) in str(exc.value)


def test_unknown_key_in_the_file_is_refused_by_name(tmp_path: Path) -> None:
    # a misspelt setting silently ignored would leave the default in force
    path = _write(tmp_path, "topic_partition = 12\n")
    with pytest.raises(ConfigError, match="TOPIC_PARTITION: Extra inputs are not permitted"):
        load_settings(path)


# (setting, value as it would be written in an environment variable, what the message says)
WRONG = [
    ("score_weights", '{"cpu": 1}', "unknown score terms ['cpu']"),
    ("score_weights", '{"cpu_seconds": "abc"}', "valid decimal"),
    ("score_weights", '{"cpu_seconds": "NaN"}', "finite"),
    ("score_weights", '{"disk_mb": "-0.5"}', "negative weights {'disk_mb': '-0.5'}"),
    ("metric_aggregations", '{"api_calls": "avg"}', "unknown aggregations"),
    ("window_sizes_seconds", "[]", "non-empty list of positive seconds"),
    ("window_sizes_seconds", "[0]", "non-empty list of positive seconds"),
    ("window_sizes_seconds", "[60, -3600]", "non-empty list of positive seconds"),
    ("quota_thresholds_percent", "[]", "whole percentages from 1 to 1000"),
    ("quota_thresholds_percent", "[0, 100]", "whole percentages from 1 to 1000"),
    ("quota_thresholds_percent", "[80, 1001]", "whole percentages from 1 to 1000"),
    ("webhook_secret", "secret", "must start with 'whsec_'"),
    ("webhook_secret", "whsec_", "empty"),
    ("webhook_secret", "whsec_not base64!", "must be base64"),
    ("worker_web_port", "-1", "greater than or equal to 0"),
    ("worker_web_port", "65536", "less than or equal to 65535"),
    ("topic_partitions", "0", "greater than or equal to 1"),
    ("topic_partitions", "1025", "less than or equal to 1024"),
    # Kafka refuses 0 replicas; -1 asks for the broker's default
    ("topic_replication_factor", "0", "-1"),
    ("topic_replication_factor", "-2", "greater than or equal to -1"),
    ("allowed_lateness_seconds", "-1", "greater than or equal to 0"),
    ("idle_close_seconds", "0", "greater than 0"),
    ("dedup_horizon_seconds", "-1", "greater than or equal to 0"),
    ("webhook_timeout_seconds", "0", "greater than 0"),
    ("sink_batch_size", "0", "greater than or equal to 1"),
    ("sink_flush_seconds", "0", "greater than 0"),
    ("retention_months", "0", "greater than or equal to 1"),
    ("spool_max_bytes", "1024", "greater than or equal to 1048576"),
    # the address the live views listen on: a URL or a host:port is not one
    ("worker_web_bind", "", "interface address or host name"),
    ("worker_web_bind", "http://0.0.0.0", "interface address or host name"),
    ("worker_web_bind", "0.0.0.0:6066", "interface address or host name"),
    ("worker_web_bind", "all interfaces", "interface address or host name"),
    # peers forward to http://<WORKER_WEB_HOST>:<WORKER_WEB_PORT>: a scheme or port in it
    # made a broken URL (http://http//w1:6066:6066) or an error naming no setting
    ("worker_web_host", "http://worker-1", "bare host name or address"),
    ("worker_web_host", "worker-1:6066", "bare host name or address"),
    ("worker_web_host", "::1", "bare host name or address"),
]


def _assert_names(error: ConfigError, setting: str, problem: str) -> None:
    # the env var's name, then (for a table) the offending key: SCORE_WEIGHTS.CPU_SECONDS: ...
    assert re.search(rf"\b{setting.upper()}(\.\w+)?: ", str(error)), str(error)
    assert problem in str(error), str(error)


def _as_given(text: str) -> Any:
    """The value a TOML file or a caller would give for the environment text ``text``."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.mark.parametrize(("setting", "text", "problem"), WRONG)
def test_wrong_value_in_the_environment_is_refused_naming_the_setting(
    setting: str, text: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting.upper(), text)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    _assert_names(exc.value, setting, problem)


@pytest.mark.parametrize(("setting", "text", "problem"), WRONG)
def test_wrong_value_given_by_a_caller_is_refused_naming_the_setting(
    setting: str, text: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(**{setting: _as_given(text)})
    _assert_names(exc.value, setting, problem)


def test_wrong_value_in_the_file_is_refused_naming_the_setting(tmp_path: Path) -> None:
    path = _write(tmp_path, "window_sizes_seconds = [60, 0]\n")
    with pytest.raises(ConfigError, match="WINDOW_SIZES_SECONDS: .*positive seconds"):
        load_settings(path)


@pytest.mark.parametrize(
    ("setting", "text"),
    [
        ("window_sizes_seconds", "60,3600"),
        ("score_weights", "cpu_seconds=2"),
        ("metric_aggregations", '{"api_calls": "count"'),
        ("quota_thresholds_percent", "[80, 100"),
    ],
)
def test_a_list_or_table_in_the_environment_that_is_not_json_is_refused_naming_the_setting(
    setting: str, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydantic-settings decodes these before validation and raised its own SettingsError,
    # which the command line printed as a traceback instead of a configuration error
    monkeypatch.setenv(setting.upper(), text)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert f"{setting.upper()}: " in str(exc.value) and "JSON" in str(exc.value)


def test_several_wrong_values_are_all_named() -> None:
    # one run shows every mistake, not one per attempt
    with pytest.raises(ConfigError) as exc:
        load_settings(topic_partitions=0, webhook_secret="secret")
    assert "TOPIC_PARTITIONS: " in str(exc.value) and "WEBHOOK_SECRET: " in str(exc.value)


@pytest.mark.parametrize(
    "overrides",
    [
        # the Standard Webhooks specification's example secret
        {"webhook_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        {"window_sizes_seconds": [1]},
        {"quota_thresholds_percent": [1, 1000]},
        # 0 switches the live views off (streams/app.py)
        {"worker_web_port": 0},
        {"worker_web_port": 65535},
        {"topic_replication_factor": -1},
        {"topic_replication_factor": 3},
        {"score_weights": {"cpu_seconds": 0}},
        {"worker_web_bind": "0.0.0.0"},
        {"worker_web_bind": "::"},
        {"worker_web_bind": "::1"},
        {"worker_web_bind": "localhost"},
        {"worker_web_bind": "worker-1.metering.svc"},
        {"worker_web_host": "worker-1"},
        {"worker_web_host": "metering_worker_1"},  # compose's container names
        {"worker_web_host": "10.0.0.5"},
        {"worker_web_host": "[::1]"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_boundary_and_usual_values_are_accepted(overrides: dict[str, Any]) -> None:
    # the validators above must not refuse what deployments legitimately use
    s = load_settings(**overrides)
    for name, value in overrides.items():
        got = getattr(s, name)
        if name == "score_weights":
            assert got == {**DEFAULT_SCORE_WEIGHTS, **value}
        else:
            assert got == value
