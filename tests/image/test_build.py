"""The container image, built for real (issue 13): scripts/build-image makes it from the Dockerfile with
buildah on a local Debian base (cached per machine, so a warm run only hashes the sources), and these tests
open the docker-archive it exports, the tarball a container runtime imports, and run commands inside it
with `buildah run --isolation chroot` (no daemon, no registry). tests/chart/test_image.py holds the
Dockerfile's text to the code; this holds the image to the same contracts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from mailfleet.specs import common
from tests.conftest import require_tool

ROOT = Path(__file__).parents[2]
BUILD_TIMEOUT = 45 * 60  # a cold build: mmdebstrap and pip on 2 shared cores; a warm one takes a second
RUN_TIMEOUT = 300
SIZE_LIMIT = 300_000_000  # today about 240 MB on the Debian base; a regression guard, not a goal


def _need_root() -> None:
    if os.geteuid() != 0:
        message = "building and running the image needs root (mmdebstrap, buildah's chroot isolation)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI runs as root")
        pytest.skip(message)


def _uncaptured(request: pytest.FixtureRequest) -> AbstractContextManager[object]:
    """Output that goes to the terminal as it happens, not into pytest's capture (none with -s)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    return nullcontext() if capture is None else capture.global_and_fixture_disabled()


@pytest.fixture(scope="module")
def archive(request: pytest.FixtureRequest) -> Path:
    require_tool("buildah")
    require_tool("mmdebstrap")
    _need_root()
    # A cold build takes minutes: its progress (stderr) is shown while it runs.
    with _uncaptured(request):
        built = subprocess.run(
            [str(ROOT / "scripts" / "build-image")], stdout=subprocess.PIPE, text=True, timeout=BUILD_TIMEOUT
        )
    assert built.returncode == 0, "scripts/build-image failed (its output is above)"
    path = Path(built.stdout.strip())
    assert path.is_file(), built.stdout
    return path


def _archive_json(archive: Path, member: str) -> Any:
    with tarfile.open(archive) as tar:
        file = tar.extractfile(member)
        assert file is not None, member
        return json.load(file)


@pytest.fixture(scope="module")
def manifest(archive: Path) -> dict[str, Any]:
    (entry,) = _archive_json(archive, "manifest.json")
    assert isinstance(entry, dict)
    return entry


@pytest.fixture(scope="module")
def config(archive: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    image = _archive_json(archive, manifest["Config"])
    assert isinstance(image, dict)
    return dict(image["config"])


class Container:
    """A working container from the archive, in a buildah store of its own (removed with it)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.name = ""

    def buildah(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = ["buildah", "--root", str(self.store / "root"), "--runroot", str(self.store / "run")]
        command += ["--storage-driver", "vfs", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """argv inside, as the image's user, with its environment and working directory."""
        return self.buildah("run", "--isolation", "chroot", self.name, "--", *argv)


@pytest.fixture(scope="module")
def container(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    inside = Container(tmp_path_factory.mktemp("buildah"))
    try:
        created = inside.buildah("from", "--pull-never", f"docker-archive:{archive}")
        assert created.returncode == 0, created.stderr
        inside.name = created.stdout.strip().splitlines()[-1]
        yield inside
    finally:
        removed = inside.buildah("rm", inside.name) if inside.name else None
        # A copy of the whole image (vfs), not left for pytest's tmp retention. buildah's chroot isolation
        # mounts /proc and /dev in a mount namespace of its own, gone with the command: nothing is mounted here.
        shutil.rmtree(inside.store)
        assert removed is None or removed.returncode == 0, removed.stderr


def test_config_runs_the_operator_as_the_pods_user(manifest: dict[str, Any], config: dict[str, Any]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # mailfleet:VERSION, as runtimes name it (the name `ctr images import` and `docker load` give it)
    assert manifest["RepoTags"] == [f"docker.io/library/mailfleet:{version}"]
    assert config["Entrypoint"] == ["mailfleet"] and config["Cmd"] == ["operator"]
    assert config["User"] == f"{common.RUN_AS}:{common.RUN_AS}"
    assert config["WorkingDir"] == common.DATA_DIR


def test_both_entry_points_run(container: Container, config: dict[str, Any]) -> None:
    operator = container.run(*config["Entrypoint"], "--help")  # `docker run IMAGE --help`
    assert operator.returncode == 0, operator.stderr
    assert "operator" in operator.stdout
    node = container.run("mailnode", "--help")  # the StatefulSets' command (specs.workload)
    assert node.returncode == 0, node.stderr
    assert "serve" in node.stdout


def test_runs_as_10001_with_its_data_directory(container: Container) -> None:
    ids = container.run("sh", "-c", "id -u; id -g; stat -c %u:%g " + common.DATA_DIR)
    assert ids.returncode == 0, ids.stderr
    assert ids.stdout.split() == [str(common.RUN_AS), str(common.RUN_AS), f"{common.RUN_AS}:{common.RUN_AS}"]
    written = container.run("touch", f"{common.DATA_DIR}/written")
    assert written.returncode == 0, written.stderr


def test_small_without_build_tools(container: Container, archive: Path, request: pytest.FixtureRequest) -> None:
    absent = container.run("sh", "-c", "! command -v gcc cc pip pip3 && test ! -e /root/.cache/pip")
    assert absent.returncode == 0, f"found in the image: {absent.stdout}"
    dev = container.run("python3", "-c", "import pytest")  # no [dev] extras
    assert dev.returncode != 0
    size = archive.stat().st_size  # the layers uncompressed, as a runtime stores them
    with _uncaptured(request):
        print(f"\ntests/image: the image weighs {size / 1e6:.0f} MB uncompressed ({archive.name})")
    assert size < SIZE_LIMIT
