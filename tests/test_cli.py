"""adaskip-build / adaskip-run end to end, and every bad input: clear message, non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import shutil
from pathlib import Path

import pytest

from adaskip.cli import build as build_cli
from adaskip.export.onnx.variants import gqa_supports
from adaskip.model import load_model
from adaskip.cli import run as run_cli

QUICK = ["--calib-prompts", "2", "--calib-tokens", "64", "-q"]


@pytest.fixture(scope="module")
def engine(tiny_chat_model, tmp_path_factory) -> Path:
    """The default backend (ONNX Runtime)."""
    out = tmp_path_factory.mktemp("engines") / "tiny"
    assert build_cli.main(["--model", str(tiny_chat_model), "--skip", "2", "--output", str(out)] + QUICK) == 0
    return out


@pytest.fixture(scope="module")
def torch_engine(tiny_chat_model, engine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny-torch"
    assert build_cli.main(["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "--backend", "torch",
                           "--output", str(out), "-q"]) == 0
    return out


def _no_partials(parent: Path) -> bool:
    return not any(".partial-" in p.name for p in parent.iterdir())


def test_build_writes_a_complete_engine_dir(engine, torch_engine):
    names = {p.name for p in engine.iterdir()}
    assert {"manifest.json", "plan.json", "model.onnx", "model.onnx.data", "tokenizer", "importance.png"} <= names
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["backend"] == "ort" and manifest["plan"]["digest"].startswith("sha256:")
    assert set(manifest["files"]) >= {"plan.json", "model.onnx", "model.onnx.data", "importance.png"}
    assert manifest["build"]["graph"]["opset"] == 17
    torch_manifest = json.loads((torch_engine / "manifest.json").read_text())
    assert torch_manifest["backend"] == "torch" and "weights.safetensors" in torch_manifest["files"]
    plan = json.loads((engine / "plan.json").read_text())
    assert plan["method"] == "adaskip" and len(plan["skip"]) == 2 and plan["online"]["window"] == 20
    assert (engine / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _no_partials(engine.parent)


def test_run_prints_text_and_summary(engine, capsys):
    assert run_cli.main(["--engine", str(engine), "--prompt", "Hello there", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "[adaskip] TTFT" in out and "tok/s" in out and "KV saved" in out


def test_run_json_stream_chat_and_batch(engine, capsys):
    assert run_cli.main(["--engine", str(engine), "--prompt", "a", "--prompt", "b c d", "--max-new-tokens", "5",
                         "--json", "--chat"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(x["new_tokens"] <= 5 and "kv_bytes_saved" in x for x in lines)
    assert run_cli.main(["--engine", str(engine), "--prompt", "stream me", "--max-new-tokens", "6",
                         "--stream"]) == 0
    captured = capsys.readouterr()
    assert "[adaskip] TTFT" in captured.err


def _fails(main, argv, capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err


def test_build_refuses_bad_models(tmp_path, capsys):
    out = str(tmp_path / "e")
    _fails(build_cli.main, ["--model", str(tmp_path / "nope"), "--skip", "1", "-o", out], capsys, "not found")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _fails(build_cli.main, ["--model", str(gpt2), "--skip", "1", "-o", out], capsys, "'gpt2' is not supported")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "fancy", "auto_map": {"AutoConfig": "x.Y"}}))
    _fails(build_cli.main, ["--model", str(remote), "--skip", "1", "-o", out], capsys, "trust_remote_code")
    _fails(build_cli.main, ["--model", "someorg/not-cached-model", "--skip", "1", "-o", out], capsys,
           "not in the local Hugging Face cache")
    txt = tmp_path / "model.bin"
    txt.write_text("x")
    _fails(build_cli.main, ["--model", str(txt), "--skip", "1", "-o", out], capsys, ".gguf")
    assert not Path(out).exists()


def test_build_refuses_bad_budgets_and_options(tiny_chat_model, tmp_path, capsys):
    m = ["--model", str(tiny_chat_model), "-o", str(tmp_path / "e")] + QUICK
    _fails(build_cli.main, m + ["--skip", "9"], capsys, "between 0 and 8")
    _fails(build_cli.main, m + ["--skip", "-1"], capsys, "--skip must be >= 0")
    _fails(build_cli.main, m + ["--alpha", "0.5"], capsys, "must be > 1")
    _fails(build_cli.main, m + ["--alpha", "1e9"], capsys, "out of reach")
    _fails(build_cli.main, m + ["--skip", "1", "--alpha", "1.2"], capsys, "exactly one")
    _fails(build_cli.main, m, capsys, "exactly one")
    _fails(build_cli.main, m + ["--method", "unified", "--skip", "3"], capsys, "unified skipping needs k <= 2")
    _fails(build_cli.main, m + ["--skip", "1", "--calib", str(tmp_path / "missing.jsonl")], capsys, "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _fails(build_cli.main, m + ["--skip", "1", "--calib", str(short)], capsys, "tokens")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    _fails(build_cli.main, m + ["--skip", "1", "--calib", str(bad)], capsys, "bad.jsonl:2")
    assert not (tmp_path / "e").exists()


def test_build_refuses_plans_for_other_models_and_corrupt_plans(engine, tiny_chat_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"  # same architecture and tokenizer, one weight changed
    shutil.copytree(tiny_chat_model, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "e")
    _fails(build_cli.main, ["--model", str(other), "--plan", str(engine / "plan.json"), "-o", out, "-q"], capsys,
           "not this one")
    corrupt = tmp_path / "plan.json"
    corrupt.write_text((engine / "plan.json").read_text()[:100])
    _fails(build_cli.main, ["--model", str(other), "--plan", str(corrupt), "-o", out, "-q"], capsys,
           "not readable JSON")
    assert not Path(out).exists()


def test_build_reuses_a_matching_plan_and_refuses_to_overwrite(engine, tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "again"
    args = ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "-o", str(out), "-q"]
    assert build_cli.main(args) == 0
    assert json.loads((out / "plan.json").read_text())["skip"] == json.loads((engine / "plan.json").read_text())["skip"]
    _fails(build_cli.main, args, capsys, "already exists")
    assert build_cli.main(args + ["--force"]) == 0


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "error"])
def test_interrupted_build_leaves_nothing(tiny_chat_model, tmp_path, monkeypatch, capsys, how):
    import adaskip.builder.build as build_mod

    def boom(*a, **k):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_mod, "importance_plot", boom)
    out = tmp_path / "engine"
    args = ["--model", str(tiny_chat_model), "--skip", "1", "-o", str(out)] + QUICK
    assert build_cli.main(args) == (1 if how == "error" else 130)
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("No space left" in err if how == "error" else "interrupted" in err)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def _rewrite_manifest_entry(root: Path, rel: str) -> None:
    from adaskip.engine_dir import sha256_file

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_run_refuses_bad_engines_and_prompts(engine, torch_engine, tmp_path, capsys):
    _fails(run_cli.main, ["--engine", str(tmp_path), "--prompt", "x"], capsys, "not an adaskip engine directory")
    broken = tmp_path / "broken"
    shutil.copytree(engine, broken)
    plan = json.loads((broken / "plan.json").read_text())
    plan["scales"][0] = 0.5  # a valid plan, but not the one this engine was built with
    (broken / "plan.json").write_text(json.dumps(plan))
    _fails(run_cli.main, ["--engine", str(broken), "--prompt", "x"], capsys, "(truncated or replaced)")
    _rewrite_manifest_entry(broken, "plan.json")
    _fails(run_cli.main, ["--engine", str(broken), "--prompt", "x"], capsys, "plan digest")
    shutil.rmtree(broken)
    shutil.copytree(engine, broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    _fails(run_cli.main, ["--engine", str(broken), "--prompt", "x"], capsys, "truncated or replaced")
    _rewrite_manifest_entry(broken, "model.onnx.data")
    (broken / "model.onnx").write_bytes(b"not a graph")
    _rewrite_manifest_entry(broken, "model.onnx")
    _fails(run_cli.main, ["--engine", str(broken), "--prompt", "x"], capsys, "ONNX Runtime cannot load")
    shutil.rmtree(broken)
    shutil.copytree(torch_engine, broken)
    w = broken / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-64] + b"\0" * 64)
    _fails(run_cli.main, ["--engine", str(broken), "--prompt", "x"], capsys, "weights.safetensors does not match")
    # files over 64 MB skip the digest at load; torch weights are still checked against the model fingerprint
    _rewrite_manifest_entry(broken, "weights.safetensors")
    _fails(run_cli.main, ["--engine", str(broken), "--prompt", "x"], capsys, "fingerprint")
    w.write_bytes(b"garbage")
    _rewrite_manifest_entry(broken, "weights.safetensors")
    _fails(run_cli.main, ["--engine", str(broken), "--prompt", "x"], capsys, "weights.safetensors is corrupt")
    _fails(run_cli.main, ["--engine", str(engine), "--prompt", "  "], capsys, "prompt is empty")
    _fails(run_cli.main, ["--engine", str(engine)], capsys, "at least one --prompt")
    _fails(run_cli.main, ["--engine", str(engine), "--prompt", "x", "--max-new-tokens", "0"], capsys,
           "max_new_tokens must be a positive integer")
    _fails(run_cli.main, ["--engine", str(engine), "--prompt", "x", "--top-p", "2"], capsys, "top_p")
    _fails(run_cli.main, ["--engine", str(engine), "--prompt", "word " * 3000], capsys,
           "exceeds the model's context of 2048")
    assert run_cli.main(["--engine", str(engine), "--prompt", "word " * 3000, "--truncate", "middle",
                         "--max-new-tokens", "4"]) == 0


def test_smollm2_build_and_run_end_to_end(smollm2_dir, tmp_path, capsys):
    """The README's main job on the real model (smaller calibration to keep CI short)."""
    out = tmp_path / "smollm2"
    assert build_cli.main(["--model", "smollm2-135m", "--skip", "4", "--output", str(out), "--calib-prompts", "3",
                           "--calib-tokens", "256", "-q"]) == 0
    built = capsys.readouterr().out
    assert "ideal speedup" in built and "K=4" in built
    assert run_cli.main(["--engine", str(out), "--chat", "--prompt", "What is the capital of France?",
                         "--max-new-tokens", "24", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "Paris" in result["text"]
    assert len(result["prefill_skipped"]) == 4 and result["kv_bytes_saved"] >= 0


@pytest.mark.parametrize("method,mode", [("skipdecode", "decode"), ("skipdecode", "e2e"), ("early-exit", "e2e"),
                                         ("unified", "prefill")])
def test_baseline_engines_build_and_run(tiny_chat_model, tmp_path, capsys, method, mode):
    out = tmp_path / method
    assert build_cli.main(["--model", str(tiny_chat_model), "--method", method, "--skip", "2", "--mode", mode,
                           "-o", str(out), "-q"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == method and plan["budget"] == {"unit": "layers", "k": 2} and not plan["online"]["enabled"]
    expected = plan["selection"]["expected_speedup"]  # the provenance states the length its decode figure covers
    summary = capsys.readouterr().out
    assert expected["decode_steps"] == 512 and f"decode {expected['decode']:.3f}x over 512 decode steps" in summary
    roofline = expected["roofline"]  # and the bytes-and-FLOPs ideal beside it, at the engine's fp32 widths
    assert roofline["widths"]["weights"] == 4.0 and roofline["machine"]["bandwidth_gbs"] == 44.5
    assert f"prefill {roofline['prefill']:.3f}x, decode {roofline['decode']:.3f}x" in summary
    assert run_cli.main(["--engine", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    skipped = [j for i in plan["selection"]["layers"] for j in (2 * i, 2 * i + 1)]
    if method == "skipdecode":  # grows: layer 1 at decode step 1, layers 1..2 from step 2 (k = 2)
        # an e2e prefill skips layer 1 only (a fresh request's step counter), decode mode's nothing
        assert result["prefill_skipped"] == ([] if mode == "decode" else [2, 3])
        assert result["decode_skipped_offline"] == [2, 3, 4, 5]
    else:
        assert result["prefill_skipped"] == skipped and result["decode_skipped_offline"] == skipped
    assert result["decode_skipped_online"] == []
    # KV only for layers whose attention runs in decode; tiny model: 4 layers, 2 KV heads x 8 dims, fp32
    live = 4 - (1 if method == "skipdecode" else len(plan["selection"]["layers"]))
    capacity = result["prompt_tokens"] + 4
    assert result["kv_bytes"] == 2 * live * 2 * 8 * capacity * 4


def test_force_only_replaces_engines_and_plan_excludes_other_selection_flags(engine, tiny_chat_model, tmp_path,
                                                                              capsys):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    _fails(build_cli.main, ["--model", str(tiny_chat_model), "--skip", "1", "-o", str(precious), "--force"] + QUICK,
           capsys, "not an adaskip engine directory")
    assert (precious / "notes.txt").read_text() == "keep me"
    _fails(build_cli.main, ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "--skip", "3",
                            "-o", str(tmp_path / "x")], capsys, "--plan fixes the selection; drop --skip")
    _fails(build_cli.main, ["--model", str(tiny_chat_model), "--skip", "1", "--calib-tokens", "4096",
                            "-o", str(tmp_path / "x")], capsys, "exceeds the model's context of 2048")
    latin1 = tmp_path / "prompt.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    _fails(run_cli.main, ["--engine", str(engine), "--prompt-file", str(latin1)], capsys, "not UTF-8")
    _fails(run_cli.main, ["--engine", str(engine), "--prompt-file", str(tmp_path / "missing.txt")], capsys,
           "cannot read prompt file")


def test_ort_and_torch_engines_generate_the_same_text(engine, torch_engine, capsys):
    outs = []
    for e in (engine, torch_engine):
        assert run_cli.main(["--engine", str(e), "--prompt", "The meaning of life is", "--max-new-tokens", "16",
                             "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["text"] == outs[1]["text"] and outs[0]["kv_bytes"] == outs[1]["kv_bytes"]


def test_spinning_is_an_option_of_the_onnx_runtime_engines(engine, torch_engine, capsys, monkeypatch):
    """--spinning / ADASKIP_SPINNING=1 turn ONNX Runtime's intra-op spinning on (the setting llama.cpp and
    onnxruntime-genai decode with by default); the text does not change; a bad value or another backend is refused."""
    from adaskip.runtime.loader import load_runtime

    def spins(**kw) -> str:
        session = load_runtime(engine, threads=1, **kw).engine.session
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    texts = []
    for extra in ([], ["--spinning"]):
        assert run_cli.main(["--engine", str(engine), "--prompt", "The meaning of life is", "--max-new-tokens", "8",
                             "--json", *extra]) == 0
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1]
    assert spins() == "0" and spins(spinning=True) == "1"
    monkeypatch.setenv("ADASKIP_SPINNING", "1")
    assert spins() == "1" and spins(spinning=False) == "0"  # an explicit setting wins over the environment
    for hostile in ("yes", "1\n\x1b[2J"):  # one line whatever the variable holds
        monkeypatch.setenv("ADASKIP_SPINNING", hostile)
        assert run_cli.main(["--engine", str(engine), "--prompt", "x"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "ADASKIP_SPINNING must be 0" in err[0], err
    monkeypatch.delenv("ADASKIP_SPINNING")
    _fails(run_cli.main, ["--engine", str(torch_engine), "--prompt", "x", "--spinning"], capsys, "is a torch engine")


def test_verify_passes_a_good_engine_and_fails_a_tampered_one(engine, tiny_chat_model, tmp_path, capsys):
    from adaskip.cli import verify

    assert verify.main(["--engine", str(engine), "--prompts", "2", "--prompt-tokens", "32", "--decode-steps", "4",
                        "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_logit_diff"] <= 1e-4 and report["token_agreement"] == 1.0
    assert report["steps"] == 10
    other = tmp_path / "other"  # a different model with the same architecture: refused as the reference
    shutil.copytree(tiny_chat_model, other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    w["model.norm.weight"] = w["model.norm.weight"] * 2
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    _fails(verify.main, ["--engine", str(engine), "--model", str(other)], capsys, "fingerprint differs")


def test_int4_engine_builds_runs_and_reports_agreement(tiny_chat_model, engine, tmp_path, capsys):
    from adaskip.cli import verify

    out = tmp_path / "q4"
    assert build_cli.main(["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "--quantize", "int4",
                           "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["graph"]["quantize"] == "int4"
    capsys.readouterr()
    assert run_cli.main(["--engine", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] <= 4
    assert verify.main(["--engine", str(out), "--prompts", "1", "--prompt-tokens", "16", "--decode-steps", "3",
                        "--json"]) == 0  # report only: int4 is not expected to match fp32 to 1e-4
    report = json.loads(capsys.readouterr().out)
    assert report["quantize"] == "int4" and 0.0 <= report["token_agreement"] <= 1.0 and report["max_logit_diff"] > 0
    _fails(build_cli.main, ["--model", str(tiny_chat_model), "--skip", "1", "--backend", "torch", "--quantize", "int4",
                            "-o", str(tmp_path / "x")], capsys, "ort backend only")


def test_verify_and_bench_refuse_bad_options_and_bench_writes_its_docs(engine, tiny_chat_model, tmp_path, capsys):
    from adaskip.cli import bench, verify

    _fails(verify.main, ["--engine", str(engine), "--decode-steps", "5000"], capsys, "--decode-steps must leave room")
    _fails(bench.main, ["--model", str(tiny_chat_model), "--contexts", "1k", "--no-hf", "--no-genai"], capsys,
           "comma-separated integers")
    out = tmp_path / "docs"
    assert bench.main(["--model", str(tiny_chat_model), "--contexts", "16,32", "--budgets", "1", "--repeats", "1",
                       "--decode-tokens", "2", "--no-hf", "--no-genai", "--calib-prompts", "1", "--calib-tokens", "16",
                       "--out", str(out)]) == 0
    data = json.loads((out / "benchmarks.json").read_text())
    # llama.cpp (the [llamacpp] extra): its three GGUF columns where llama-cpp-python is installed, else a reason
    from adaskip.eval import llamacpp

    missing = llamacpp.unavailable()
    anchors = [] if missing else ["llama.cpp-f32", "llama.cpp-q8_0", "llama.cpp-q4_0"]
    assert [c["name"] for c in data["columns"]] == ["torch-reference", "ort", "ort-spin", "ort-adaskip-k1", *anchors]
    assert data["skipped"] == ({"llama.cpp": missing} if missing else {})
    assert "spinning on" in data["columns"][2]["note"]  # the like-for-like column for onnxruntime-genai
    for name in anchors:  # timed like every other column, OpenMP's default wait policy, its build recorded
        col = next(c for c in data["columns"] if c["name"] == name)
        assert data["results"][name]["32"]["ttft"] > 0 and data["results"][name]["32"]["decode"] > 0
        assert col["info"]["llama_cpp_python"] and "OPENMP = 1" in col["info"]["system_info"]
        assert col["info"]["omp_wait_policy"].startswith("(unset") and "OpenMP wait policy (unset" in col["note"]
    # both ideals beside the AdaSkip column: the bytes-and-FLOPs one with its machine constants
    k1 = next(c for c in data["columns"] if c["name"] == "ort-adaskip-k1")["ideal"]["32"]
    assert set(k1["roofline"]) == {"prefill", "decode"} and k1["roofline"]["decode"] >= 1.0
    # the roofline on this run's measured rates; each engine column's memory floor from the bytes it reads
    assert data["bandwidth_gbs"] > 0 and data["roofline"]["machine"] == {
        "bandwidth_gbs": round(data["bandwidth_gbs"], 1), "peak_gflops": round(max(data["gemm_gflops"].values()), 1)}
    step = {c["name"]: c["decode_bytes"].get("32") for c in data["columns"]}
    assert 0 < step["ort-adaskip-k1"] < step["ort"] == step["ort-spin"] and not step["torch-reference"]
    assert all(step[name] > 0 for name in anchors)
    assert set(data["results"]["ort"]) == {"16", "32"} and data["results"]["ort"]["16"]["ttft"] > 0
    flops = {c["name"]: sum(c["prefill_flops"]["32"].values()) for c in data["columns"]}
    assert data["gemm_gflops"]["16"] > 0 and 0 < flops["ort-adaskip-k1"] < flops["ort"] == flops["torch-reference"]
    # the attention kernel is timed at each context where the model's head size lets the graph use it
    head_ok = gqa_supports(load_model(str(tiny_chat_model)).spec)
    assert all((g is not None and g > 0) == head_ok for g in data["attention_gflops"].values())
    assert {c["ideal"]["32"]["decode_steps"] for c in data["columns"] if c["ideal"]} == {2}  # the steps measured
    md = (out / "benchmarks.md").read_text()
    assert "| ort-adaskip-k1 |" in md and (out / "benchmarks.png").exists() and "decode over the same 2 steps" in md
    assert "bytes+FLOPs" in md and f"bandwidth {data['bandwidth_gbs']:.1f} GB/s" in md and "| of floor |" in md
    # ONNX Runtime's own matrix-vector rate at the model's shape beside it, and the floor it allows
    assert data["gemv_gbs"] > 0 and f"hidden size (a 256 MB matrix stored in the graph, as an engine's weights are) " \
        f"read {data['gemv_gbs']:.1f} GB/s" in md
    assert (f"Not measured: llama.cpp: {missing}." in md) if missing else ("| llama.cpp-q4_0 |" in md
                                                                           and "llama.cpp build (ggml system info)" in md)
    assert "Kernels alone: fp32 MatMul" in md and ("GroupQueryAttention, causal over 32 tokens" in md) == head_ok


def test_bench_times_the_attention_kernel_across_prefill_chunks(monkeypatch):
    """The kernel-bound column's attention rate: GroupQueryAttention run over a causal prompt in the engine's
    chunks (here 3 chunks of 16), and refused (None) for a head size the kernel cannot take."""
    from types import SimpleNamespace

    from adaskip.eval import bench
    from adaskip.runtime import ort_engines as ort_engine

    monkeypatch.setattr(ort_engine, "PREFILL_CHUNK", 16)
    assert bench._attention_gflops(SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16), 1, 40) > 0
    assert bench._attention_gflops(SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=8), 1, 40) is None
    flops = {"matmul": 4e9, "attention": 1e9}
    assert bench._kernel_bound(flops, 200.0, 100.0) == pytest.approx(0.03)
    assert bench._kernel_bound(flops, 200.0, None) is None


def test_bench_counts_another_builders_onnx_weights_without_its_gathered_embedding(tmp_path):
    """The memory floor of an onnxruntime-genai column: every initializer a decode step reads at its stored width
    (an int4 pack counts half a byte per element), not a table that is only gathered from; the KV cache's width
    from its past_key_values inputs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from adaskip.eval import bench

    inits = [numpy_helper.from_array(np.zeros((100, 8), np.float32), "embed"),  # gathered only: one row per token
             numpy_helper.from_array(np.zeros((8, 100), np.float32), "head"),
             helper.make_tensor("packed", TensorProto.UINT4, [8, 16], np.zeros(64, np.uint8).tobytes(), raw=True)]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["y"]),
             helper.make_node("Identity", ["packed"], ["p"])]
    ins = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1]),
           helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, [1, 2, "t", 16])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "p")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", ins, outs, inits)), tmp_path / "m.onnx")
    assert bench._onnx_decode_weights(tmp_path / "m.onnx") == (8 * 100 * 4 + 8 * 16 * 0.5, 2.0)


def test_build_with_a_fitted_stand_in_and_its_engine_matches_the_reference(tiny_chat_model, tmp_path, capsys):
    """--stand-in channel-affine: the calibration pass also fits per-channel maps; the plan carries them for exactly
    its offline set, and the ORT engine (which bakes them in) matches the reference engine that applies them."""
    from adaskip.cli import verify

    out = tmp_path / "affine"
    assert build_cli.main(["--model", str(tiny_chat_model), "--skip", "3", "--mode", "e2e", "--stand-in",
                           "channel-affine", "-o", str(out)] + QUICK) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["version"] == 2 and plan["compensation"]["rule"] == "channel-affine"
    assert sorted(int(j) for j in plan["compensation"]["sublayers"]) == sorted(plan["skip"])
    capsys.readouterr()
    assert verify.main(["--engine", str(out), "--prompts", "2", "--prompt-tokens", "24", "--decode-steps", "8",
                        "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_logit_diff"] <= 1e-4 and report["token_agreement"] == 1.0
    m = ["--model", str(tiny_chat_model), "-o", str(tmp_path / "x")] + QUICK
    _fails(build_cli.main, m + ["--method", "early-exit", "--skip", "1", "--stand-in", "channel-affine"], capsys,
           "applies to AdaSkip plans")
    _fails(build_cli.main, m + ["--skip", "1", "--stand-in", "channel-affine", "--backend", "trtllm-checkpoint"],
           capsys, "norm-ratio stand-in only")
    _fails(build_cli.main, m + ["--plan", str(out / "plan.json"), "--stand-in", "channel-scale"], capsys,
           "drop --stand-in")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["bench", "build", "deploy", "eval", "run", "serve", "serve_openai", "verify"])
def test_help_shows_defaults_only_where_they_mean_something(name):
    """`--no-x` stores False, so "(default: True)" beside it read as the flag being on; None says nothing the help
    text does not. Every command (and subcommand) keeps real defaults, e.g. a number's."""
    import argparse
    import importlib

    top = importlib.import_module(f"adaskip.cli.{name}").parser()
    parsers = [top] + [sub for a in top._actions if isinstance(a, argparse._SubParsersAction)
                       for sub in a.choices.values()]
    for p in parsers:
        text = p.format_help()
        for word in ("True", "False", "None"):
            assert f"(default: {word})" not in text, (p.prog, word)
    assert any("(default: " in p.format_help() for p in parsers), name
