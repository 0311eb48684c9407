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


# -- 2. publishing an engine dir --------------------------------------------------------------------------------------
def _manifest_digest(root: Path) -> str:
    return sha256_file(root / MANIFEST)


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_a_dir_created_at_output_during_the_build_is_kept(tiny_chat_model, engine, tmp_path, capsys, monkeypatch):
    import adaskip.builder.build as build_mod

    out = tmp_path / "engine"
    real_plot = build_mod.importance_plot

    def someone_else_writes_there(*a, **k):
        out.mkdir()
        (out / "theirs.txt").write_text("precious")
        return real_plot(*a, **k)

    monkeypatch.setattr(build_mod, "importance_plot", someone_else_writes_there)
    args = ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "-o", str(out), "-q"]
    _fails(build_cli.main, args, capsys, "while this build ran")
    assert (out / "theirs.txt").read_text() == "precious" and _no_leftovers(tmp_path) == []
    # with --force too: it is not an engine
    shutil.rmtree(out)
    _fails(build_cli.main, args + ["--force"], capsys, "while this build ran")
    assert (out / "theirs.txt").read_text() == "precious"


def test_concurrent_builds_into_one_output_the_second_is_refused(tiny_chat_model, engine, tmp_path, capsys,
                                                                  monkeypatch):
    import adaskip.builder.build as build_mod

    out = tmp_path / "engine"
    args = ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "-o", str(out), "-q", "--force"]
    real_plot, inner = build_mod.importance_plot, {}

    def second_build_meanwhile(*a, **k):  # build B starts and tries to publish while A holds the output
        if not inner:
            inner["started"] = True
            inner["rc"] = build_cli.main(args)
            inner["err"] = capsys.readouterr().err
        return real_plot(*a, **k)

    monkeypatch.setattr(build_mod, "importance_plot", second_build_meanwhile)
    assert build_cli.main(args) == 0
    assert inner["rc"] == 2 and "another build is writing" in inner["err"], inner
    first = _manifest_digest(out)

    # B finishes while A is still calibrating: A's publish sees an output it did not check and refuses, --force or not
    monkeypatch.setattr(build_mod, "importance_plot", real_plot)
    real_make_plan, done = build_mod.make_plan, {}

    def another_build_publishes_first(*a, **k):
        if not done:
            done["started"] = True
            done["rc"] = build_cli.main(args)
        return real_make_plan(*a, **k)

    monkeypatch.setattr(build_mod, "make_plan", another_build_publishes_first)
    _fails(build_cli.main, args, capsys, "while this build ran")
    assert done["rc"] == 0 and _manifest_digest(out) != first  # the other build's engine, intact
    assert _no_leftovers(tmp_path) == []


def test_force_replaces_only_a_real_engine_and_removes_only_its_files(tiny_chat_model, engine, tmp_path, capsys):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST).write_text(json.dumps({"format": "adaskip.engine", "files": {}}))
    (fake / "thesis.tex").write_text("years of work")
    args = ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "-o", str(fake), "-q", "--force"]
    _fails(build_cli.main, args, capsys, "not an adaskip engine directory")
    assert (fake / "thesis.tex").read_text() == "years of work"
    # a real engine with one stray file added is not replaced either
    real = tmp_path / "real"
    shutil.copytree(engine, real)
    (real / "tokenizer" / "notes.txt").write_text("mine")
    args[args.index(str(fake))] = str(real)
    _fails(build_cli.main, args, capsys, "not an adaskip engine directory")
    (real / "tokenizer" / "notes.txt").unlink()
    assert build_cli.main(args) == 0
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_a_failed_or_interrupted_swap_never_loses_the_old_engine(tiny_chat_model, engine, tmp_path, capsys,
                                                                monkeypatch, how):
    import os
    import signal

    import adaskip.engine_dir as ed_mod
    from adaskip.engine_dir import open_engine_dir

    out = tmp_path / "engine"
    shutil.copytree(engine, out)
    before = _manifest_digest(out)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # between moving the old engine aside and moving the new one in
            if how == "error":
                raise OSError(28, "No space left on device")
            os.kill(os.getpid(), signal.SIGINT)
        return real_replace(src, dst)

    monkeypatch.setattr(ed_mod.os, "replace", flaky_replace)
    args = ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "-o", str(out), "-q", "--force"]
    rc = build_cli.main(args)
    capsys.readouterr()
    assert rc == (1 if how == "error" else 130)
    open_engine_dir(out)  # a complete engine is in place: the old one (error) or the finished new one (interrupt)
    if how == "error":
        assert _manifest_digest(out) == before
    assert _no_leftovers(tmp_path) == []
