"""The Dockerfile's text, held to the code (tests/image builds it and checks the same inside the image):
the two console scripts of pyproject.toml, `mailfleet operator` by default, the command the StatefulSets
run (mailfleet.specs.workload) available, the non-root uid the pods run as (specs.common.RUN_AS), the data
directory the volume is mounted at, a base that is a build argument pinned by digest by default, and
.dockerignore letting in exactly what the install needs."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from mailfleet import api, specs
from mailfleet.specs import common

ROOT = Path(__file__).parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    """The arguments of each NAME instruction, continuation lines joined."""
    logical = DOCKERFILE.replace("\\\n", " ").splitlines()
    return [line.split(None, 1)[1] for line in logical if line.split(None, 1)[:1] == [name]]


def test_entry_points_are_the_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    assert json.loads(entrypoint) == ["mailfleet"] and json.loads(cmd) == ["operator"]
    assert set(scripts) == {"mailfleet", "mailnode"}
    domain = api.MailDomain.model_validate({"metadata": {"name": "x", "uid": "u"}, "spec": {"domain": "x.org"}})
    statefulset = specs.workload.statefulset(domain, image="i", config_checksum="c")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["mailnode", "serve"]  # overrides ENTRYPOINT; pip put it on PATH


def test_runs_as_the_pods_user_with_the_data_directory() -> None:
    (user,) = instruction("USER")
    assert user == f"{common.RUN_AS}:{common.RUN_AS}"
    (run,) = [r for r in instruction("RUN") if "useradd" in r]
    assert f"--uid {common.RUN_AS}" in run and f"install -d -o {common.RUN_AS}" in run and common.DATA_DIR in run
    assert "pip install --no-cache-dir /src" in run and "[dev]" not in DOCKERFILE


def test_base_is_a_build_argument_pinned_by_digest() -> None:
    (base,) = instruction("FROM")
    assert base == "${BASE}"
    (default,) = [arg for arg in instruction("ARG") if arg.startswith("BASE=")]
    assert re.fullmatch(r"BASE=python:3\.11-slim@sha256:[0-9a-f]{64}", default)


def test_installs_into_a_virtualenv_on_path() -> None:
    # Debian's python3 is externally managed (PEP 668): the same RUN must work on both kinds of base.
    (run,) = [r for r in instruction("RUN") if "pip install" in r]
    assert run.startswith("python3 -m venv /opt/mailfleet ")
    (env,) = instruction("ENV")
    assert "PATH=/opt/mailfleet/bin:$PATH" in env.split()


def test_dockerignore_admits_what_the_copies_need() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {source for copy in instruction("COPY") for source in copy.split()[:-1]}
    assert lines[0] == "*" and copied == admitted
