"""scripts/system-packages.sh and its callers: a missing program is one clear line, never a skipped test.

Each test hides programs by running the scripts with a PATH of symlinks to everything on the real PATH except
the hidden names, so the scripts see exactly what a machine without those packages would show.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "system-packages.sh"
ADVICE = (
    "the tests need prometheus promtool, not installed here: install them as root with "
    "`apt-get update && apt-get install -y --no-install-recommends prometheus` (or run scripts/setup.sh as root)"
)


def _path_without(hidden: set[str], folder: Path) -> str:
    """A one-folder PATH holding a symlink to every program on the current PATH but the hidden ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name in hidden or link.exists() or not os.access(entry.path, os.X_OK):
                continue
            link.symlink_to(entry.path)
    return str(folder)


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A folder any user can read (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="switchyard-syspkg-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(argv: list[str], path: str, cwd: Path = ROOT, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    if as_nobody and os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    env = {"PATH": path, "HOME": "/tmp", "LANG": "C.UTF-8"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_check_passes_when_every_program_is_present() -> None:
    result = _run(["bash", str(SCRIPT), "--check"], os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_names_what_is_missing_and_how_to_install_it(world_readable: Path) -> None:
    path = _path_without({"prometheus", "promtool"}, world_readable / "bin")
    result = _run(["bash", str(SCRIPT), "--check"], path)
    assert result.returncode == 1
    assert result.stderr == ADVICE + "\n"


def test_packages_are_named_once_for_all_their_programs(world_readable: Path) -> None:
    path = _path_without({"promtool", "kubectl", "openssl"}, world_readable / "bin")
    result = _run(["bash", str(SCRIPT), "--check"], path)
    assert result.returncode == 1
    assert "need promtool openssl kubectl," in result.stderr
    assert "--no-install-recommends prometheus openssl kubernetes-client`" in result.stderr


def test_install_as_a_normal_user_prints_the_same_line_and_installs_nothing(world_readable: Path) -> None:
    script = world_readable / "system-packages.sh"
    shutil.copy(SCRIPT, script)
    script.chmod(script.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
    path = _path_without({"prometheus", "promtool", "apt-get"}, world_readable / "bin")
    stub = world_readable / "bin" / "apt-get"  # says so if it is ever run
    stub.write_text("#!/bin/sh\necho apt-get ran >&2\n")
    stub.chmod(0o755)
    result = _run(["bash", str(script), "--install"], path, cwd=world_readable, as_nobody=True)
    assert result.returncode == 1
    assert result.stderr == ADVICE + "\n"  # and nothing from apt-get


def test_test_sh_stops_before_any_test_with_that_line(world_readable: Path) -> None:
    path = _path_without({"prometheus", "promtool"}, world_readable / "bin")
    started = time.monotonic()
    argv = ["bash", str(ROOT / "scripts" / "test.sh"), "--no-e2e"]
    env_venv = Path(sys.prefix)  # the venv running these tests has what test.sh looks for
    result = subprocess.run(
        argv,
        cwd=ROOT,
        env={"PATH": path, "HOME": "/tmp", "VENV": str(env_venv)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"test.sh: {ADVICE}\n"
    assert "lint and types" not in result.stdout
    assert time.monotonic() - started < 30


def test_install_as_root_installs_exactly_the_missing_packages_then_checks_again(world_readable: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the install path runs as root only (as scripts/setup.sh and CI run it)")
    folder = world_readable / "bin"
    path = _path_without({"prometheus", "promtool", "apt-get"}, folder)
    calls = world_readable / "apt-calls"
    # a stand-in apt-get that records its arguments and "installs" the package's two programs
    (folder / "apt-get").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\ncase "$*" in *install*) '
        f"printf '#!/bin/sh\\n' > {folder}/prometheus; cp {folder}/prometheus {folder}/promtool; "
        f"chmod +x {folder}/prometheus {folder}/promtool ;; esac\n"
    )
    (folder / "apt-get").chmod(0o755)
    result = _run(["bash", str(SCRIPT), "--install"], path)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["update -q", "install -y -q --no-install-recommends prometheus"]
    assert result.stderr == ""
