"""Options owned by the library: every CLI fills the library's options object, its flags' defaults are the options'
defaults, and each rule is checked in one place with one message (bad options fail before any model is loaded)."""

from __future__ import annotations

import ast
import math
from dataclasses import replace
from pathlib import Path

import pytest

from adaskip.builder.options import BuildOptions, CalibrationOptions, EngineOptions, SelectionOptions
from adaskip.cli import bench as bench_cli
from adaskip.cli import build as build_cli
from adaskip.cli import deploy as deploy_cli
from adaskip.cli import eval as eval_cli
from adaskip.cli import run as run_cli
from adaskip.cli import verify as verify_cli
from adaskip.deploy.triton_repo import TritonModelOptions
from adaskip.errors import InputError, PlanError
from adaskip.eval.bench import BenchOptions
from adaskip.eval.runner import EvalOptions
from adaskip.eval.verify import VerifyOptions
from adaskip.export.tensorrt.builder import TrtSettings
from adaskip.export.tensorrt.options import TensorRTOptions
from adaskip.plan import baseline_plan
from adaskip.runtime.generate import SamplingParams
from adaskip.runtime.trt.profiles import Limits

CLI = Path(__file__).parents[1] / "adaskip" / "cli"


def test_flags_left_out_give_exactly_the_library_defaults():
    assert build_cli.options(build_cli.parser().parse_args(["--model", "m", "-o", "o"])) == BuildOptions("m", "o")
    assert bench_cli.options(bench_cli.parser().parse_args([])) == BenchOptions()
    assert verify_cli.options(verify_cli.parser().parse_args(["--engine", "e"])) == VerifyOptions("e")
    assert eval_cli.options(eval_cli.parser().parse_args(["--model", "m", "--out", "o"])) == EvalOptions("m", "o")
    assert run_cli.sampling(run_cli.parser().parse_args(["--engine", "e"])) == SamplingParams()
    triton = deploy_cli.parser().parse_args(["triton", "--engine", "e", "--repo", "r"])
    assert deploy_cli.options(triton) == TritonModelOptions()


def test_build_flags_land_in_their_group():
    a = build_cli.parser().parse_args(["--model", "m", "-o", "o", "--skip", "3", "--mode", "decode", "--window", "7",
                                       "--no-online", "--calib", "c.jsonl", "--calib-prompts", "4", "--calib-tokens",
                                       "256", "--backend", "tensorrt", "--max-seq-len", "64", "--profiles", "combined",
                                       "--builder-opt-level", "2", "-q"])
    opts = build_cli.options(a)
    assert opts.selection == SelectionOptions(skip=3, mode="decode", window=7, online=False)
    assert opts.calibration == CalibrationOptions(data="c.jsonl", prompts=4, tokens=256)
    assert opts.engine == EngineOptions(backend="tensorrt", tensorrt=TensorRTOptions(max_seq_len=64,
                                                                                     profiles="combined",
                                                                                     builder_opt_level=2))
    assert not opts.progress
    opts.validate()


def test_no_cli_flag_repeats_a_default_as_a_literal():
    """A flag's default is read from the options dataclass (defaults(...)), never written again next to the flag."""
    allowed = {("bench.py", "--out")}  # where adaskip-bench writes its docs: the CLI's own, no library option
    found = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                default = next((k.value for k in node.keywords if k.arg == "default"), None)
                if isinstance(default, ast.Constant) and default.value is not None:
                    found.append((path.name, node.args[0].value))
    assert found and set(found) == allowed  # found: the walk sees the one allowed literal


def _build(**parts) -> BuildOptions:
    return BuildOptions("m", "o", **{"selection": SelectionOptions(skip=1), **parts})


@pytest.mark.parametrize("opts, message", [
    (_build(selection=SelectionOptions(method="layerdrop", skip=1)),
     "--method must be one of adaskip, early-exit, skipdecode, unified; got 'layerdrop'"),
    (_build(selection=SelectionOptions(mode="both", skip=1)), "--mode must be one of prefill, decode, e2e; got 'both'"),
    (_build(engine=EngineOptions(backend="onnx")), "--backend must be one of ort, torch, trtllm-checkpoint, tensorrt"),
    (_build(engine=EngineOptions(dtype="int8")), "--dtype must be one of float32, bfloat16, float16; got 'int8'"),
    (_build(engine=EngineOptions(graph_variant="fast")), "--graph-variant must be one of auto, ort, portable"),
    (_build(selection=SelectionOptions(stand_in="zero", skip=1)), "--stand-in must be one of norm-ratio"),
    (_build(selection=SelectionOptions()), "exactly one of --skip K, --alpha A or --max-kl X"),
    (_build(selection=SelectionOptions(skip=1, window=0)), "--window must be >= 1"),
    (_build(calibration=CalibrationOptions(prompts=0)), "--calib-prompts must be at least 1; got 0"),
    (_build(calibration=CalibrationOptions(tokens=4)), "--calib-tokens must be at least 8; got 4"),
    # a plan decides the selection: whatever else would be ignored is refused, --no-online included
    (_build(selection=SelectionOptions(plan="p.json", online=False)), "drop --no-online"),
    (_build(selection=SelectionOptions(plan="p.json", skip=2, window=5), calibration=CalibrationOptions(data="c.txt")),
     "--plan fixes the selection; drop --skip, --window, --calib"),
    (_build(engine=EngineOptions(tensorrt=TensorRTOptions(max_seq_len=64, profiles="combined"))),
     "--max-seq-len, --profiles: TensorRT engine options, for --backend tensorrt only"),
    (_build(engine=EngineOptions(backend="tensorrt", tensorrt=TensorRTOptions(builder_opt_level=9))),
     "--builder-opt-level must be between 0 and 5; got 9"),
    (_build(engine=EngineOptions(backend="tensorrt", tensorrt=TensorRTOptions(profiles="both"))),
     "--profiles must be one of split, combined; got 'both'"),
    (_build(engine=EngineOptions(backend="tensorrt", quantize="int4")), "--quantize int4 is available for the ort"),
    (_build(engine=EngineOptions(backend="tensorrt", graph_variant="ort")), "builds from the portable graph"),
    (_build(selection=SelectionOptions(skip=1, stand_in="channel-affine"), engine=EngineOptions(
        backend="trtllm-checkpoint")), "norm-ratio stand-in only"),
])
def test_build_options_refuse_with_one_message(opts, message):
    with pytest.raises(InputError) as e:
        opts.validate()
    assert message in str(e.value)


def test_plan_conflicts_fail_before_the_model_is_looked_at(tmp_path, capsys):
    out = tmp_path / "e"
    assert build_cli.main(["--model", str(tmp_path / "no-such-model"), "--plan", "p.json", "--no-online",
                           "-o", str(out)]) == 2
    assert "drop --no-online" in capsys.readouterr().err and not out.exists()


def test_the_manifest_keeps_its_flat_option_keys():
    """Engine directories record the build options flat, as they always have (adaskip-verify reads dtype/quantize)."""
    record = BuildOptions("m", "o", engine=EngineOptions(tensorrt=TensorRTOptions(profiles="combined"))).record()
    assert set(record) == {"model", "method", "skip", "alpha", "max_kl", "mode", "calib", "calib_prompts", "calib_tokens",
                           "context_len", "window", "online", "stand_in", "select", "select_candidates", "probes",
                           "probe_tokens", "plan", "backend", "dtype", "quantize",
                           "kv_dtype", "graph_variant", "max_batch_size", "max_input_len", "max_seq_len",
                           "trt_profiles", "timing_cache", "builder_opt_level"}
    assert record["trt_profiles"] == "combined" and record["calib_tokens"] == CalibrationOptions().tokens


def test_trt_settings_derive_from_the_options():
    s = TrtSettings.from_options(TensorRTOptions(timing_cache="~/t.cache"), "float32", 8192, progress=False)
    assert s.limits == Limits(4, 2048, 4096) and s.profiles == TensorRTOptions().profiles
    assert s.timing_cache == Path("~/t.cache").expanduser() and not s.progress
    with pytest.raises(InputError, match="exceeds the model's context of 256"):
        TrtSettings.from_options(TensorRTOptions(max_seq_len=1000), "float32", 256)


def test_methods_and_modes_are_checked_by_one_function_everywhere():
    with pytest.raises(InputError, match="--modes must be one of prefill, decode, e2e; got 'both'"):
        EvalOptions("m", "o", modes=["both"]).validate()
    with pytest.raises(InputError, match="--calib-prompts must be at least 1; got 0"):
        EvalOptions("m", "o", calib_prompts=0).validate()  # the calibration sizes: CalibrationOptions' own check
    plan = baseline_plan("early-exit", 4, 1, "e2e", "fp")
    with pytest.raises(PlanError, match="the plan's mode must be one of prefill, decode, e2e; got 'both'"):
        replace(plan, mode="both")
    with pytest.raises(PlanError, match="the plan's method must be one of adaskip, early-exit"):
        replace(plan, method="layerdrop")


@pytest.mark.parametrize("opts, message", [
    (BenchOptions(repeats=0), "--repeats, --decode-tokens and --threads must be >= 1"),
    (BenchOptions(contexts=[]), "--contexts must be one or more positive token counts"),
    (BenchOptions(contexts=[0, 1024]), "--contexts must be one or more positive token counts"),
    (BenchOptions(budgets=[-1]), "--budgets must be non-negative"),
    (BenchOptions(calib_tokens=4), "--calib-tokens must be at least 8"),
    (VerifyOptions("e", decode_steps=-1), "--decode-steps >= 0"),
    (VerifyOptions("e", atol=math.nan), "--atol must be a finite number >= 0"),
    (VerifyOptions("e", atol=-1.0), "--atol must be a finite number >= 0"),
])
def test_bench_and_verify_options_refuse_bad_values(opts, message):
    with pytest.raises(InputError) as e:
        opts.validate()
    assert message in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--contexts", "1k"], "--contexts takes comma-separated integers; got '1k'"),
    (["--contexts", ","], "--contexts must be one or more positive token counts"),
    (["--budgets", "8,x"], "--budgets takes comma-separated integers"),
    (["--repeats", "0"], "must be >= 1"),
])
def test_bench_cli_refuses_before_loading_anything(argv, message, capsys):
    assert bench_cli.main(["--model", "no-such-model", "--no-hf", "--no-genai", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
