"""TensorRT backend: engines built on CPU with TensorRT for RTX (no GPU here), the parsed network inspected against
the skip plan, the IOSimilarity plugin, clear failures; running an engine needs a GPU (those tests skip here)."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_hf
from onnx import TensorProto, helper

from adaskip.cli.build import main as build_main
from adaskip.engine_dir import open_engine_dir
from adaskip.errors import InputError
from adaskip.model import load_model
from adaskip.plan import Calibration, SkipPlan, adaskip_plan
from adaskip.export.onnx import similarity_op as similarity_onnx
from adaskip.policy import SkipPolicy
from adaskip.export.tensorrt.builder import ENGINE_FILE, TrtSettings, build_engine
from adaskip.runtime.trt.lib import TensorRTError, load_tensorrt
from adaskip.runtime.trt.plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, register_plugin, similarity_stats
from adaskip.runtime.trt.profiles import Limits, make_profiles

DATA = Path(__file__).parent / "data"
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="running a TensorRT engine needs an NVIDIA GPU; this machine has none "
                                               "(engines are built and inspected on CPU above)")


@pytest.fixture(scope="module")
def env():
    return load_tensorrt()


# -- the plugin ------------------------------------------------------------------------------------------------------

def _onnx_similarity(h_in: np.ndarray, h_out: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    """The ai.adaskip::IOSimilarity node executed by ONNX Runtime through its function body (the op's semantics)."""
    import onnxruntime as ort

    node = helper.make_node(similarity_onnx.OP, ["h_in", "h_out", "valid"], ["s", "r"], domain=similarity_onnx.DOMAIN)
    f = TensorProto.FLOAT
    graph = helper.make_graph([node], "sim", [helper.make_tensor_value_info("h_in", f, list(h_in.shape)),
                                              helper.make_tensor_value_info("h_out", f, list(h_in.shape)),
                                              helper.make_tensor_value_info("valid", f, list(valid.shape))],
                              [helper.make_tensor_value_info(n, f, [h_in.shape[0], 1]) for n in ("s", "r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), similarity_onnx.opset_import()],
                              functions=[similarity_onnx.function_proto()])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"h_in": h_in, "h_out": h_out, "valid": valid})


def test_plugin_math_matches_the_onnx_op():
    g = torch.Generator().manual_seed(0)
    h_in = torch.randn(3, 7, 64, generator=g)
    h_out = h_in + 0.3 * torch.randn(3, 7, 64, generator=g)
    valid = torch.ones(3, 7)
    valid[1, :3] = 0  # left padding
    valid[2, :6] = 0
    s, r = similarity_stats(h_in, h_out, valid)
    ref_s, ref_r = _onnx_similarity(h_in.numpy(), h_out.numpy(), valid.numpy())
    assert s.shape == r.shape == (3, 1) and s.dtype == torch.float32
    np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-6, rtol=0)
    np.testing.assert_allclose(r.numpy(), ref_r, atol=1e-6, rtol=0)
    for dtype in (torch.float16, torch.bfloat16):  # fp32 accumulation, result in the stream's type
        s16, r16 = similarity_stats(h_in.to(dtype), h_out.to(dtype), valid.to(dtype))
        assert s16.dtype == r16.dtype == dtype and s16.shape == (3, 1)
        np.testing.assert_allclose(s16.float().numpy(), ref_s, atol=2e-2, rtol=0)


def test_plugin_registers_serializes_its_field_and_accepts_float_formats(env):
    trt = env.trt
    creator = register_plugin(env)
    assert register_plugin(env) is creator  # once per process
    registry = trt.get_plugin_registry()
    assert registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None
    assert len(creator.field_names) == 0  # the ONNX op has no attributes
    plugin = creator.create_plugin("sim", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    fields = list(plugin.get_fields_to_serialize())
    assert [f.name for f in fields] == ["eps"] and fields[0].type == trt.PluginFieldType.FLOAT32
    again = creator.create_plugin("sim", trt.PluginFieldCollection(fields), trt.TensorRTPhase.RUNTIME)
    assert again.eps == pytest.approx(plugin.eps) and again.num_outputs == 2
    eps = trt.PluginField("eps", np.array([1e-3], np.float32), trt.PluginFieldType.FLOAT32)
    other = trt.PluginFieldCollection([eps])
    with env.logger.capture() as messages:
        assert creator.create_plugin("sim", other, trt.TensorRTPhase.RUNTIME) is None
    assert any("eps" in m for _, m in messages)
    assert plugin.clone().eps == plugin.eps
    assert plugin.get_output_data_types([trt.DataType.HALF] * 3) == [trt.DataType.HALF] * 2

    def descs(*types):
        out = []
        for t in types:
            d = trt.DynamicPluginTensorDesc()
            p = trt.PluginTensorDesc()
            p.type, p.format = t, trt.TensorFormat.LINEAR
            d.desc = p
            out.append(d)
        return out

    F, H, B, I = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16, trt.DataType.INT32
    for t in (F, H, B):
        io_ = descs(t, t, t, t, t)
        assert all(plugin.supports_format_combination(pos, io_, 3) for pos in range(5))
    assert plugin.supports_format_combination(2, descs(H, H, F, H, H), 3)  # a float32 mask with half streams
    assert not plugin.supports_format_combination(0, descs(I, I, I, I, I), 3)
    assert not plugin.supports_format_combination(1, descs(F, H, F, F, F), 3)
    assert not plugin.supports_format_combination(3, descs(H, H, H, F, F), 3)


# -- profiles --------------------------------------------------------------------------------------------------------

def test_profiles_split_and_combined():
    axes = {"input_ids": ["batch", "seq"], "past_valid": ["batch", "past"], "want_stats": [],
            "past_key_0": ["batch", 2, 16, "past"], "skip": ["batch", 8]}
    limits = Limits(2, 64, 128)
    prefill, decode = make_profiles(axes, limits, "split")
    assert (prefill.name, decode.name) == ("prefill", "decode") and "want_stats" not in prefill.shapes
    assert prefill.shapes["input_ids"] == ([1, 1], [1, 32], [2, 64])
    assert prefill.shapes["past_key_0"] == ([1, 2, 16, 0], [1, 2, 16, 0], [2, 2, 16, 0])  # prefill: empty buffer
    assert decode.shapes["input_ids"] == ([1, 1], [1, 1], [2, 1])
    assert decode.shapes["past_valid"] == ([1, 1], [1, 64], [2, 128])
    assert decode.shapes["skip"] == ([1, 8], [1, 8], [2, 8])
    (combined,) = make_profiles(axes, limits, "combined")
    assert combined.shapes["past_key_0"] == ([1, 2, 16, 0], [1, 2, 16, 64], [2, 2, 16, 128])
    with pytest.raises(TensorRTError, match="capacity"):
        make_profiles({"past_key_0": ["batch", 2, "capacity", 16]}, limits, "split")  # the ORT variant's axis
    with pytest.raises(InputError, match="--max-input-len 300 exceeds --max-seq-len 200"):
        Limits.resolve(1, 300, 200, 1000)
    with pytest.raises(InputError, match="context of 256"):
        Limits.resolve(1, None, 512, 256)
    assert Limits.resolve(None, None, None, 256) == Limits(4, 256, 256)


# -- engines built on CPU --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_root, smollm2_dir) -> Path:
    """The tiny random Llama (head dim 16) with a tokenizer next to it, as adaskip-build wants one."""
    out = tmp_path_factory.mktemp("trt-tiny") / "llama"
    shutil.copytree(make_tiny_hf("llama", tiny_root), out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def tiny_plan(tiny_model_dir, tmp_path_factory) -> Path:
    """An e2e K=2 plan skipping layer 1's attention and layer 2's FFN, online learning on (the other FFNs are
    conditional): every kind of sublayer the graph has."""
    model = load_model(str(tiny_model_dir))
    sim = [0.5, 0.6, 0.95, 0.7, 0.8, 0.9, 0.4, 0.3]
    calib = Calibration(sim, [1.1] * 8, num_prompts=1, prompt_tokens=8, data_digest="synthetic", source="test")
    path = tmp_path_factory.mktemp("trt-plan") / "plan.json"
    adaskip_plan(calib, 2, "e2e", model.fingerprint).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_build(tiny_model_dir, tiny_plan, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-tiny-engine")
    out, cache = root / "engine", root / "timing.cache"
    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # progress on: one line per builder phase (not a terminal)
        rc = build_main(["--model", str(tiny_model_dir), "--plan", str(tiny_plan), "--calib-tokens", "64",
                         "--backend", "tensorrt", "--max-batch-size", "2", "--max-input-len", "64",
                         "--max-seq-len", "128", "--timing-cache", str(cache), "--output", str(out)])
    assert rc == 0, log.getvalue()
    return out, cache, log.getvalue()


def _check_network(net: dict, policy: SkipPolicy) -> None:
    roles = policy.layout.roles
    running = roles.count("always") + roles.count("dynamic")
    # one IIfConditional per dynamic sublayer (j from the conditional's outputs, sub{j}_*)
    assert net["conditionals"]["sublayers"] == [j for j, r in enumerate(roles) if r == "dynamic"]
    # one IOSimilarity plugin layer per sublayer that can run, each inside an If(want_stats ...) conditional: a
    # dynamic sublayer's stats in their own one after the sublayer's (want_stats and some row ran), those of
    # sublayers that always run directly on want_stats (the exporter groups consecutive ones)
    assert net["plugins"]["layers"] == {"IOSimilarity": running}
    assert net["plugins"]["IOSimilarity_in_stats_conditionals"] == running
    on_want_stats = net["conditionals"]["stats_on_want_stats"]
    assert net["conditionals"]["stats"] - on_want_stats == roles.count("dynamic")
    assert 0 < on_want_stats <= roles.count("always")
    assert net["conditionals"]["total"] == roles.count("dynamic") + net["conditionals"]["stats"]
    assert net["conditionals"]["other"] == 0
    assert net["layer_types"]["PLUGIN_V3"] == running
    assert net["layer_types"]["CONDITION"] == net["conditionals"]["total"]
    # KV inputs and outputs only for live (cached) attention layers
    assert net["kv_layers"] == list(policy.layout.cached_layers)
    kv_in = sorted(n for n in net["inputs"] if n.startswith(("past_key_", "past_value_")))
    assert kv_in == sorted(f"past_{kind}_{i}" for i in policy.layout.cached_layers for kind in ("key", "value"))
    kv_out = sorted(n for n in net["outputs"] if n.startswith("new_"))
    assert kv_out == sorted(f"new_{kind}_{i}" for i in policy.layout.cached_layers for kind in ("key", "value"))


def test_tiny_llama_engine_is_built_and_its_network_matches_the_plan(tiny_build, tiny_plan):
    out, cache, log = tiny_build
    ed = open_engine_dir(out, verify_large_files=True)  # manifest digests of every file, plan vs model
    assert ed.backend == "tensorrt"
    info = ed.manifest["build"]["tensorrt"]
    assert (info["flavour"], info["module"]) == ("tensorrt-rtx", "tensorrt_rtx_bindings") and info["version"]
    assert (out / ENGINE_FILE).stat().st_size == info["bytes"] > 1_000_000
    assert ENGINE_FILE in ed.manifest["files"] and not (out / "model.onnx").exists()  # the engine carries the weights
    assert ed.manifest["build"]["graph"]["variant"] == "portable"
    policy = SkipPolicy(SkipPlan.load(tiny_plan))
    assert list(policy.layout.roles) == ["always", "dynamic", "never", "dynamic", "always", "never", "always", "dynamic"]
    net = info["network"]
    _check_network(net, policy)
    assert net["kv_layers"] == [0, 2, 3]  # layer 1's attention is skipped offline: no KV at all
    assert net["conditionals"]["sublayers"] == [1, 3, 7] and net["plugins"]["layers"] == {"IOSimilarity": 6}
    # the requested profiles, as TensorRT holds them: prefill over an empty buffer, decode one token over the buffer
    assert info["profile_mode"] == "split" and [p["name"] for p in info["profiles"]] == ["prefill", "decode"]
    prefill, decode = (p["shapes"] for p in info["profiles"])
    assert prefill["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [2, 64]}
    assert prefill["past_key_0"] == {"min": [1, 2, 16, 0], "opt": [1, 2, 16, 0], "max": [2, 2, 16, 0]}
    assert decode["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 1]}
    assert decode["past_value_3"] == {"min": [1, 2, 1, 16], "opt": [1, 2, 64, 16], "max": [2, 2, 128, 16]}
    assert decode["past_valid"] == {"min": [1, 1], "opt": [1, 64], "max": [2, 128]}
    assert set(prefill) == set(decode) == set(net["inputs"]) - {"want_stats"}
    assert info["limits"] == {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128}
    assert ed.manifest["build"]["options"]["trt_profiles"] == "split"
    assert info["precision"] == {"dtype": "float32", "flags": [], "tf32": False}
    assert info["plugin"] == {"name": "IOSimilarity", "version": "1", "namespace": "", "creator": "python",
                              "override": True}
    # TensorRT for RTX has no timing cache: recorded as such, no file pretended
    assert info["timing_cache"]["used"] is False and not cache.exists()
    assert "--timing-cache ignored" in log
    # the progress display: TensorRT's builder phases, one line each
    assert "TensorRT: Building engine (" in log and "Computing profile costs" in log
    assert "Building engine" in info["phases"]


def test_the_runtime_refuses_clearly_without_a_gpu(tiny_build):
    from adaskip.runtime.loader import load_runtime

    if GPU:
        pytest.skip("this machine has a GPU: the GPU tests below run the engine instead")
    with pytest.raises(TensorRTError, match="NVIDIA GPU"):
        load_runtime(tiny_build[0])


@pytest.fixture(scope="module")
def smollm2_build(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M graph with the stored K=8 e2e plan, built into an engine. One combined profile: the
    RTX compiler compiles the whole network once per profile (~55 s here for the first, ~20-40 s more for a second);
    split profiles are covered by the tiny model."""
    out = tmp_path_factory.mktemp("trt-smollm2") / "engine"
    rc = build_main(["--model", "smollm2-135m", "--plan", str(DATA / "smollm2-k8-e2e-plan.json"), "--backend",
                     "tensorrt", "--profiles", "combined", "--max-batch-size", "2", "--max-input-len", "512",
                     "--max-seq-len", "1024", "--output", str(out), "-q"])
    assert rc == 0
    return out


def test_smollm2_k8_engine_is_built_and_its_network_matches_the_plan(smollm2_build):
    ed = open_engine_dir(smollm2_build)
    info = ed.manifest["build"]["tensorrt"]
    policy = SkipPolicy(ed.plan)
    roles = policy.layout.roles
    net = info["network"]
    _check_network(net, policy)
    # the K=8 plan skips 8 attention sublayers offline (removed: no weights, no KV); every FFN may be skipped online
    assert sorted(ed.plan.skip) == [6, 8, 10, 14, 18, 50, 52, 56]
    assert roles.count("dynamic") == 30 and roles.count("always") == 22 and roles.count("never") == 8
    # every FFN is dynamic, so no two always-running sublayers are adjacent: each attention gets its own stats If
    assert len(net["conditionals"]["sublayers"]) == 30 and net["conditionals"]["stats"] == 52
    assert net["conditionals"]["stats_on_want_stats"] == 22
    assert net["plugins"]["layers"] == {"IOSimilarity": 52}
    assert net["kv_layers"] == [i for i in range(30) if i not in (3, 4, 5, 7, 9, 25, 26, 28)]
    (profile,) = info["profiles"]
    assert profile["name"] == "combined"
    assert profile["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 256], "max": [2, 512]}
    assert profile["shapes"]["past_key_0"] == {"min": [1, 3, 64, 0], "opt": [1, 3, 64, 512], "max": [2, 3, 64, 1024]}
    assert profile["shapes"]["skip"] == {"min": [1, 60], "opt": [1, 60], "max": [2, 60]}
    assert info["bytes"] > 400_000_000  # the weights are in the engine
    print(f"SmolLM2 K=8 engine: {info['bytes'] / 1e6:.0f} MB, built in {info['build_seconds']} s, "
          f"{net['layers']} layers")


# -- failures --------------------------------------------------------------------------------------------------------

def test_a_graph_the_parser_cannot_read_fails_with_its_message(tiny_model_dir, tiny_plan, tmp_path, monkeypatch,
                                                              capsys):
    import adaskip.builder.build as build_mod

    real = build_mod.build_onnx

    def with_unsupported_op(*args, **kwargs):
        model = real(*args, **kwargs)
        model.graph.node.append(helper.make_node("Unique", ["scale"], ["unique_scale"], name="deliberately_unique"))
        return model

    monkeypatch.setattr(build_mod, "build_onnx", with_unsupported_op)
    out = tmp_path / "engine"
    rc = build_main(["--model", str(tiny_model_dir), "--plan", str(tiny_plan), "--calib-tokens", "64", "--backend",
                     "tensorrt", "--max-seq-len", "128", "--output", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "TensorRT's ONNX parser" in err and "deliberately_unique (Unique): UNSUPPORTED_NODE" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no engine dir, no half-written temp dir


def test_a_graph_the_builder_cannot_compile_fails_with_its_message(tmp_path):
    """TensorRT-RTX 1.7 cannot build an If inside an If branch (why the portable graph puts the stats conditional
    after the sublayer's instead of inside it): the builder's own message comes back as an error, not a crash."""
    f = TensorProto.FLOAT

    def branch(name, op, const):
        return helper.make_graph([helper.make_node(op, ["x", const], [name + "_y"])], name, [],
                                 [helper.make_tensor_value_info(name + "_y", f, None)])

    inner = helper.make_node("If", ["c2"], ["inner"], then_branch=branch("t2", "Mul", "two"),
                             else_branch=branch("e2", "Add", "two"))
    then = helper.make_graph([inner], "t1", [], [helper.make_tensor_value_info("inner", f, None)])
    outer = helper.make_node("If", ["c1"], ["y"], then_branch=then, else_branch=branch("e1", "Sub", "two"))
    graph = helper.make_graph([outer], "nested", [helper.make_tensor_value_info("x", f, ["batch", 4]),
                                                  helper.make_tensor_value_info("c1", TensorProto.BOOL, []),
                                                  helper.make_tensor_value_info("c2", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", f, ["batch", 4])],
                              initializer=[onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "nested.onnx")
    with pytest.raises(TensorRTError, match="could not build an engine") as e:
        build_engine(tmp_path / "nested.onnx", tmp_path / ENGINE_FILE,
                     TrtSettings(Limits(2, 8, 8), profiles="combined", progress=False))
    assert "Myelin" in str(e.value)
    assert not (tmp_path / ENGINE_FILE).exists()


@pytest.mark.parametrize("args, message", [
    (["--backend", "tensorrt", "--max-input-len", "200", "--max-seq-len", "100"], "exceeds --max-seq-len 100"),
    (["--backend", "tensorrt", "--max-seq-len", "1000"], "exceeds the model's context of 256"),
    (["--backend", "tensorrt", "--dtype", "float16"], "strongly typed networks only"),
    (["--backend", "tensorrt", "--graph-variant", "ort"], "portable graph"),
    (["--backend", "ort", "--max-batch-size", "8"], "--max-batch-size: TensorRT engine options"),
])
def test_bad_tensorrt_options_fail_before_any_build(args, message, tiny_model_dir, tiny_plan, tmp_path, capsys):
    out = tmp_path / "engine"
    rc = build_main(["--model", str(tiny_model_dir), "--plan", str(tiny_plan), "--calib-tokens", "64",
                     "--output", str(out), "-q", *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


# -- running an engine (GPU only) ------------------------------------------------------------------------------------

@needs_gpu
def test_tiny_engine_matches_the_reference_on_gpu(tiny_build, tiny_model_dir):
    from adaskip.runtime.loader import load_runtime
    from adaskip.runtime.torch_engine import TorchEngine
    from adaskip.eval.verify import compare_engines

    rt = load_runtime(tiny_build[0])
    model = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    prompts = torch.randint(0, 320, (2, 24)).tolist()
    report = compare_engines(TorchEngine.from_loaded(model), rt.engine, rt.policy, prompts, 30, atol=1e-3)
    assert report.token_agreement == 1.0 and report.max_similarity_diff <= 1e-3


@needs_gpu
def test_smollm2_engine_generates_what_the_ort_engine_generates_on_gpu(smollm2_build, smollm2_dir, tmp_path):
    from adaskip.runtime.generate import SamplingParams
    from adaskip.runtime.loader import load_runtime

    ort_dir = tmp_path / "ort"
    assert build_main(["--model", "smollm2-135m", "--plan", str(DATA / "smollm2-k8-e2e-plan.json"), "--output",
                       str(ort_dir), "-q"]) == 0
    prompt = "The three primary colors are"
    texts = []
    for path in (smollm2_build, ort_dir):
        rt = load_runtime(path)
        (result,) = rt.generator.generate([rt.generator.encode(prompt)], SamplingParams(max_new_tokens=48))
        texts.append(result.tokens)
    assert texts[0] == texts[1]

