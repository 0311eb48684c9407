"""adaskip-build --backend trtllm-checkpoint: TensorRT-LLM's checkpoint layout carrying the skip plan.

TensorRT-LLM cannot be installed here, so the checkpoint is verified by reading it back into the reference engine
(same logits as the source model under the same plan), by its schema and layout, and the model class file by
parsing it and checking every TensorRT-LLM name it uses against the list checked in TensorRT-LLM's source.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_hf

from adaskip.cli import build as build_cli
from adaskip.errors import EngineDirError, InputError
from adaskip.export.trtllm import checkpoint as tc
from adaskip.export.trtllm import merge as tm
from adaskip.model import load_model
from adaskip.plan import Calibration, SkipPlan, adaskip_plan, baseline_plan
from adaskip.policy import SkipPolicy
from adaskip.runtime.torch_engine import TorchEngine
from adaskip.eval.verify import compare_engines

DATA = Path(__file__).parent / "data"
TOL = 1e-6
QUICK = ["--calib-prompts", "2", "--calib-tokens", "64", "-q"]


def _aligned(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh allocations for both sides: CPU GEMM results can differ in the last bit with the operands' memory
    alignment (an mmapped tensor vs a copy), which is not what this comparison is about. The weights themselves
    are compared bit for bit separately."""
    return {k: v.clone() for k, v in weights.items()}


def _round_trip(model, plan: SkipPlan, out: Path, prompts: list[list[int]], decode_steps: int):
    out.mkdir(parents=True)
    info = tc.write_checkpoint(out, model.spec, model.weights, plan, model.fingerprint)
    ck = tm.read_checkpoint(out)
    assert ck.spec == model.spec and ck.plan.digest() == plan.digest() and ck.fingerprint == model.fingerprint
    for role, t in ck.weights.items():
        assert torch.equal(t, model.weights[role]), role
    report = compare_engines(TorchEngine(model.spec, _aligned(model.weights)), TorchEngine(ck.spec, _aligned(ck.weights)),
                             SkipPolicy(plan), prompts, decode_steps, atol=TOL)
    assert report.passed and report.max_logit_diff <= TOL and report.token_agreement == 1.0
    return ck, info


def _check_layout(ck: tm.TrtllmCheckpoint, out: Path, plan: SkipPlan) -> None:
    """Skipped sublayers have no tensors; everything else is there under TensorRT-LLM's names."""
    from safetensors import safe_open

    config = json.loads((out / tc.CONFIG).read_text())
    tc.validate_config(config)
    with safe_open(str(out / tc.rank_file(0)), "pt") as f:
        names = set(f.keys())
    roles = SkipPolicy(plan).layout.roles
    for i in range(ck.spec.num_layers):
        p = f"transformer.layers.{i}"
        attn = {f"{p}.input_layernorm.weight", f"{p}.attention.qkv.weight", f"{p}.attention.dense.weight"}
        ffn = {f"{p}.post_layernorm.weight", f"{p}.mlp.fc.weight", f"{p}.mlp.gate.weight", f"{p}.mlp.proj.weight"}
        for j, group, kind in ((2 * i, attn, "attention"), (2 * i + 1, ffn, "ffn")):
            lc, entry = config["layer_configs"][i][kind], config["adaskip"]["layers"][i][kind]
            assert entry["scale"] == plan.scales[j] and entry["role"] == roles[j]
            if roles[j] == "never":
                assert not group & names and lc["impl"] == "no_op"
                assert not any(r.startswith(f"layers.{i}.") and r.split(".")[-1] in (
                    ("attn_norm", "q", "k", "v", "o") if kind == "attention" else ("ffn_norm", "gate", "up", "down"))
                    for r in ck.weights)
            else:
                assert group <= names and lc["impl"] in ("attention", "mlp")
    assert names == tc.checkpoint_names(ck.spec, config["layer_configs"])
    # DeciLayerConfig takes exactly these keys (a frozen kw_only dataclass rejects any other)
    for lc in config["layer_configs"]:
        assert set(lc) == {"attention", "ffn"} and set(lc["attention"]) == {"impl", "num_key_value_heads"}
        assert set(lc["ffn"]) == {"impl", "intermediate_size"}


# -- the real model, the stored K=8 plan ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2, smollm2_tokenizer, tmp_path_factory):
    plan = SkipPlan.load(DATA / "smollm2-k8-e2e-plan.json")
    plan.check_model(smollm2.fingerprint, 30)
    prompt = smollm2_tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"]
    out = tmp_path_factory.mktemp("trtllm") / "smollm2-k8"
    # a few decode steps: the online window (W=20) is exercised on the tiny models, where it is cheap
    ck, info = _round_trip(smollm2, plan, out, [prompt], decode_steps=3)
    return ck, info, out, plan


def test_smollm2_k8_checkpoint_round_trips_with_identical_logits(smollm2_checkpoint):
    ck, info, out, plan = smollm2_checkpoint
    _check_layout(ck, out, plan)
    config = ck.config
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "float32"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_size"], config["intermediate_size"],
            config["vocab_size"]) == (30, 576, 9, 3, 64, 1536, 49152)
    assert config["rotary_base"] == 100000.0 and config["rotary_scaling"] is None
    assert config["tie_word_embeddings"] is True and config["position_embedding_type"] == "rope_gpt_neox"
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert config["quantization"]["quant_algo"] is None
    # e2e: the 8 offline sublayers are no_op (no weights); the online policy covers every other FFN
    never = sorted(j for i, layer in enumerate(config["adaskip"]["layers"]) for j, k in ((2 * i, "attention"),
                   (2 * i + 1, "ffn")) if layer[k]["role"] == "never")
    assert never == sorted(plan.skip)
    online = config["adaskip"]["online"]
    assert online == {"enabled": True, "window": 20, "beta": plan.beta,
                      "ffn_sublayers": [j for j in range(1, 60, 2) if j not in plan.skip]}
    assert info["conditionals"] == len(online["ffn_sublayers"]) and info["engine_io"]
    assert set(config["adaskip"]["engine_io"]["inputs"]) == {"adaskip_skip", "adaskip_scale"}
    assert info["no_op"]["attention"] == sorted(j // 2 for j in plan.skip if j % 2 == 0)
    # lm_head is the (tied) embedding, written explicitly
    assert "lm_head" not in ck.weights


# -- tiny random Llama variants, every mode, and a baseline ---------------------------------------------------------

def _calibration(n: int, seed: int) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(similarity=torch.rand(n, generator=g).tolist(),
                       norm_ratio=(0.8 + 0.6 * torch.rand(n, generator=g)).tolist(),
                       num_prompts=1, prompt_tokens=16, data_digest="sha256:test", source="synthetic")


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "llama-linear-rope", "llama-untied-mha"])
def test_tiny_llamas_round_trip_in_every_mode(kind, tiny_root, tmp_path):
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    torch.manual_seed(0)
    prompts = torch.randint(0, 320, (2, 12)).tolist()
    calib = _calibration(model.spec.num_sublayers, seed=3)
    for mode in ("e2e", "decode", "prefill"):
        plan = adaskip_plan(calib, 3, mode, model.fingerprint, window=3)
        ck, info = _round_trip(model, plan, tmp_path / mode, prompts, decode_steps=6)
        _check_layout(ck, tmp_path / mode, plan)
        roles = SkipPolicy(plan).layout.roles
        assert info["conditionals"] == roles.count("dynamic")
        assert info["engine_io"] == (mode != "prefill")  # prefill mode: a static plan, a plain engine
    config = ck.config
    rs = config["rotary_scaling"]
    if kind == "llama3-rope":
        assert rs == {"type": "llama3", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    elif kind == "llama-linear-rope":
        assert rs == {"type": "linear", "rope_type": "linear", "factor": 2.0}
    else:
        assert rs is None
    assert config["tie_word_embeddings"] == model.spec.tie_word_embeddings
    assert ("lm_head" in ck.weights) == (not model.spec.tie_word_embeddings)


def test_gate_and_up_follow_tensorrt_llm_naming_and_qkv_is_concatenated(tiny_root, tmp_path):
    from safetensors.torch import load_file

    model = load_model(str(make_tiny_hf("llama-untied-mha", tiny_root)))
    plan = baseline_plan("early-exit", 4, 0, "e2e", model.fingerprint)
    tc.write_checkpoint(tmp_path, model.spec, model.weights, plan, model.fingerprint)
    t = load_file(str(tmp_path / tc.rank_file(0)))
    w = model.weights
    assert torch.equal(t["transformer.layers.1.mlp.fc.weight"], w["layers.1.gate"])  # HF gate_proj: activated
    assert torch.equal(t["transformer.layers.1.mlp.gate.weight"], w["layers.1.up"])  # HF up_proj
    assert torch.equal(t["transformer.layers.1.mlp.proj.weight"], w["layers.1.down"])
    assert torch.equal(t["transformer.layers.2.attention.qkv.weight"],
                       torch.cat([w["layers.2.q"], w["layers.2.k"], w["layers.2.v"]]))
    assert torch.equal(t["lm_head.weight"], w["lm_head"]) and torch.equal(t["transformer.ln_f.weight"],
                                                                           w["final_norm"])


def test_baseline_plan_is_deci_no_op_with_unit_scales(tiny_root, tmp_path):
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    plan = baseline_plan("early-exit", 4, 1, "e2e", model.fingerprint)
    torch.manual_seed(0)
    ck, info = _round_trip(model, plan, tmp_path / "ee", torch.randint(0, 320, (1, 10)).tolist(), 4)
    last = ck.config["layer_configs"][3]
    assert last == {"attention": {"impl": "no_op", "num_key_value_heads": None},
                    "ffn": {"impl": "no_op", "intermediate_size": None}}
    assert ck.config["adaskip"]["layers"][3]["attention"]["scale"] == 1.0
    assert not info["engine_io"] and info["conditionals"] == 0  # whole-layer removal: a static engine


# -- damaged checkpoints and unsupported models --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-trtllm")
    model = load_model(str(make_tiny_hf("llama", root / "models")))
    plan = adaskip_plan(_calibration(8, seed=5), 2, "e2e", model.fingerprint, window=3)
    out = root / "ck"
    out.mkdir()
    tc.write_checkpoint(out, model.spec, model.weights, plan, model.fingerprint)
    return out


def _tampered(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / tc.CONFIG).read_text())
    edit(config)
    (dst / tc.CONFIG).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(architecture="GPT2LMHeadModel"), "architecture"),
    (lambda c: c["layer_configs"][0]["attention"].update(impl="linear"), "layer_configs/0/attention/impl"),
    (lambda c: c["layer_configs"][0]["attention"].update(window=4), "Additional properties are not allowed"),
    (lambda c: c["layer_configs"].pop(), "3 entries for 4 layers"),
    (lambda c: c["adaskip"]["layers"][1]["ffn"].update(scale=2.0), "not what the plan implies"),
    (lambda c: c["adaskip"]["plan"]["scales"].__setitem__(0, 9.0), "digest"),
    (lambda c: c.update(hidden_size=96), "disagree"),
    (lambda c: c["mapping"].update(tp_size=2), "world_size 1 is not tp_size 2"),
    (lambda c: c["mapping"].update(tp_size=0), "mapping/tp_size"),
    (lambda c: c["mapping"].update(tp_size=2, world_size=2), "adaskip.parallel is not what the mapping implies"),
    (lambda c: c.pop("adaskip"), "'adaskip' is a required property"),
])
def test_damaged_configs_are_refused_clearly(tiny_checkpoint, tmp_path, edit, message):
    bad = _tampered(tiny_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(EngineDirError, match=message):
        tm.read_checkpoint(bad)


def test_missing_or_extra_tensors_are_refused(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    for name, change in (("missing", lambda t: t.pop("transformer.layers.0.mlp.fc.weight", None)),
                         ("extra", lambda t: t.update({"transformer.layers.9.mlp.fc.weight": torch.zeros(1)}))):
        d = tmp_path / name
        shutil.copytree(tiny_checkpoint, d)
        tensors = load_file(str(d / tc.rank_file(0)))
        change(tensors)
        save_file(tensors, str(d / tc.rank_file(0)))
        with pytest.raises(EngineDirError, match="rank0.safetensors does not match config.json's layer_configs and mapping"):
            tm.read_checkpoint(d)
    with pytest.raises(EngineDirError, match="no config.json"):
        tm.read_checkpoint(tmp_path)


def test_non_llama_families_are_refused(tiny_root):
    for kind, message in (("qwen2", "'qwen2' model is not supported"), ("mistral", "sliding-window")):
        model = load_model(str(make_tiny_hf(kind, tiny_root)))
        with pytest.raises(InputError, match=message):
            tc.check_supported(model.spec, model.weights)


# -- adaskip-build --backend trtllm-checkpoint ----------------------------------------------------------------------

def test_cli_writes_an_engine_dir_that_is_a_trtllm_checkpoint(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["--model", str(tiny_chat_model), "--backend", "trtllm-checkpoint", "-o", str(out)]
    assert build_cli.main(args + ["--skip", "2"] + QUICK) == 0
    stdout = capsys.readouterr().out
    assert f"--model_cls_file {out}/{tc.MODEL_CLS_FILE} --model_cls_name {tc.MODEL_CLS_NAME}" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "trtllm-checkpoint"
    assert {tc.CONFIG, tc.rank_file(0), tc.MODEL_CLS_FILE, "plan.json"} <= set(manifest["files"])
    assert manifest["build"]["trtllm"]["model_cls_name"] == tc.MODEL_CLS_NAME
    assert (out / tc.MODEL_CLS_FILE).read_bytes() == tc.model_cls_source().read_bytes()
    ck = tm.read_checkpoint(out)
    assert ck.plan.digest() == SkipPlan.load(out / "plan.json").digest() == manifest["plan"]["digest"]
    assert not any(".partial-" in p.name for p in tmp_path.iterdir())
    # an existing output is never overwritten without --force
    assert build_cli.main(args + ["-q", "--plan", str(out / "plan.json")]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    # it is a checkpoint for trtllm-build, not something adaskip runs or serves: both say so before doing anything
    from adaskip.deploy.triton_repo import TritonModelOptions, write_model_repository
    from adaskip.errors import EngineDirError, InputError
    from adaskip.runtime.loader import load_runtime

    with pytest.raises(EngineDirError, match="trtllm-build"):
        load_runtime(out)
    with pytest.raises(InputError, match="cannot be served"):
        write_model_repository(out, tmp_path / "repo", TritonModelOptions())
    assert not (tmp_path / "repo").exists()


def test_cli_refuses_a_sliding_window_model_before_writing_anything(tiny_root, smollm2_dir, tmp_path, capsys):
    src = make_tiny_hf("mistral", tiny_root)
    model_dir = tmp_path / "mistral"
    shutil.copytree(src, model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # only so that the build reaches the backend check
        shutil.copy(smollm2_dir / f, model_dir / f)
    out = tmp_path / "out"
    rc = build_cli.main(["--model", str(model_dir), "--skip", "1", "--backend", "trtllm-checkpoint", "-o", str(out)]
                        + QUICK)
    assert rc == 2 and "does not support sliding-window attention" in capsys.readouterr().err
    assert not out.exists() and not any(".partial-" in p.name for p in tmp_path.iterdir())


# -- the model class file for trtllm-build ------------------------------------------------------------------------

# Every TensorRT-LLM name the model class uses, each checked in NVIDIA/TensorRT-LLM's source (tensorrt_llm/
# functional.py: Conditional, _create_tensor, constant, slice/index_select, cast, expand, shape, concat, sum and the
# Tensor methods view/max; where; allreduce(tensor, group) as in docs/source/architecture/core-concepts.md;
# layers/embedding.py @0f02b7af: Embedding(num_embeddings, embedding_dim, dtype, tp_size, tp_group, sharding_dim,
# tp_rank); models/nemotron_nas/{config,model}.py; models/modeling_utils.py; _common.py).
# A new name must be checked there before it is added here.
VERIFIED = {
    "tensorrt_llm._common": {"default_net", "default_trtnet"},
    "tensorrt_llm.layers.embedding": {"Embedding"},
    "tensorrt_llm.models.modeling_utils": {"PretrainedConfig"},
    "tensorrt_llm.models.nemotron_nas.config": {"DeciConfig"},
    "tensorrt_llm.models.nemotron_nas.model": {"DeciLMDecoderLayer", "DeciLMDecoderLayerList", "DeciLMForCausalLM",
                                               "DeciLMLayerOutput"},
}
VERIFIED_FUNCTIONAL = {"Conditional", "Tensor", "_create_tensor", "allreduce", "cast", "concat", "constant", "expand",
                       "index_select", "max", "shape", "view", "where"}


def test_model_class_file_parses_and_uses_only_verified_tensorrt_llm_names():
    source = tc.model_cls_source().read_text()
    tree = ast.parse(source)
    imported: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tensorrt_llm"):
            imported.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                assert a.name in ("tensorrt", "tensorrt_llm.functional", "os", "numpy"), a.name
    assert imported == VERIFIED
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "F"}
    assert used <= VERIFIED_FUNCTIONAL, used - VERIFIED_FUNCTIONAL
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert tc.MODEL_CLS_NAME in classes
    # trtllm-build loads the file standalone: adaskip is only tried lazily, inside a function
    top_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(getattr(n, "module", "") and n.module.startswith("adaskip") for n in top_imports)
    plugin = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Tuple) and "PLUGIN_NAME" in [e.id for e in t.elts if isinstance(e, ast.Name)]
        for t in n.targets)]
    assert ast.literal_eval(plugin[0].value) == ("IOSimilarity", "1", "")


# -- the model class's skip logic, executed on CPU against a stand-in of the TensorRT-LLM API ---------------------

class _T(torch.Tensor):
    """A torch tensor that also answers `.trt_tensor`, standing in for tensorrt_llm.functional.Tensor."""

    @property
    def trt_tensor(self):
        return self


def _fake_tensorrt_llm(monkeypatch) -> dict:
    """Eager stand-ins with the semantics of the TensorRT-LLM calls the model class makes (functional ops on
    torch, Conditional picking the branch its condition selects, the plugin computing adaskip's similarity rule).
    This checks the class's own logic, not TensorRT-LLM: that is what a GPU run with TensorRT-LLM would add."""
    import types

    import numpy as np

    from adaskip.similarity import io_similarity

    log = {"conditionals": [], "plugins": 0, "outputs": {}}
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    class Conditional:
        def __init__(self, condition):
            self.value = bool(condition.reshape(()).item())
            log["conditionals"].append(self.value)

        def add_input(self, x):
            return x

        def add_output(self, true_value, false_value):
            return true_value if self.value else false_value

    def concat(items, dim=0):
        if all(isinstance(i, int) for i in items):
            return list(items)
        return torch.cat(items, dim=dim).as_subclass(_T)

    class Layer:
        def __init__(self, inputs):
            x, y, valid = inputs
            s, r = io_similarity(x, y, valid.bool())
            self.out = [s[:, None].as_subclass(_T), r[:, None].as_subclass(_T)]

        def get_output(self, i):
            return self.out[i]

    def add_plugin_v3(inputs, shape_inputs, plugin):
        log["plugins"] += 1
        return Layer(inputs)

    F = types.ModuleType("tensorrt_llm.functional")
    F.Tensor, F.Conditional, F.concat = _T, Conditional, concat
    F.cast = lambda x, dt: x.to(dtypes.get(dt, dt)).as_subclass(_T)
    F.constant = lambda a: torch.from_numpy(np.ascontiguousarray(a)).as_subclass(_T)
    F.expand = lambda t, shape: t.expand(*shape).as_subclass(_T)
    F.shape = lambda t, dim: int(t.shape[dim])
    F.view = lambda t, shape: t.reshape(shape).as_subclass(_T)
    F.index_select = lambda t, dim, idx: torch.index_select(t, dim, idx.long()).as_subclass(_T)
    F.max = lambda t, dim: t.max(dim=dim).values.reshape(1).as_subclass(_T)
    F.where = lambda c, a, b: torch.where(c, a, b).as_subclass(_T)
    F._create_tensor = lambda out, layer: out

    def allreduce(tensor, group):  # tests of the tensor-parallel path replace it with a real collective
        raise AssertionError(f"allreduce over {group} without a tensor-parallel group in this stand-in")

    F.allreduce = allreduce
    net = types.SimpleNamespace(add_plugin_v3=add_plugin_v3)
    common = types.ModuleType("tensorrt_llm._common")
    common.default_trtnet, common.default_net = (lambda: net), (lambda: None)
    creator = types.SimpleNamespace(create_plugin=lambda name, fields, phase: ("plugin", name))
    trt = types.ModuleType("tensorrt")
    trt.get_plugin_registry = lambda: types.SimpleNamespace(get_creator=lambda *a: creator)
    trt.PluginFieldCollection = list
    trt.TensorRTPhase = types.SimpleNamespace(BUILD="build")
    trt.bool, trt.float32 = "bool", "float32"

    class DeciLMDecoderLayer:
        def __init__(self, config, layer_idx):
            self.config = config

    class LayerOutput:
        def __init__(self, hidden_states, present_kv=None):
            self.hidden_states, self.present_kv = hidden_states, present_kv

    nas_model = types.ModuleType("tensorrt_llm.models.nemotron_nas.model")
    nas_model.DeciLMDecoderLayer, nas_model.DeciLMLayerOutput = DeciLMDecoderLayer, LayerOutput
    nas_model.DeciLMDecoderLayerList = nas_model.DeciLMForCausalLM = type("Unused", (), {})
    nas_config = types.ModuleType("tensorrt_llm.models.nemotron_nas.config")
    nas_config.DeciConfig = type("DeciConfig", (), {})
    modeling = types.ModuleType("tensorrt_llm.models.modeling_utils")
    modeling.PretrainedConfig = type("PretrainedConfig", (), {})
    embedding = types.ModuleType("tensorrt_llm.layers.embedding")
    embedding.Embedding = type("Embedding", (), {})
    package = types.ModuleType("tensorrt_llm")
    package.functional = F
    for name, mod in (("tensorrt", trt), ("tensorrt_llm", package), ("tensorrt_llm.functional", F),
                      ("tensorrt_llm._common", common), ("tensorrt_llm.models", types.ModuleType("m")),
                      ("tensorrt_llm.models.modeling_utils", modeling),
                      ("tensorrt_llm.models.nemotron_nas", types.ModuleType("n")),
                      ("tensorrt_llm.models.nemotron_nas.config", nas_config),
                      ("tensorrt_llm.models.nemotron_nas.model", nas_model),
                      ("tensorrt_llm.layers", types.ModuleType("l")), ("tensorrt_llm.layers.embedding", embedding)):
        monkeypatch.setitem(sys.modules, name, mod)
    return log


def load_model_class(monkeypatch):
    """The model class file executed against the stand-ins: (its module, the stand-ins' log)."""
    import importlib.util

    log = _fake_tensorrt_llm(monkeypatch)
    spec = importlib.util.spec_from_file_location("adaskip_trtllm_model_under_test", tc.model_cls_source())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, log


def test_model_class_skip_logic_matches_the_adaskip_rule(monkeypatch, tiny_checkpoint):
    import types

    from adaskip.similarity import io_similarity

    mod, log = load_model_class(monkeypatch)

    config = json.loads((tiny_checkpoint / tc.CONFIG).read_text())
    cfg = types.SimpleNamespace(adaskip=config["adaskip"], hidden_size=config["hidden_size"])
    n, d, tokens = 2 * config["num_hidden_layers"], config["hidden_size"], 5
    torch.manual_seed(0)
    h = torch.randn(tokens, d).as_subclass(_T)
    w = torch.randn(d, d) * 0.3

    def block(x):
        return (x @ w).as_subclass(_T), None

    roles = {e["role"]: e for layer in config["adaskip"]["layers"] for e in layer.values()}
    assert set(roles) == {"never", "always", "dynamic"}  # the tiny e2e plan has all three
    skip = torch.zeros(tokens, n, dtype=torch.bool)
    scale = torch.full((tokens, n), 1.0)
    dyn = roles["dynamic"]
    j = dyn["sublayer"]
    skip[[0, 3], j] = True  # two requests skip j (online), three run it
    scale[:, j] = torch.linspace(0.5, 1.5, tokens)

    layer = mod.AdaSkipDecoderLayer(cfg, 0)
    layer.adaskip_io = mod._AdaSkipIO(skip.as_subclass(_T), scale.as_subclass(_T), n)
    full = h + block(h)[0]
    expected = torch.where(skip[:, j, None], h * scale[:, j, None], full)
    out, _ = layer._sublayer(h, dyn, block)
    assert torch.equal(out, expected) and log["conditionals"] == [False] and log["plugins"] == 1
    s, r = io_similarity(h[:, None], full[:, None], torch.ones(tokens, 1, dtype=torch.bool))
    sims = layer.adaskip_io.sims[j][:, 0]
    assert torch.isnan(sims[[0, 3]]).all() and torch.allclose(sims[[1, 2, 4]], s[[1, 2, 4]])
    assert torch.allclose(layer.adaskip_io.ratios[j][[1, 2, 4], 0], r[[1, 2, 4]])

    skip[:, j] = True  # every token skips j: the conditional's cheap branch
    layer.adaskip_io = mod._AdaSkipIO(skip.as_subclass(_T), scale.as_subclass(_T), n)
    out, _ = layer._sublayer(h, dyn, block)
    assert torch.equal(out, h * scale[:, j, None]) and log["conditionals"][-1] is True
    assert torch.isnan(layer.adaskip_io.sims[j]).all()

    never, always = roles["never"], roles["always"]
    out, _ = layer._sublayer(h, never, block)  # baked scale from the config, no weights read
    assert torch.equal(out, h * never["scale"]) and torch.isnan(layer.adaskip_io.sims[never["sublayer"]]).all()
    out, _ = layer._sublayer(h, always, block)
    assert torch.equal(out, full) and len(log["conditionals"]) == 2  # static sublayers need no conditional
