"""Fuzzing the Python engine-dir, manifest and plan loaders (issue 14): every random mutation of a valid engine dir
either still runs or gives exit 2 and one line on stderr, never a traceback, within a bounded time. The C++ loader
gets the same mutations in tests/test_cpp_runtime.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaskip.cli import build as build_cli
from adaskip.cli import run as run_cli
from engine_mutations import json_mutation, mutated_copy

BOUND_S = 30  # per mutated dir, on a busy 2-core host (a valid mutation loads the engine and generates a token)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def engine(tiny_chat_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "tiny"
    assert build_cli.main(["--model", str(tiny_chat_model), "--skip", "2", "-o", str(out), "--calib-prompts", "2",
                           "--calib-tokens", "64", "-q"]) == 0
    return out


def _run_once(root: Path, capsys) -> None:
    t0 = time.monotonic()
    rc = run_cli.main(["--engine", str(root), "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < BOUND_S
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("adaskip-run: error: "), err


@FUZZ
@given(data=st.data())
def test_mutated_manifests(engine, tmp_path, capsys, data):
    manifest = json.loads((engine / "manifest.json").read_text())
    text = data.draw(json_mutation(manifest))
    _run_once(mutated_copy(engine, tmp_path / "m", text, None), capsys)


@FUZZ
@given(data=st.data())
def test_mutated_plans(engine, tmp_path, capsys, data):
    plan = json.loads((engine / "plan.json").read_text())
    text = data.draw(json_mutation(plan))
    _run_once(mutated_copy(engine, tmp_path / "p", None, text), capsys)
