"""The ``metering`` command: every command's help, and a wrong setting ending the command
with its name on stderr, exit status 2 and no traceback (run in-process through
``metering.cli.main``; once as ``python -m metering`` to check the real process too)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from metering import cli
from metering.config import Settings
from metering.embedded import TansuBroker
from metering.topics import ALL_TOPICS


def _command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    # argparse keeps its subcommands in a private action; walking it means a command added
    # later gets its help checked without anyone editing this file
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


COMMANDS = list(_command_paths(cli._parser()))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the developer's or CI's environment: the commands below must fail on
    the setting each test gives, not on one that happens to be exported."""
    monkeypatch.delenv("METERING_CONFIG", raising=False)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def _clean_env() -> dict[str, str]:
    names = {n.upper() for n in Settings.model_fields} | {"METERING_CONFIG"}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


def test_the_walk_finds_every_documented_command() -> None:
    # guards the walk itself: an empty or partial walk would make the help test below vacuous
    documented = {
        ("broker",), ("topics",), ("quota",), ("quota", "set"), ("quota", "remove"), ("quota", "list"),
        ("worker",), ("sink",), ("serve",), ("serve", "receiver"), ("serve", "vm-ingest"),
        ("serve", "track"), ("produce",), ("produce", "redis-enterprise"), ("produce", "containers"),
        ("simulate",), ("demo",),
    }
    assert documented <= set(COMMANDS)


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for path in COMMANDS:
        if len(path) == 1:
            assert path[0] in out


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    # argparse formats a help text only when asked: a broken one (a stray % in a help string,
    # a bad default) shows up here rather than in a user's terminal
    with pytest.raises(SystemExit) as exc:
        cli.main([*path, "--help"])
    assert exc.value.code == 0
    assert f"usage: metering {' '.join(path)}" in " ".join(capsys.readouterr().out.split())


def test_python_dash_m_metering_help() -> None:
    # the module entry point (the Dockerfile and docs use it as well as the console script)
    done = subprocess.run([sys.executable, "-m", "metering", "--help"], capture_output=True, text=True,
                          env=_clean_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: metering" in done.stdout


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


# Commands that need KAFKA_BOOTSTRAP_SERVERS (left unset): should a wrong setting slip through,
# they stop on that instead of starting anything, and the name asserted would be missing.
SAFE_COMMANDS = [["topics"], ["sink", "clickhouse"], ["worker"], ["quota", "list"]]
WRONG_SETTINGS = [
    ("TOPIC_PARTITIONS", "0"),
    ("WEBHOOK_SECRET", "not-a-secret"),
    ("WINDOW_SIZES_SECONDS", "[0]"),
    # not JSON: this used to escape as pydantic-settings' SettingsError with a traceback
    ("WINDOW_SIZES_SECONDS", "60,3600"),
    ("SCORE_WEIGHTS", '{"cpu": 1}'),
    ("WORKER_WEB_HOST", "http://worker-1:6066"),
]


@pytest.mark.parametrize("command", SAFE_COMMANDS, ids=" ".join)
@pytest.mark.parametrize(("name", "value"), WRONG_SETTINGS)
def test_wrong_setting_in_the_environment_exits_2_naming_it(
    command: list[str], name: str, value: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    assert cli.main(command) == 2  # an exception escaping main would fail the test here
    captured = capsys.readouterr()
    assert f"{name}: " in captured.err
    assert captured.err.startswith("metering: configuration error:")
    assert "Traceback" not in captured.err and captured.out == ""


def test_wrong_setting_ends_the_real_process_without_a_traceback() -> None:
    env = {**_clean_env(), "WINDOW_SIZES_SECONDS": "60,3600"}
    done = subprocess.run([sys.executable, "-m", "metering", "topics"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2
    assert "WINDOW_SIZES_SECONDS: " in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_missing_kafka_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    # valid settings but no broker to talk to: say which setting to set, touch nothing
    assert cli.main(["topics"]) == 2
    assert "KAFKA_BOOTSTRAP_SERVERS is not set" in capsys.readouterr().err


def test_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.toml"
    assert cli.main(["--config", str(missing), "topics"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


@pytest.mark.integration
def test_topics_command_uses_the_environment_and_the_config_file(
    broker: TansuBroker, topic_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """``metering --config FILE topics`` against a real broker: the broker comes from the
    environment, the prefix and partition count from the file, and both reach the topics."""
    config = tmp_path / "metering.toml"
    config.write_text(f'topic_prefix = "{topic_prefix}"\ntopic_partitions = 3\n')
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers)
    assert cli.main(["--config", str(config), "topics"]) == 0
    assert capsys.readouterr().out.strip() == "topics ready"
    meta = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10).topics
    created = {name: len(t.partitions) for name, t in meta.items() if name.startswith(topic_prefix)}
    assert created == {f"{topic_prefix}{spec.name}": 3 for spec in ALL_TOPICS}
