"""The C++ runtime (cpp/runtime): configured and built with CMake from the root CMakeLists.txt into a temp dir, then
its ctest suites run against data this module prepares: the real SmolLM2 engine built from the K=8 e2e plan, the
tokens and skip statistics the Python runtime produces on it, Python SkipPolicy traces, plans Python accepts or
refuses, and broken engine dirs. The build runs in the background while the engine and the Python references are
made."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import long_text

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "tests" / "data" / "smollm2-k8-e2e-plan.json"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
LONG_NEW = 128


# -- the build ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def build(cpp_build):
    return cpp_build


@pytest.fixture(scope="module")
def engine(build, smollm2_k8_engine) -> Path:  # `build` first: the C++ build runs in the background meanwhile
    return smollm2_k8_engine


@pytest.fixture(scope="module")
def data(engine, tmp_path_factory) -> Path:
    """The files the ctest suites read ($ADASKIP_RUNTIME_TEST_DATA)."""
    d = tmp_path_factory.mktemp("cpp-data")
    (d / "policy_traces.json").write_text(json.dumps(_policy_traces()))
    (d / "plans.json").write_text(json.dumps(_plans()))
    (d / "generate.json").write_text(json.dumps(_generate_cases(engine)))
    (d / "open_errors.json").write_text(json.dumps(_open_errors(engine, d / "broken")))
    (d / "detokenize.json").write_text(json.dumps([_detokenize_cases(engine / "tokenizer")]))
    return d


def _detokenize_cases(tokenizer_dir: Path) -> dict:
    """Python's decode of: every 7th id alone (special ones decode to ""), random runs of ids (bytes of one character
    split across tokens), and real text re-tokenized, including multi-byte characters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    runs = [[i] for i in range(0, len(tok), 7)]
    runs += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))] for _ in range(300)]
    for text in ["Héllo wörld — naïve café: 東京 🚀 ", "  leading spaces\tand\ttabs\n\nnew lines", "x" * 40]:
        ids = tok.encode(text, add_special_tokens=False)
        runs += [ids] + [ids[i:i + 3] for i in range(len(ids))]
    return {"tokenizer": str(tokenizer_dir / "tokenizer.json"),
            "cases": [{"ids": ids, "text": tok.decode(ids, skip_special_tokens=True)} for ids in runs]}


def _ctest(build_dir: Path, data_dir: Path | None, suite: str) -> str:
    env = dict(ENV)
    if data_dir is not None:
        env["ADASKIP_RUNTIME_TEST_DATA"] = str(data_dir)
    run = subprocess.run(["ctest", "--test-dir", str(build_dir), "-R", f"^adaskip_runtime\\.{suite}$", "-V"],
                         capture_output=True, text=True, env=env, timeout=600)
    out = run.stdout + run.stderr
    print(out[-8000:])
    assert run.returncode == 0, out[-8000:]
    assert "100% tests passed, 0 tests failed out of 1" in out and "Skipped" not in out, out[-8000:]
    return out


# -- Python references -------------------------------------------------------------------------------------------------

def _nan_to_none(xs: list[float]) -> list[float | None]:
    return [None if math.isnan(x) else x for x in xs]


def _trace(name: str, plan, steps: int, seed: int) -> dict:
    """Drive the Python SkipPolicy over `steps` decode steps with synthetic stats shaped like real ones (each FFN
    near its own level around beta, NaN where skipped or not asked for) and record every decision."""
    from adaskip.policy import SkipPolicy

    policy, rng = SkipPolicy(plan), random.Random(seed)
    n = plan.num_sublayers
    level = [rng.uniform(0.975, 1.0) for _ in range(n)]
    state = policy.new_request()
    pre = policy.prefill_mask(state)
    record = {"prefill": {"skip": list(pre.skip), "scales": list(pre.scales)}, "cached_layers": policy.layout.cached_layers,
              "roles": policy.layout.roles, "learns_online": policy.learns_online, "decode": []}
    stats = []
    for _ in range(steps):
        mask, wants = policy.decode_mask(state), policy.wants_decode_stats(state)
        record["decode"].append({"skip": list(mask.skip), "scales": list(mask.scales), "wants_stats": wants})
        sim = [math.nan if (s or not wants) else level[j] + rng.uniform(-0.01, 0.01) for j, s in enumerate(mask.skip)]
        ratio = [math.nan if math.isnan(x) else rng.uniform(0.9, 1.3) for x in sim]
        stats.append({"similarity": _nan_to_none(sim), "norm_ratio": _nan_to_none(ratio)})
        policy.observe_decode(state, sim, ratio)
    record["online"] = {str(j): r for j, r in state.online.items()}
    record["window_means"] = {str(j): m for j, m in policy.window_means(state).items()}
    return {"name": name, "plan": plan.to_dict(), "steps": stats, "expect": record}


def _with(plan, **changes):
    from adaskip.plan import SkipPlan

    d = plan.to_dict()
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            d[section][field] = value
        else:
            d[section] = value
    return SkipPlan.from_dict(d)


def _policy_traces() -> list[dict]:
    from adaskip.plan import SkipPlan, adaskip_plan, baseline_plan

    k8 = SkipPlan.load(PLAN)
    fp, cal = k8.fingerprint, k8.calibration
    plans = [
        ("adaskip-k8-e2e", k8, 30),
        ("adaskip-k8-decode", _with(k8, mode="decode"), 30),
        ("adaskip-k8-prefill", _with(k8, mode="prefill", online__enabled=False), 8),
        ("adaskip-k8-e2e-no-online", _with(k8, online__enabled=False), 25),
        ("adaskip-k12-decode-w3", adaskip_plan(cal, 12, "decode", fp, window=3), 10),
        ("adaskip-k0-e2e", adaskip_plan(cal, 0, "e2e", fp), 24),
        ("early-exit-4-e2e", baseline_plan("early-exit", 30, 4, "e2e", fp, calibration=cal), 6),
        ("unified-5-decode", baseline_plan("unified", 30, 5, "decode", fp, calibration=cal), 6),
        ("skipdecode-6-decode", baseline_plan("skipdecode", 30, 6, "decode", fp, calibration=cal), 600),
        ("skipdecode-6-e2e", baseline_plan("skipdecode", 30, 6, "e2e", fp, calibration=cal), 600),
    ]
    traces = [_trace(name, plan, steps, seed) for seed, (name, plan, steps) in enumerate(plans)]
    assert traces[0]["expect"]["online"] and traces[4]["expect"]["online"], "the traces should exercise online FFNs"
    return traces


def _plans() -> list[dict]:
    """Plans as JSON text, each marked by whether the Python SkipPlan accepts it."""
    from adaskip.errors import PlanError
    from adaskip.plan import SkipPlan, baseline_plan

    good = json.loads(PLAN.read_text())
    # version 2: per-channel stand-ins for skipped offline sublayers (here sublayer 50, hidden size 576)
    compensation = {"rule": "channel-affine", "sublayers": {"50": {"scale": [1.01] * 576, "shift": [0.001] * 576}}}

    def mutate(path: str, value=None, delete: bool = False) -> dict:
        d = json.loads(json.dumps(good))
        *parents, last = path.split("/")
        target = d
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if delete:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
        return d

    mutations = {
        "format": mutate("format", "x"), "version": mutate("version", 3), "no-version": mutate("version", delete=True),
        "method": mutate("method", "magic"), "mode": mutate("mode", "fast"), "layers-0": mutate("num_layers", 0),
        "layers-string": mutate("num_layers", "30"), "no-budget": mutate("budget", delete=True),
        "unit": mutate("budget/unit", "blocks"), "k-negative": mutate("budget/k", -1), "k-mismatch": mutate("budget/k", 7),
        "skip-object": mutate("skip", {"a": 1}), "skip-negative": mutate("skip/0", -1), "skip-range": mutate("skip/0", 60),
        "skip-duplicate": mutate("skip/0", 52), "skip-float": mutate("skip/0", 1.5),
        "scales-short": mutate("scales", [1.0] * 59), "scales-string": mutate("scales/3", "big"),
        "scales-nan": mutate("scales/3", float("nan")), "no-online": mutate("online", delete=True),
        "enabled-string": mutate("online/enabled", "yes"), "window-0": mutate("online/window", 0),
        "beta-string": mutate("online/beta", "high"), "calibration-extra": mutate("calibration/extra", 1),
        "calibration-short": mutate("calibration/similarity", [0.5] * 3),
        "calibration-prompts-0": mutate("calibration/num_prompts", 0), "no-fingerprint": mutate("model/fingerprint",
                                                                                               delete=True),
        "no-tool": mutate("tool", delete=True), "selection-null": mutate("selection", None),
        "not-an-object": [good],
        "v1-with-compensation": {**good, "compensation": compensation},
        "compensation-outside-skip": {**good, "version": 2, "compensation": {**compensation, "sublayers": {
            "1": compensation["sublayers"]["50"]}}},
        "compensation-unequal": {**good, "version": 2, "compensation": {**compensation, "sublayers": {
            "50": {"scale": [1.0, 1.0], "shift": [0.0]}}}},
        "compensation-rule": {**good, "version": 2, "compensation": {**compensation, "rule": "magic"}},
        "compensation-key": {**good, "version": 2, "compensation": {**compensation, "sublayers": {
            "x": compensation["sublayers"]["50"]}}},
        "valid-v2-compensation": {**good, "version": 2, "compensation": compensation},
        "valid-v2-without-compensation": {**good, "version": 2},
        "valid": good, "valid-no-calibration": mutate("calibration", None),
        "valid-no-selection": mutate("selection", delete=True), "valid-no-model-name": mutate("model/name", delete=True),
        "valid-baseline": baseline_plan("unified", 30, 5, "e2e", good["model"]["fingerprint"]).to_dict(),
    }
    out = []
    for name, d in mutations.items():
        text = json.dumps(d)
        try:
            SkipPlan.from_dict(json.loads(text))
            valid = True
        except PlanError:
            valid = False
        assert valid == name.startswith("valid"), f"{name}: the Python SkipPlan should {'' if valid else 'not '}accept it"
        out.append({"name": name, "text": text, "valid": valid})
    return out


def _summary(r) -> dict:
    s = r.summary()
    keys = ("prompt_tokens", "new_tokens", "finish_reason", "prefill_skipped", "decode_skipped_offline",
            "decode_skipped_online", "kv_bytes", "kv_bytes_saved", "truncated_prompt")
    return {"tokens": r.tokens, **{k: s[k] for k in keys}}


def _generate_cases(engine: Path) -> dict:
    from adaskip.errors import InputError
    from adaskip.runtime.generate import SamplingParams
    from adaskip.runtime.loader import load_runtime

    rt = load_runtime(engine)
    tok = rt.tokenizer
    # a long real prompt (the language reference) on which the online FFN skipping fires at K=8 (as in test_ort.py)
    long_ids = tok.encode(long_text()[40000:43000])[:512]
    chat_ids = rt.generator.encode("What is the capital of France?", chat=True)

    greedy = rt.generator.generate([long_ids], SamplingParams(max_new_tokens=LONG_NEW, stop_token_ids=()))[0]
    assert greedy.online_skipped, "the online FFN skipping should fire on this prompt"
    assert len(greedy.tokens) == LONG_NEW
    chat = rt.generator.generate([chat_ids], SamplingParams(max_new_tokens=48))[0]
    assert chat.finish_reason == "stop", "the chat answer should end with the model's end-of-sequence token"
    print(f"Python runtime: long prompt {len(long_ids)} tokens, online FFNs {greedy.online_skipped}; chat answer "
          f"{chat.text!r}")

    def prefix(n: int, reason: str = "length") -> dict:  # greedy decoding is a prefix of the longer greedy run
        return {"tokens": greedy.tokens[:n], "new_tokens": n, "finish_reason": reason,
                "prefill_skipped": greedy.prefill_skipped}

    cases = [
        {"name": "long-greedy", "ids": long_ids, "options": {"max_new_tokens": LONG_NEW, "stop_token_ids": []},
         "expect": _summary(greedy)},
        {"name": "chat-stops-at-eos", "ids": chat_ids, "options": {"max_new_tokens": 48}, "expect": _summary(chat)},
        # sampling paths that must reduce to greedy whatever the random stream draws
        {"name": "top-k-1", "ids": long_ids, "options": {"max_new_tokens": 24, "stop_token_ids": [],
                                                         "temperature": 0.8, "top_k": 1, "seed": 5},
         "expect": prefix(24)},
        {"name": "tiny-top-p", "ids": long_ids, "options": {"max_new_tokens": 24, "stop_token_ids": [],
                                                            "temperature": 1.3, "top_p": 1e-9, "seed": 9},
         "expect": prefix(24)},
        {"name": "seeded-sampling-repeats", "ids": long_ids, "repeat": True,
         "options": {"max_new_tokens": 12, "stop_token_ids": [], "temperature": 1.0, "top_k": 40, "top_p": 0.9,
                     "seed": 1234},
         "expect": {"new_tokens": 12, "prefill_skipped": greedy.prefill_skipped}},
        {"name": "streaming-cancel", "ids": long_ids, "cancel_after": 5,
         "options": {"max_new_tokens": 64, "stop_token_ids": []}, "expect": prefix(5, "cancelled")},
    ]
    errors = [
        ("empty-prompt", [], {}, "prompt is empty"),
        ("over-context", [1] * rt.engine.spec.max_position_embeddings, {"max_new_tokens": 1}, "exceeds the model's context"),
        ("outside-vocabulary", [1, rt.engine.spec.vocab_size], {}, "outside the vocabulary"),
        ("no-room", [1, 2], {"max_new_tokens": rt.engine.spec.max_position_embeddings}, "leaves no room"),
        ("max-new-tokens-0", [1, 2], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ("top-p-0", [1, 2], {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ("negative-temperature", [1, 2], {"temperature": -1.0}, "temperature must be 0 (greedy) or between"),
    ]
    for name, ids, options, message in errors:
        with pytest.raises(InputError):  # the Python runtime refuses the same requests
            rt.generator.generate([ids], SamplingParams(**options))
        cases.append({"name": name, "ids": ids, "options": options, "expect_error": message})
    return {"engine": str(engine), "cases": cases}


def _open_errors(engine: Path, root: Path) -> list[dict]:
    """Engine dirs the C++ runtime must refuse: copies of the real one (weights hard-linked), each broken in
    one way, with the manifest's digests rewritten where the break must reach a later check."""
    from adaskip.engine_dir import sha256_file

    def broken(name: str, plan_text: str | None = None, manifest_edit=None) -> str:
        d = root / name
        d.mkdir(parents=True)
        for f in engine.rglob("*"):
            target = d / f.relative_to(engine)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif f.stat().st_size > 64 << 20:
                os.link(f, target)  # a hard link: engine files reached through a symlink are refused
            else:
                shutil.copy(f, target)
        manifest = json.loads((d / "manifest.json").read_text())
        if plan_text is not None:
            (d / "plan.json").write_text(plan_text)
        if manifest_edit is not None:
            manifest_edit(manifest)
            manifest["files"]["plan.json"] = {"sha256": sha256_file(d / "plan.json"),
                                              "bytes": (d / "plan.json").stat().st_size}
        (d / "manifest.json").write_text(json.dumps(manifest))
        return str(d)

    plan = json.loads((engine / "plan.json").read_text())
    bad_skip = {**plan, "skip": [99] + plan["skip"][1:]}
    other_model = {**plan, "model": {"fingerprint": "sha256:" + "0" * 64, "name": "another-model"}}

    def graph_field(field: str, value):
        return lambda m: m["build"]["graph"].update({field: value})

    def raw_manifest(name: str, old: str, new: str) -> str:  # text edits: json.dumps cannot nest 200,000 deep
        d = Path(broken(name))
        text = (d / "manifest.json").read_text()
        assert old in text
        (d / "manifest.json").write_text(text.replace(old, new, 1))
        return str(d)

    deep = "[" * 200_000 + "]" * 200_000
    deep_method = json.dumps({**plan, "method": "DEEP"}).replace('"DEEP"', deep)
    nested_method = json.dumps({**plan, "method": "DEEP"}).replace('"DEEP"', "[" * 100 + "]" * 100)
    huge_window = {**plan, "online": {**plan["online"], "window": 2**32}}

    def spec_field(field: str, value):
        return lambda m: m["model"]["spec"].update({field: value})

    def add_file(rel: str):
        return lambda m: m["files"].update({rel: {"sha256": "sha256:" + "0" * 64, "bytes": 1}})

    empty = root / "empty"
    empty.mkdir(parents=True)
    hostile = [  # issue 14: never a crash, a wrapped integer or a file outside the dir
        {"name": "deep-plan-value", "engine": broken("deep-plan", deep_method, lambda m: None),
         "expect_error": "is nested deeper than 512 levels"},
        {"name": "nested-plan-value", "engine": broken("nested-plan", nested_method, lambda m: None),
         "expect_error": "an array is not one of"},  # in the error message by its type, not dumped
        {"name": "deep-manifest-value", "engine": raw_manifest("deep-manifest", '"format_version": 1',
                                                               '"format_version": ' + deep),
         "expect_error": "manifest.json is nested deeper than 512 levels"},
        {"name": "type-error", "engine": broken("type-error", manifest_edit=lambda m: m["model"].update(
            fingerprint=5)), "expect_error": "manifest is malformed: [json.exception.type_error"},
        {"name": "window-2^32", "engine": broken("window", json.dumps(huge_window), lambda m: None),
         "expect_error": "online/window: 4294967296 is greater than the maximum of 2147483647"},
        {"name": "num-layers-2^32+4", "engine": broken("layers", manifest_edit=spec_field("num_layers", 2**32 + 4)),
         "expect_error": "model/spec/num_layers: 4294967300 is not an integer in 1..1024"},
        {"name": "vocab-2^64-1", "engine": broken("vocab", manifest_edit=spec_field("vocab_size", 2**64 - 1)),
         "expect_error": "model/spec/vocab_size"},
        {"name": "path-escapes", "engine": broken("escape", manifest_edit=add_file("../../etc/passwd")),
         "expect_error": "is not a path inside the engine dir"},
        {"name": "absolute-path", "engine": broken("absolute", manifest_edit=add_file("/etc/passwd")),
         "expect_error": "is not a path inside the engine dir"},
        {"name": "graph-not-listed", "engine": broken("graph-file", manifest_edit=graph_field("file", "/etc/passwd")),
         "expect_error": "is not in the manifest's file table"},
        {"name": "bytes-type", "engine": broken("bytes", manifest_edit=lambda m: m["files"]["importance.png"].update(
            bytes=1.5)), "expect_error": "bad 'files' table"},
    ]
    return hostile + [
        {"name": "missing-dir", "engine": str(root / "does-not-exist"), "expect_error": "does-not-exist does not exist"},
        {"name": "no-manifest", "engine": str(empty), "expect_error": "no manifest.json"},
        {"name": "corrupt-plan", "engine": broken("corrupt-plan", plan_text="{this is not a plan"),
         "expect_error": "plan.json has 19 bytes"},
        {"name": "plan-out-of-range", "engine": broken("plan-range", json.dumps(bad_skip), lambda m: None),
         "expect_error": "skip set names sublayers [99] outside 0..59"},
        {"name": "plan-for-another-model", "engine": broken("plan-model", json.dumps(other_model), lambda m: None),
         "expect_error": "rebuild it with adaskip-build"},
        {"name": "torch-backend", "engine": broken("torch", manifest_edit=lambda m: m.update(backend="torch")),
         "expect_error": "backend 'torch' is not supported"},
        {"name": "portable-variant", "engine": broken("portable", manifest_edit=graph_field("variant", "portable")),
         "expect_error": "graph variant 'portable' is not supported"},
        {"name": "graph-interface-2", "engine": broken("iface", manifest_edit=graph_field("interface", 2)),
         "expect_error": "graph interface 2 is not the one this runtime runs"},
    ]


# -- tests ---------------------------------------------------------------------------------------------------------------

def test_cpp_constants_follow_the_python_formats():
    """The versions the C++ runtime accepts are the ones the Python toolchain writes."""
    from adaskip.engine_dir import ENGINE_VERSION
    from adaskip.runtime.engine import GRAPH_INTERFACE
    from adaskip.plan import PLAN_VERSIONS

    runtime_h = (ROOT / "cpp/runtime/include/adaskip/runtime.h").read_text()
    found = {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", runtime_h)}
    assert found == {"kEngineVersion": ENGINE_VERSION, "kGraphInterface": GRAPH_INTERFACE}
    plan_versions = re.search(r"kPlanVersions\[\] = \{([\d, ]+)\}", (ROOT / "cpp/runtime/include/adaskip/plan.h").read_text())
    assert tuple(int(v) for v in plan_versions.group(1).split(",")) == tuple(PLAN_VERSIONS)


def test_policy_matches_python_traces(build, data):
    out = _ctest(build.wait(), data, "policy_trace")
    assert "skipdecode-6-decode: 600 steps" in out and "skipdecode-6-e2e: 600 steps" in out


def test_plans_refused_like_python(build, data):
    _ctest(build.wait(), data, "plan_errors")


def test_generates_the_python_tokens_and_skip_statistics(build, data):
    """Greedy 128 tokens on the long prompt (online FFN skipping fires), a chat answer ending at EOS, sampling
    paths, a cancelled stream and bad requests, all on the real engine."""
    out = _ctest(build.wait(), data, "generate")
    assert "long-greedy: " in out and "generate: ok" in out


def test_broken_engine_dirs_are_refused(build, data):
    _ctest(build.wait(), data, "open_errors")


def test_cli_json_matches_python_and_bad_input_exits_2(build, data, engine):
    cli = build.wait() / "cpp" / "runtime" / "adaskip_generate"
    case = next(c for c in json.loads((data / "generate.json").read_text())["cases"] if c["name"] == "chat-stops-at-eos")
    run = subprocess.run([str(cli), "--engine", str(engine), "--ids", ",".join(map(str, case["ids"])),
                          "--max-new-tokens", "48", "--json"], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    print("adaskip_generate --json:", run.stdout.strip())
    assert {k: got[k] for k in case["expect"]} == case["expect"]
    assert got["ttft_s"] > 0
    # --text: the engine dir's tokenizer.json decodes what Python's tokenizer decodes, whole and streamed
    from transformers import AutoTokenizer
    expected = AutoTokenizer.from_pretrained(engine / "tokenizer").decode(got["tokens"], skip_special_tokens=True)
    for extra in ([], ["--stream"]):
        run = subprocess.run([str(cli), "--engine", str(engine), "--ids", ",".join(map(str, case["ids"])),
                              "--max-new-tokens", "48", "--text", *extra], capture_output=True, text=True, env=ENV,
                             timeout=300)
        assert run.returncode == 0 and run.stdout == expected + "\n", (extra, run.stdout, expected, run.stderr)
    assert re.search(r"^\[adaskip\] TTFT \d+ ms \| decode \d+\.\d tok/s .* KV saved \d+\.\d MiB of \d+\.\d MiB$",
                     run.stderr.strip().splitlines()[-1]), run.stderr
    run = subprocess.run([str(cli), "--engine", str(engine), "--ids", ",".join(map(str, case["ids"])),
                          "--max-new-tokens", "48", "--text", "--json"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert run.returncode == 0 and json.loads(run.stdout)["text"] == expected, run.stdout
    # intra-op spinning (--spinning, or ADASKIP_SPINNING=1 as the Python runtime reads it) changes no token
    for extra, env in ((["--spinning"], ENV), ([], {**ENV, "ADASKIP_SPINNING": "1"})):
        run = subprocess.run([str(cli), "--engine", str(engine), "--ids", ",".join(map(str, case["ids"])),
                              "--max-new-tokens", "48", "--json", *extra], capture_output=True, text=True, env=env,
                             timeout=300)
        assert run.returncode == 0 and json.loads(run.stdout)["tokens"] == got["tokens"], (extra, run.stderr)
    for value, shown in (("yes", "yes"), ("1\n\x1b[2J" + "x" * 100, "1??[2J" + "x" * 26 + "...")):
        run = subprocess.run([str(cli), "--engine", str(engine), "--ids", "1"], capture_output=True, text=True,
                             env={**ENV, "ADASKIP_SPINNING": value}, timeout=60)
        assert run.returncode == 2 and run.stderr.strip() == (
            "adaskip_generate: error: ADASKIP_SPINNING must be 0 (intra-op threads sleep when idle) or 1 (they "
            f"spin); got '{shown}'"), run.stderr

    bad = [
        (["--engine", str(engine.parent / "nope"), "--ids", "1,2"], "nope does not exist"),
        (["--engine", str(engine), "--ids", ""], "prompt is empty"),
        (["--engine", str(engine), "--ids", "1,x"], "needs an integer"),
        (["--engine", str(engine), "--ids", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--engine", str(engine), "--ids", "1", "--temperature", "1e-45"], "temperature must be 0 (greedy) or"),
        (["--ids", "1"], "--engine DIR is required"),
    ]
    for args, message in bad:
        run = subprocess.run([str(cli), *args], capture_output=True, text=True, env=ENV, timeout=60)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, (args, run.stderr)  # one line, usage errors too
        assert lines[0].startswith("adaskip_generate: error: ") and message in lines[0], (args, run.stderr)


def test_cli_jsonl_serves_requests_and_answers_bad_ones_with_an_error(build, data, engine):
    """--jsonl keeps the engine loaded: each request line gets the --json answer of a one-shot run, and a hostile line
    gets {"error": ...} while the lines after it are still served."""
    cli = build.wait() / "cpp" / "runtime" / "adaskip_generate"
    case = next(c for c in json.loads((data / "generate.json").read_text())["cases"] if c["name"] == "chat-stops-at-eos")
    good = json.dumps({"ids": case["ids"], "max_new_tokens": 48})
    bad = [
        ("not json", "bad request: "),
        ("[1, 2]", 'a request is a JSON object with "ids"'),
        ('{"ids": []}', "prompt is empty"),
        ('{"ids": [1.5]}', "ids must be an integer; got 1.5"),
        ('{"ids": "1,2"}', "ids must be a list of token ids"),
        ('{"ids": [99999999]}', "token ids outside the vocabulary"),
        ('{"ids": [1], "top_p": 0}', "top_p must be in (0, 1]"),
        ('{"ids": [1], "max_new_tokens": 1e300}', "max_new_tokens must be an integer"),
        ('{"ids": [1], "max_new_tokens": 18446744073709551615}', "max_new_tokens is out of range"),
        ('{"ids": [1], "seed": -1}', "seed is out of range"),
        ('{"ids": [1], "truncate": "left"}', "truncate must be error or middle"),
        ('{"ids": [1], "temprature": 0.5}', "unknown request key 'temprature'"),
        ("[" * 100000 + "]" * 100000, "a request is a JSON object"),  # deep nesting: parsed without recursion, refused
        ("{" + " " * (17 << 20) + "}", "request line longer than"),  # not buffered whole
    ]
    bad = [(line.encode(), message) for line, message in bad] + [
        (b'{"ids": [1], "k\xff": 1}', "ill-formed UTF-8"),  # quoted back in the message as U+FFFD, never a crash
        (b"\xff\xfe", "bad request: "),
        # nesting deeper than a recursive dump could quote, under keys the request knows: named by type, not quoted
        (b'{"ids": [' + b"[" * 200000 + b"]" * 200000 + b"]}", "ids must be an integer; got an array"),
        (b'{"ids": [1], "truncate": ' + b"[" * 200000 + b"]" * 200000 + b"}", "got an array"),
    ]
    # the last request ends in CRLF and then the input, with no final newline
    stdin = b"\n".join([good.encode(), *(line for line, _ in bad), b"", good.encode() + b"\r"])
    run = subprocess.run([str(cli), "--engine", str(engine), "--jsonl"], input=stdin, capture_output=True,
                         env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(line) for line in run.stdout.decode("utf-8").splitlines()]
    assert len(answers) == len(bad) + 2  # the blank line is not a request
    for got in (answers[0], answers[-1]):  # the same answer before and after the bad lines
        assert {k: got[k] for k in case["expect"]} == case["expect"] and got["decode_s"] >= 0
    for (line, message), got in zip(bad, answers[1:-1]):
        assert list(got) == ["error"] and message in got["error"], (line[:80], got)
    assert "\ufffd" in answers[-5]["error"]
    run = subprocess.run([str(cli), "--engine", str(engine), "--jsonl", "--ids", "1"], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert run.returncode == 2 and "no --ids, --ids-file, --stream or --json with it" in run.stderr, run.stderr


def test_a_bench_worker_that_dies_at_start_says_why(tmp_path):
    """A program that cannot serve --jsonl (an older build, an engine it refuses) fails when its column is made, with
    its own stderr, not with a broken pipe at the first timed cell."""
    from adaskip.errors import ModelLoadError
    from adaskip.eval import cpp_runtime

    fake = tmp_path / "adaskip_generate"
    fake.write_text("#!/bin/sh\necho 'adaskip_generate: error: unknown argument --jsonl' >&2\nexit 2\n")
    fake.chmod(0o755)
    with pytest.raises(ModelLoadError, match=r"adaskip_generate exited \(2\): .*unknown argument --jsonl"):
        cpp_runtime.Worker(cpp_runtime.check_program(str(fake)), tmp_path, 1)


def test_bench_times_the_cpp_runtime_beside_the_python_loop(build, tiny_chat_model, tmp_path):
    """adaskip-bench --cpp-runtime: the `ort` engine dir also driven by adaskip_generate --jsonl (column ort-cpp), the
    spinning pair's too (ort-spin-cpp), and with --int8-kv the int8-cache engine (ort-kv8-cpp)."""
    from adaskip.cli import bench

    model = tmp_path / "model"  # 2 heads of 16: the ort graph variant (GroupQueryAttention), which the C++ runtime runs
    shutil.copytree(tiny_chat_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    (model / "config.json").write_text(json.dumps(config))
    cli = build.wait() / "cpp" / "runtime" / "adaskip_generate"
    out = tmp_path / "docs"
    assert bench.main(["--model", str(model), "--contexts", "16,32", "--budgets", "", "--repeats", "2",
                       "--decode-tokens", "3", "--no-hf", "--no-genai", "--no-llamacpp", "--int8-kv",
                       "--calib-prompts", "2", "--calib-tokens", "32", "--cpp-runtime", str(cli),
                       "--out", str(out)]) == 0
    data = json.loads((out / "benchmarks.json").read_text())
    assert [c["name"] for c in data["columns"]] == ["torch-reference", "ort", "ort-cpp", "ort-spin", "ort-spin-cpp",
                                                    "ort-kv8", "ort-kv8-cpp"]
    assert "spinning on" in next(c for c in data["columns"] if c["name"] == "ort-spin-cpp")["note"]
    cpp = data["results"]["ort-cpp"]["32"]
    assert len(cpp["raw"]["decode"]) == 2 and cpp["ttft"] > 0 and cpp["decode"] > 0
    step = {c["name"]: c["decode_bytes"]["32"] for c in data["columns"] if c["decode_bytes"]}
    assert step["ort-cpp"] == step["ort"] > step["ort-kv8-cpp"] == step["ort-kv8"] > 0  # the same engine: the same floor
    assert data["results"]["ort-kv8-cpp"]["32"]["decode"] > 0
    assert "| ort-cpp |" in (out / "benchmarks.md").read_text()
    assert bench.main(["--model", str(model), "--cpp-runtime", str(tmp_path / "nope")]) == 2  # checked up front


@pytest.mark.parametrize("kv", ["float16", "int8"])
def test_a_narrow_kv_cache_runs_in_cpp_like_python(kv, build, tiny_chat_model, tmp_path):
    """adaskip-build --kv-dtype float16 / int8 engines (a K=2 plan): the C++ runtime allocates the cache in the
    graph's type and decodes the Python runtime's greedy tokens; its KV figures count the cache's own bytes."""
    from adaskip.cli import build as build_cli
    from adaskip.runtime.generate import SamplingParams
    from adaskip.runtime.loader import load_runtime

    # the tiny chat model with 2 heads of 16 (same weight shapes): GroupQueryAttention, which keeps a narrow cache,
    # needs a head size that is a multiple of 16
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / f"kv-{kv}"
    assert build_cli.main(["--model", str(model), "--skip", "2", "--kv-dtype", kv, "-q",
                           "--calib-prompts", "2", "--calib-tokens", "64", "--output", str(out)]) == 0
    # a graph for the decode kernels where they can read the cache (float16), none for int8 (its scales)
    graph = json.loads((out / "manifest.json").read_text())["build"]["graph"]
    assert ("decode_kernels_file" in graph) == (kv == "float16")
    ids = list(range(5, 37))
    expected = load_runtime(out).generator.generate([ids], SamplingParams(max_new_tokens=12, stop_token_ids=()))[0]
    cli = build.wait() / "cpp" / "runtime" / "adaskip_generate"
    run = subprocess.run([str(cli), "--engine", str(out), "--ids", ",".join(map(str, ids)), "--max-new-tokens", "12",
                          "--stop-ids", "", "--json"], capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["tokens"] == expected.tokens and len(got["tokens"]) == 12
    width = {"float16": 2, "int8": 1}[kv]
    per_token = 2 * config["num_hidden_layers"] * 1 * 16 * width  # K and V, every layer, one KV head of 16
    assert got["kv_bytes"] == expected.kv_bytes and expected.kv_bytes_full == per_token * (len(ids) + 12)
    # the K=2 plan's saving, charged at the cache's own width (a skipped attention keeps no cache)
    assert got["kv_bytes_saved"] == expected.kv_bytes_full - expected.kv_bytes


def test_detokenizer_decodes_like_python(build, data):
    out = _ctest(build.wait(), data, "detokenize")
    assert re.search(r"tokenizer\.json: \d{4,} cases", out), out


def test_unit_suite(build):
    """Needs no prepared data: plan parsing, policy, sampler and prompt checks on the repo's plan file."""
    _ctest(build.wait(), None, "unit")


# -- fuzzing (issue 14) ----------------------------------------------------------------------------------------------

def _fuzz_cpp(cli: Path, engine: Path, root: Path, data, which: str) -> None:
    import time

    from engine_mutations import json_mutation, mutated_copy

    doc = json.loads((engine / which).read_text())
    text = data.draw(json_mutation(doc))
    d = mutated_copy(engine, root / "m", text if which == "manifest.json" else None,
                     text if which == "plan.json" else None)
    t0 = time.monotonic()
    run = subprocess.run([str(cli), "--engine", str(d), "--ids", "1,2", "--max-new-tokens", "1"], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert time.monotonic() - t0 < 60
    assert run.returncode in (0, 2), (run.returncode, run.stderr[-2000:])  # never a crash (negative) or internal error
    if run.returncode == 2:
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("adaskip_generate: error: "), run.stderr[-2000:]


def _fuzz_settings():
    from hypothesis import HealthCheck, settings

    return settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.mark.parametrize("which", ["manifest.json", "plan.json"])
def test_fuzzed_engine_dirs_never_crash_the_cpp_loader(build, engine, tmp_path, which):
    from hypothesis import given
    from hypothesis import strategies as st

    cli = build.wait() / "cpp" / "runtime" / "adaskip_generate"

    @_fuzz_settings()
    @given(data=st.data())
    def fuzz(data):
        _fuzz_cpp(cli, engine, tmp_path, data, which)

    fuzz()
