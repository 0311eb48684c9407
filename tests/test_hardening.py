"""Hostile and faulty input to engine dirs, model dirs, builds and the CLIs: one line on stderr, exit 2, no code run,
nothing half-written or deleted (issue 14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adaskip.cli import build as build_cli
from adaskip.cli import run as run_cli
from adaskip.engine_dir import MANIFEST, sha256_file

QUICK = ["--calib-prompts", "2", "--calib-tokens", "64", "-q"]


def _fails(main, argv, capsys, match: str, rc: int = 2) -> str:
    assert main(argv) == rc
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def engine(tiny_chat_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harden") / "tiny"
    assert build_cli.main(["--model", str(tiny_chat_model), "--skip", "2", "--output", str(out)] + QUICK) == 0
    return out


def _relist(root: Path, *rels: str) -> None:
    """Re-digest files in the manifest, as an attacker who rewrites the manifest would."""
    manifest = json.loads((root / MANIFEST).read_text())
    for rel in rels:
        manifest["files"][rel] = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
    (root / MANIFEST).write_text(json.dumps(manifest))


# -- 1. no code from a model or engine dir ----------------------------------------------------------------------------
def _plant_remote_code(directory: Path, marker: Path) -> None:
    """A tokenizer config mapping AutoTokenizer to a .py file that leaves `marker` behind when it runs."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))
    (directory / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")


def test_build_refuses_a_model_dir_that_asks_for_custom_code(tiny_chat_model, tmp_path, capsys, monkeypatch):
    import io
    import sys

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    marker = tmp_path / "code-ran"
    _plant_remote_code(model, marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # an operator who would answer the prompt with "y"
    out = tmp_path / "engine"
    _fails(build_cli.main, ["--model", str(model), "--skip", "1", "-o", str(out)] + QUICK, capsys, "auto_map")
    assert not marker.exists() and not out.exists()


def test_engine_with_custom_tokenizer_code_is_refused_and_never_runs(engine, tmp_path, capsys, monkeypatch):
    import io
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(engine, bad)
    marker = tmp_path / "code-ran"
    _plant_remote_code(bad / "tokenizer", marker)
    _relist(bad, "tokenizer/tokenizer_config.json", "tokenizer/evil.py")  # a manifest that covers the planted files
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    err = _fails(run_cli.main, ["--engine", str(bad), "--prompt", "hi", "--max-new-tokens", "2"], capsys, "tokenizer")
    assert "evil.py" in err or "auto_map" in err
    assert not marker.exists()


def test_built_engine_carries_no_code(engine):
    files = json.loads((engine / MANIFEST).read_text())["files"]
    assert not [f for f in files if f.endswith((".py", ".pyc", ".so"))]
    assert not list(engine.rglob("*.py"))
