"""`mailfleet operator` options as a user sets them: the flags and environment variables `--help` lists,
an environment variable taking the place of a default, a flag taking the place of the environment, and
a bad value refused by name. The options reach the operator as one OperatorOptions."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mailfleet import cli, options, specs

FLAGS_AND_ENV = [
    ("--image", "MAILFLEET_NODE_IMAGE"),
    ("--metrics-port", "MAILFLEET_METRICS_PORT"),
    ("--resync", "MAILFLEET_RESYNC"),
    ("--usage-interval", "MAILFLEET_USAGE_INTERVAL"),
    ("--schedule-interval", "MAILFLEET_SCHEDULE_INTERVAL"),
    ("--node-url", "MAILFLEET_NODE_URL"),
    ("--operator-namespace", "MAILFLEET_OPERATOR_NAMESPACE"),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, env in FLAGS_AND_ENV:
        monkeypatch.delenv(env, raising=False)


def operator_options(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> options.OperatorOptions:
    """What `mailfleet operator ARGV` would run the operator with (kopf is not started)."""
    seen: list[options.OperatorOptions] = []

    def run(args: argparse.Namespace) -> int:
        seen.append(options.from_arguments(args))
        return 0

    monkeypatch.setattr(cli, "_operator", run)
    assert cli.main(["operator", *argv]) == 0
    (found,) = seen
    return found


def test_help_lists_every_option_with_its_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["operator", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    for flag in ("--namespace", "--liveness", "--verbose"):
        assert flag in text
    for flag, env in FLAGS_AND_ENV:
        assert f"{flag} " in text and f"${env})" in text
    assert options.environment_variables() == [env for _, env in FLAGS_AND_ENV]
    assert f"(default {specs.common.DEFAULT_IMAGE}; $MAILFLEET_NODE_IMAGE)" in text
    assert "(default 300; $MAILFLEET_RESYNC)" in text


def test_the_operator_namespace_from_the_flag_the_environment_or_the_pod(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nowhere = tmp_path / "missing"
    assert options.own_namespace(operator_options([], monkeypatch), path=nowhere) is None  # outside a cluster
    pod_file = tmp_path / "namespace"
    pod_file.write_text("mail-ops\n")  # what Kubernetes mounts with the service account token
    assert options.own_namespace(operator_options([], monkeypatch), path=pod_file) == "mail-ops"
    monkeypatch.setenv("MAILFLEET_OPERATOR_NAMESPACE", "mailfleet-system")  # the chart's downward API
    from_env = operator_options([], monkeypatch)
    assert from_env.operator_namespace == "mailfleet-system"
    assert options.own_namespace(from_env, path=pod_file) == "mailfleet-system"
    from_flag = operator_options(["--operator-namespace", "ops"], monkeypatch)
    assert options.own_namespace(from_flag, path=pod_file) == "ops"


def test_without_flags_or_environment_the_declared_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert operator_options([], monkeypatch) == options.OperatorOptions()
    assert options.OperatorOptions().metrics_port is None


def test_the_environment_sets_the_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILFLEET_NODE_IMAGE", "registry.test/node:2")
    monkeypatch.setenv("MAILFLEET_METRICS_PORT", "9191")
    monkeypatch.setenv("MAILFLEET_RESYNC", "45")
    monkeypatch.setenv("MAILFLEET_USAGE_INTERVAL", "")  # empty: as if unset
    from_environment = operator_options([], monkeypatch)
    assert from_environment.image == "registry.test/node:2"
    assert from_environment.metrics_port == 9191
    assert from_environment.resync == 45.0
    assert from_environment.usage_interval == options.OperatorOptions().usage_interval

    flagged = operator_options(
        ["--metrics-port", "9090", "--resync", "5", "--node-url", "http://n/{ordinal}"], monkeypatch
    )
    assert (flagged.metrics_port, flagged.resync, flagged.node_url) == (9090, 5.0, "http://n/{ordinal}")
    assert flagged.image == "registry.test/node:2"


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_a_bad_port_is_refused_by_name(
    where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["operator"]
    if where == "flag":
        argv += ["--metrics-port", "70000"]
    else:
        monkeypatch.setenv("MAILFLEET_METRICS_PORT", "70000")
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "--metrics-port: 70000 is not a port number (1-65535)" in capsys.readouterr().err
