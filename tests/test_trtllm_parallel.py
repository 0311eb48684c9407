"""Tensor- and pipeline-parallel TensorRT-LLM checkpoints (--tp-size / --pp-size).

What is checked, since TensorRT-LLM cannot run here:
  * every rank file's names, shapes and dtypes against TensorRT-LLM's own converter rules, written out below from its
    source (NVIDIA/TensorRT-LLM: models/nemotron_nas/convert.py @2a9abd95 load_model_weights, models/llama/convert.py
    @0afa06ab, models/convert_utils.py @03961722 split/dup_kv_weight, mapping.py @05ebebb2 pp_layers; the
    DeciLM model's parameter shapes in models/nemotron_nas/model.py @03dd9bb8: ceil(kv / tp) KV heads per rank,
    lm_head padded to a multiple of tp) independently of adaskip's implementation;
  * round trip: ranks merged back -> the reference engine -> the same logits as the unsplit model under the same
    plan, prefill and decode with online learning, for every mapping that divides;
  * the model class's decision consistency, run on stand-ins of TensorRT-LLM with real threads as ranks and a real
    barrier as the all-reduce.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_hf
from test_trtllm_checkpoint import _T, QUICK, TOL, _aligned, _calibration, load_model_class
from test_trtllm_checkpoint import tiny_checkpoint  # noqa: F401  (the same tiny checkpoint fixture)

from adaskip.builder.options import EngineOptions
from adaskip.cli import build as build_cli
from adaskip.errors import EngineDirError, InputError
from adaskip.eval.verify import compare_engines
from adaskip.export.trtllm import checkpoint as tc
from adaskip.export.trtllm import merge as tm
from adaskip.export.trtllm.parallel import TrtllmOptions, merge_ranks, rank_tensors, valid_tp_sizes
from adaskip.model import load_model
from adaskip.plan import SkipPlan, adaskip_plan
from adaskip.policy import SkipPolicy
from adaskip.runtime.torch_engine import TorchEngine

DATA = Path(__file__).parent / "data"


# -- what TensorRT-LLM's converter writes, from its source (not from adaskip's parallel.py) -----------------------

def trtllm_rank_layout(config: dict, rank: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of rank{rank}.safetensors as TensorRT-LLM's NAS/Llama converters write it."""
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    pp_rank = rank // tp
    layers = torch.tensor_split(torch.arange(config["num_hidden_layers"]), pp)[pp_rank].tolist()
    d, hd, f, v = config["hidden_size"], config["head_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    dt = config["dtype"]
    out = {}
    if pp_rank == 0:
        shape = (v, d)
        if config["use_parallel_embedding"]:
            shape = (v // tp, d) if config["embedding_sharding_dim"] == 0 else (v, d // tp)
        out["transformer.vocab_embedding.weight"] = (shape, dt)
    if pp_rank == pp - 1:
        out["lm_head.weight"] = ((-(-v // tp) * tp // tp, d), dt)  # pad_vocab_size, then split
        out["transformer.ln_f.weight"] = ((d,), dt)
    for local, i in enumerate(layers):
        lc, p = config["layer_configs"][i], f"transformer.layers.{local}"
        if lc["attention"]["impl"] == "attention":
            kv_rank = -(-lc["attention"]["num_key_value_heads"] // tp)  # DeciLM: ceil(kv / tp) heads per rank
            out[f"{p}.input_layernorm.weight"] = ((d,), dt)
            out[f"{p}.attention.qkv.weight"] = (((heads // tp + 2 * kv_rank) * hd, d), dt)
            out[f"{p}.attention.dense.weight"] = ((d, heads // tp * hd), dt)
        if lc["ffn"]["impl"] == "mlp":
            out[f"{p}.post_layernorm.weight"] = ((d,), dt)
            for name in ("fc", "gate"):
                out[f"{p}.mlp.{name}.weight"] = ((f // tp, d), dt)
            out[f"{p}.mlp.proj.weight"] = ((d, f // tp), dt)
    return out


def _check_rank_files(out: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((out / tc.CONFIG).read_text())
    world = config["mapping"]["world_size"]
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == sorted(f"rank{r}.safetensors" for r in range(world))
    for r in range(world):
        with safe_open(str(out / f"rank{r}.safetensors"), "pt") as f:
            got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        dtypes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
        expected = {k: (s, dtypes[dt]) for k, (s, dt) in trtllm_rank_layout(config, r).items()}
        assert got == expected, f"rank {r}"
    return config


def _round_trip(model, plan: SkipPlan, out: Path, opts: TrtllmOptions, prompts, decode_steps: int):
    out.mkdir(parents=True)
    tc.write_checkpoint(out, model.spec, model.weights, plan, model.fingerprint, opts)
    config = _check_rank_files(out)
    assert config["mapping"] == {"world_size": opts.world_size, "tp_size": opts.tp_size, "pp_size": opts.pp_size}
    ck = tm.read_checkpoint(out)
    assert ck.options == opts and ck.spec == model.spec and ck.plan.digest() == plan.digest()
    for role, t in ck.weights.items():
        assert torch.equal(t, model.weights[role]), role
    report = compare_engines(TorchEngine(model.spec, _aligned(model.weights)),
                             TorchEngine(ck.spec, _aligned(ck.weights)), SkipPolicy(plan), prompts, decode_steps,
                             atol=TOL)
    assert report.passed and report.max_logit_diff <= TOL and report.token_agreement == 1.0
    return report


# -- SmolLM2: 9 query heads, 3 KV heads, FFN 1536, 30 layers, vocab 49152 -----------------------------------------

@pytest.fixture(scope="module")
def smollm2_plan(smollm2):
    """The stored K=8 e2e plan with a 3-step online window and a lower threshold (0.97 instead of 0.989), so that a
    short decode reaches online learning and FFNs join it: the round trip then covers online-skipped sublayers."""
    plan = SkipPlan.load(DATA / "smollm2-k8-e2e-plan.json")
    return dataclasses.replace(plan, window=3, beta=0.97)


def test_smollm2_tensor_parallel_sizes_that_divide_and_clear_refusals(smollm2):
    spec = smollm2.spec
    assert valid_tp_sizes(spec) == [1, 3]  # 9 heads -> 1, 3, 9; tp 9 fails the FFN (1536 = 2^9 * 3)
    with pytest.raises(InputError, match=r"--tp-size 2 does not divide this model: 9 query heads; 3 KV heads .*"
                                         r"\(tensor-parallel sizes that do: 1, 3\)"):
        TrtllmOptions(tp_size=2).validate(spec)
    with pytest.raises(InputError, match="--tp-size 9 does not divide this model: FFN width 1536"):
        TrtllmOptions(tp_size=9).validate(spec)
    with pytest.raises(InputError, match="--pp-size 31 exceeds the model's 30 layers"):
        TrtllmOptions(pp_size=31).validate(spec)
    with pytest.raises(InputError, match="hidden size 577"):
        TrtllmOptions(tp_size=3, parallel_embedding="hidden").validate(dataclasses.replace(spec, hidden_size=577))
    for bad, message in (({"tp_size": 0}, "--tp-size must be a positive integer"),
                         ({"pp_size": -1}, "--pp-size must be a positive integer"),
                         ({"tp_size": True}, "--tp-size must be a positive integer"),
                         ({"parallel_embedding": "vocab"}, "needs --tp-size > 1"),
                         ({"tp_size": 3, "parallel_embedding": "rows"}, "--parallel-embedding must be one of")):
        with pytest.raises(InputError, match=message):
            TrtllmOptions(**bad).validate(spec)
    with pytest.raises(InputError, match="--tp-size: TensorRT-LLM checkpoint options, for --backend trtllm-"):
        EngineOptions(backend="ort", trtllm=TrtllmOptions(tp_size=3)).validate()


def test_smollm2_every_mapping_that_divides_merges_back_bit_identical(smollm2, smollm2_plan):
    """tp in {1, 3} x pp in 1..30 (TensorRT-LLM splits layers unevenly when pp does not divide 30): every rank's
    names and shapes as TensorRT-LLM's converter writes them (meta tensors); for every pp that divides the 30 layers
    evenly, plus two uneven ones, the merge gives back every tensor bit for bit (so the reference engine computes
    the same logits; the file round trips below run it)."""
    spec = smollm2.spec
    config = tc.build_config(spec, smollm2_plan, smollm2.fingerprint, "float32")
    full = tc.checkpoint_weights(spec, smollm2.weights, config["layer_configs"])
    meta = {k: torch.empty(t.shape, device="meta") for k, t in full.items()}
    names = set(full)
    for tp in (1, 3):
        for pp in range(1, spec.num_layers + 1):
            opts = TrtllmOptions(tp_size=tp, pp_size=pp)
            cfg = {**config, **opts.config_fields()}
            for rank in opts.ranks(spec.num_layers):
                got = {k: (tuple(t.shape), "float32") for k, t in rank_tensors(meta, spec, opts, rank).items()}
                assert got == trtllm_rank_layout(cfg, rank.rank), (tp, pp, rank.rank)
            if pp not in (1, 2, 3, 4, 5, 6, 7, 10, 15, 30):
                continue
            files = {rank.rank: rank_tensors(full, spec, opts, rank) for rank in opts.ranks(spec.num_layers)}
            merged = merge_ranks(lambda r: files[r.rank], names, spec, opts, f"tp{tp}pp{pp}")
            assert all(torch.equal(merged[k], full[k]) for k in names), (tp, pp)


@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2), (3, 2)])
def test_smollm2_rank_files_round_trip_with_identical_logits(smollm2, smollm2_tokenizer, smollm2_plan, tmp_path,
                                                             tp, pp):
    prompt = smollm2_tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"]
    report = _round_trip(smollm2, smollm2_plan, tmp_path / "ck", TrtllmOptions(tp, pp), [prompt], decode_steps=5)
    assert report.max_logit_diff == 0.0  # the merged weights are the source's, bit for bit
    assert report.steps == 6 and report.details[0]["online_ffns"]  # the window (W=3) closed and FFNs joined


# -- tiny models: GQA, MQA with KV heads replicated, vocabulary padding, parallel embeddings -----------------------

def _tiny_mqa(root: Path) -> Path:
    """4 query heads, 1 KV head (replicated on every tp rank), vocabulary 322 (padded to a multiple of 4)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = root / "tiny-mqa"
    if not (out / "config.json").exists():
        torch.manual_seed(2)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=1, vocab_size=322, max_position_embeddings=256, rms_norm_eps=1e-5,
                          tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["llama", "mqa"])
def test_tiny_models_round_trip_for_every_mapping_that_divides(kind, tiny_root, tmp_path):
    model = load_model(str(make_tiny_hf("llama", tiny_root) if kind == "llama" else _tiny_mqa(tiny_root)))
    spec = model.spec
    assert valid_tp_sizes(spec, limit=8) == [1, 2, 4]
    torch.manual_seed(0)
    prompts = torch.randint(0, 320, (2, 10)).tolist()
    plan = adaskip_plan(_calibration(spec.num_sublayers, seed=3), 2, "e2e", model.fingerprint, window=3)
    learned = False
    for tp in (1, 2, 4):
        for pp in range(1, spec.num_layers + 1):
            for embedding in (None, "vocab", "hidden") if tp > 1 and pp == 2 else (None,):
                if embedding == "vocab" and spec.vocab_size % tp:
                    with pytest.raises(InputError, match=f"vocabulary {spec.vocab_size}"):
                        TrtllmOptions(tp, pp, embedding).validate(spec)
                    continue
                report = _round_trip(model, plan, tmp_path / f"tp{tp}-pp{pp}-{embedding}",
                                     TrtllmOptions(tp, pp, embedding), prompts, decode_steps=6)
                assert report.max_logit_diff == 0.0
                learned |= any(d["online_ffns"] for d in report.details)
    assert learned  # online learning ran in the compared decodes


def test_damaged_parallel_checkpoints_are_refused(tiny_root, tmp_path):
    from safetensors.torch import load_file, save_file

    model = load_model(str(_tiny_mqa(tiny_root)))
    plan = adaskip_plan(_calibration(model.spec.num_sublayers, seed=5), 2, "e2e", model.fingerprint, window=3)
    src = tmp_path / "src"
    src.mkdir()
    tc.write_checkpoint(src, model.spec, model.weights, plan, model.fingerprint, TrtllmOptions(4, 2))

    def damaged(name: str, rank: int, change) -> Path:
        import shutil

        d = tmp_path / name
        shutil.copytree(src, d)
        t = load_file(str(d / tc.rank_file(rank)))
        change(t)
        save_file(t, str(d / tc.rank_file(rank)))
        return d

    qkv = "transformer.layers.0.attention.qkv.weight"
    cases = [
        (damaged("kv-copy", 1, lambda t: t[qkv][-1].add_(1.0)), "copies of a replicated KV head differ"),
        (damaged("norm-copy", 2, lambda t: t["transformer.layers.0.input_layernorm.weight"].mul_(2.0)),
         "replicated across tensor-parallel ranks but rank 2's copy differs"),
        (damaged("padding", 7, lambda t: t["lm_head.weight"][-1].fill_(1.0)), "padding rows are not zero"),
        (damaged("shape", 3, lambda t: t.update({qkv: t[qkv][:-1]})), "has shape"),
        (damaged("dtype", 0, lambda t: t.update({qkv: t[qkv].half()})), "mix dtypes"),
        (damaged("stage", 4, lambda t: t.pop("transformer.ln_f.weight")), "rank4.safetensors does not match"),
    ]
    for path, message in cases:
        with pytest.raises(EngineDirError, match=message):
            tm.read_checkpoint(path)
    (tmp_path / "kv-copy" / tc.rank_file(7)).unlink()
    with pytest.raises(EngineDirError, match=r"needs rank0.safetensors, .*rank7.safetensors; found rank0"):
        tm.read_checkpoint(tmp_path / "kv-copy")
    with pytest.raises(InputError, match="--tp-size 3 does not divide this model: 4 query heads"):
        tc.write_checkpoint(tmp_path / "src", model.spec, model.weights, plan, model.fingerprint, TrtllmOptions(3))


# -- adaskip-build --tp-size / --pp-size ---------------------------------------------------------------------------

def test_cli_writes_every_rank_and_refuses_what_does_not_divide(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["--model", str(tiny_chat_model), "--backend", "trtllm-checkpoint", "-o", str(out), "--skip", "2"] + QUICK
    assert build_cli.main(args + ["--tp-size", "2", "--pp-size", "2"]) == 0
    assert "--workers 4" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f"rank{r}.safetensors" for r in range(4)} <= set(manifest["files"])
    assert manifest["build"]["trtllm"]["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert manifest["build"]["trtllm"]["options"] == {"tp_size": 2, "pp_size": 2, "parallel_embedding": None}
    assert tm.read_checkpoint(out).options == TrtllmOptions(2, 2)
    _check_rank_files(out)
    for extra, message in ((["--tp-size", "3"], "--tp-size 3 does not divide this model: 4 query heads"),
                           (["--pp-size", "5"], "--pp-size 5 exceeds the model's 4 layers"),
                           (["--tp-size", "0"], "--tp-size must be a positive integer")):
        bad = tmp_path / "bad"
        assert build_cli.main([a if a != str(out) else str(bad) for a in args] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not bad.exists()
    assert build_cli.main(["--model", str(tiny_chat_model), "-o", str(tmp_path / "ort"), "--skip", "1",
                           "--tp-size", "2"] + QUICK) == 2
    err = capsys.readouterr().err
    assert "--tp-size: TensorRT-LLM checkpoint options, for --backend trtllm-checkpoint only" in err


# -- the model class: every rank of a TP group takes the same branch ----------------------------------------------

class _Group:
    """Threads as the ranks of one tensor-parallel group; allreduce is a real collective: every rank must reach it
    (a barrier), and each rank sums the contributions in its own order (rank r starts with its own), as reductions
    on different GPUs may. An all-reduce inside a Conditional runs only on ranks that take that branch."""

    def __init__(self, size: int, timeout: float = 3.0):
        self.size, self.timeout = size, timeout
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: dict[int, torch.Tensor] = {}
        self.local = threading.local()
        self.calls: list[tuple[int, bool]] = []

    def allreduce(self, x, group):
        assert list(group) == list(range(self.size))
        r = self.local.rank
        branch = getattr(self.local, "branch", None)  # the innermost open Conditional: (predicate, in else?)
        if branch is not None and branch:  # this rank's predicate is true: the else branch does not execute
            self.calls.append((r, False))
            return x
        self.calls.append((r, True))
        self.slots[r] = x
        self.barrier.wait()
        order = [(r + k) % self.size for k in range(self.size)]
        total = self.slots[order[0]].clone()
        for o in order[1:]:
            total = total + self.slots[o]
        self.barrier.wait()
        return total.as_subclass(_T)

    def run(self, fn) -> list:
        results, errors = [None] * self.size, [None] * self.size

        def target(r):
            self.local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - reported to the test
                errors[r] = e

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 4)
        return results, errors


def _tp_stand_ins(monkeypatch, group: _Group):
    mod, log = load_model_class(monkeypatch)
    F = mod.F
    base = F.Conditional

    class Conditional(base):  # tells the collective which branch this rank's graph executes
        def __init__(self, condition):
            super().__init__(condition)
            group.local.branch = self.value

        def add_output(self, true_value, false_value):
            group.local.branch = None
            return super().add_output(true_value, false_value)

    monkeypatch.setattr(F, "Conditional", Conditional)
    monkeypatch.setattr(F, "allreduce", group.allreduce)
    return mod, log


def _dynamic_entry(config: dict) -> dict:
    return next(e for layer in config["adaskip"]["layers"] for e in layer.values() if e["role"] == "dynamic")


@pytest.mark.parametrize("tp", [2, 3])
def test_tp_ranks_decide_identically_even_when_their_inputs_disagree(monkeypatch, tiny_checkpoint, tp):
    import types

    config = json.loads((tiny_checkpoint / tc.CONFIG).read_text())
    cfg = types.SimpleNamespace(adaskip=config["adaskip"], hidden_size=config["hidden_size"])
    n, d, tokens = 2 * config["num_hidden_layers"], config["hidden_size"], 4
    entry = _dynamic_entry(config)
    j = entry["sublayer"]
    torch.manual_seed(0)
    h = torch.randn(tokens, d)
    w = torch.randn(d, d) * 0.3
    # each rank's runtime computed its own mask: rank 0 runs j for tokens 1..3, the others skip it for every token
    # (a similarity a hair above beta on one GPU and below it on another), and their scales differ in the last bit
    skips, scales = [], []
    for r in range(tp):
        s = torch.zeros(tokens, n, dtype=torch.bool)
        s[:, j] = True if r else torch.tensor([True, False, False, False])
        skips.append(s)
        scales.append(torch.full((tokens, n), 0.7) + r * 1e-7)

    def rank_forward(mod, group, broadcast: bool):
        def fn(r):
            layer = mod.AdaSkipDecoderLayer(cfg, 0)
            layer.adaskip_io = mod._AdaSkipIO(skips[r].as_subclass(_T), scales[r].as_subclass(_T), n, r,
                                              list(range(tp)) if broadcast else None)

            def block(x):  # a row-parallel sublayer: partial product, then the TP all-reduce (inside the branch)
                rows = torch.chunk(torch.arange(d), tp)[r]
                part = torch.Tensor(x)[:, rows] @ w[rows, :]
                return mod.F.allreduce(part.as_subclass(_T), list(range(tp))), None

            out, _ = layer._sublayer(h.clone().as_subclass(_T), entry, block)
            return out, layer.adaskip_io.skip, layer.adaskip_io.scale
        return group.run(fn)

    group = _Group(tp)
    mod, log = _tp_stand_ins(monkeypatch, group)
    results, errors = rank_forward(mod, group, broadcast=True)
    assert errors == [None] * tp
    for out, skip, scale in results:  # bit for bit rank 0's inputs on every rank, hence the same decisions
        assert torch.equal(skip, skips[0].float()) and torch.equal(scale, scales[0])
        # outputs agree up to the reduction order (each rank sums in its own): the reason a similarity computed on
        # each rank could land on either side of beta, and why the decision is not recomputed per rank
        assert torch.allclose(out, results[0][0], atol=1e-5)
    assert log["conditionals"] == [False] * tp  # every rank took the branch that runs j (rank 0's decision)
    ran = [c for c in group.calls if c[1]]
    assert len(ran) == 3 * tp  # the two broadcasts, then the branch's all-reduce, on every rank

    # without the broadcast the same inputs deadlock: rank 0 waits in the branch's all-reduce that no other rank
    # executes (TensorRT does not run an untaken branch); here the barrier times out instead of hanging forever
    group = _Group(tp, timeout=1.0)
    mod, log = _tp_stand_ins(monkeypatch, group)
    results, errors = rank_forward(mod, group, broadcast=False)
    assert isinstance(errors[0], threading.BrokenBarrierError)
    assert log["conditionals"][:tp].count(True) == tp - 1


def test_model_class_broadcasts_once_per_forward_outside_every_conditional():
    """The mechanism is present in the generated file: the decision inputs go through from_first_tp_rank in
    _AdaSkipIO, the model passes its TP rank and group, and the only F.allreduce is in from_first_tp_rank (never
    in a Conditional branch)."""
    import ast

    tree = ast.parse(tc.model_cls_source().read_text())
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    calls = lambda fn, name: [c for c in ast.walk(fn) if isinstance(c, ast.Call) and (  # noqa: E731
        getattr(c.func, "attr", None) == name or getattr(c.func, "id", None) == name)]
    assert len(calls(funcs["from_first_tp_rank"], "allreduce")) == 1
    assert sum(len(calls(f, "allreduce")) for f in funcs.values()) == 1
    io_init = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_AdaSkipIO").body[1]
    assert len(calls(io_init, "from_first_tp_rank")) == 2  # skip and scale
    model_forward = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                         and n.name == tc.MODEL_CLS_NAME).body
    forward = next(n for n in model_forward if isinstance(n, ast.FunctionDef) and n.name == "forward")
    io_call = calls(forward, "_AdaSkipIO")[0]
    assert [ast.unparse(a) for a in io_call.args[3:]] == ["mapping.tp_rank", "mapping.tp_group"]
    assert not calls(funcs["_dynamic"], "allreduce") and not calls(funcs["_dynamic"], "from_first_tp_rank")
    # the parallel embedding takes exactly the arguments TensorRT-LLM's Embedding has (layers/embedding.py @0f02b7af)
    emb = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "Embedding"]
    assert len(emb) == 1 and {k.arg for k in emb[0].keywords} == {"dtype", "tp_size", "tp_group", "sharding_dim",
                                                                  "tp_rank"}


def test_pipeline_stage_reports_only_its_own_layers(monkeypatch, tiny_checkpoint):
    import types

    mod, _ = load_model_class(monkeypatch)
    config = json.loads((tiny_checkpoint / tc.CONFIG).read_text())
    cfg = types.SimpleNamespace(adaskip=config["adaskip"], hidden_size=config["hidden_size"])
    n, d, tokens = 2 * config["num_hidden_layers"], config["hidden_size"], 3
    layer_idx = next(i for i, layer in enumerate(config["adaskip"]["layers"]) if layer["ffn"]["role"] == "dynamic")
    entry = config["adaskip"]["layers"][layer_idx]["ffn"]
    io = mod._AdaSkipIO(torch.zeros(tokens, n, dtype=torch.bool).as_subclass(_T),
                        torch.ones(tokens, n).as_subclass(_T), n)
    layer = mod.AdaSkipDecoderLayer(cfg, layer_idx)  # the only layer this stage owns
    layer.adaskip_io = io
    h = torch.randn(tokens, d).as_subclass(_T)
    layer._sublayer(h, entry, lambda x: ((x * 0.5).as_subclass(_T), None))
    sims, ratios = io.statistics()
    assert sims.shape == (tokens, n)
    own = entry["sublayer"]
    assert not torch.isnan(sims[:, own]).any() and not torch.isnan(ratios[:, own]).any()
    others = [c for c in range(n) if c != own]
    assert torch.isnan(sims[:, others]).all() and torch.isnan(ratios[:, others]).all()
    record = config["adaskip"]["parallel"]
    assert record["tp_size"] == record["pp_size"] == 1 and set(record["decisions"]) == {"tensor_parallel",
                                                                                         "pipeline_parallel"}


