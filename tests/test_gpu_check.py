"""scripts/gpu_check.py: on a machine without a GPU every GPU part is skipped with its reason and one JSON report is
written; the CUDA-vs-CPU engine comparison itself runs here with the CPU as the 'device' (same code path)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_skips_every_gpu_part_with_its_reason(gpu_check, tmp_path, capsys):
    report = tmp_path / "report.json"
    fast = ["torch_engine_cuda", "ort_cuda_ep", "tensorrt_runtime"]  # the C++ builds run in test_cpp_plugins.py
    assert gpu_check.main(["--report", str(report), "--only", *fast]) == 0
    data = json.loads(report.read_text())
    assert set(data["checks"]) == set(fast) and {"host", "summary", "seconds", "started"} <= set(data)
    for name, result in data["checks"].items():
        if torch.cuda.is_available():
            assert result["status"] in ("passed", "skipped"), (name, result)
        else:
            assert result["status"] == "skipped" and result["reason"], name
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in data["checks"]["torch_engine_cuda"]["reason"]
        assert data["summary"] == {"passed": [], "failed": [], "skipped": fast}
    assert "report written to" in capsys.readouterr().err
    assert gpu_check.main(["--report", str(tmp_path / "missing" / "r.json")]) == 2


def test_engine_parity_code_path_runs_on_cpu(gpu_check, tmp_path):
    model, plan, prompts = gpu_check.check_model(tmp_path, None)
    result = gpu_check.engine_parity(model, plan, prompts, "cpu", decode_steps=5)
    assert result["ok"] and result["steps"] == 2 * 6 and result["token_agreement"] == 1.0
    assert len(result["online_ffns"]) == 2  # one list of online FFNs per prompt, from the compared decode
    # CPU vs CPU: only GEMM blocking noise (operand alignment); a CUDA run is held to gpu_check.TOL
    assert result["max_logit_diff"] <= 1e-5 and result["max_statistics_diff"] <= 1e-5


def test_report_is_written_when_the_budget_is_spent(gpu_check, tmp_path):
    report = tmp_path / "report.json"
    assert gpu_check.main(["--report", str(report), "--budget", "0"]) == 0
    checks = json.loads(report.read_text())["checks"]
    assert set(checks) == set(gpu_check.CHECKS)
    assert all(r["status"] == "skipped" and "budget is spent" in r["reason"] for r in checks.values())
