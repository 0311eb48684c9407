"""cpp/ortops's DecodeGroupQueryAttention against ONNX Runtime's GroupQueryAttention, node for node (outputs and the
in-place cache, many shapes; decode steps on its own kernel, prompt chunks handed to ONNX Runtime's), and the `ort`
engine with the decode kernels against the same engine without them on
the real SmolLM2 (greedy tokens and skip statistics, a slot pool with rows of different lengths), plus what it
refuses. The library is built by the session's C++ build (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from conftest import long_text

from adaskip.errors import InputError
from adaskip.export.onnx.quantize import all_nodes
from adaskip.runtime import decode_kernels


@pytest.fixture(scope="module")
def library(cpp_build) -> Path:
    return cpp_build.wait() / "lib" / "libadaskip_ortops.so"


def _attention_session(library: Path | None, batch: int, heads: int, kv_heads: int, dim: int, capacity: int,
                       packed: bool, window: int | None, rotary: bool = True, cache=np.float32, **attrs):
    """One attention node: GroupQueryAttention (library None) or the decode kernel, over a shared BNSH cache of
    numpy type `cache` (float32, or float16: GroupQueryAttention's T_CACHE, queries float32 as the engine has them)."""
    import onnxruntime as ort

    f32 = TensorProto.FLOAT
    cache_type = helper.np_dtype_to_tensor_dtype(np.dtype(cache))
    if packed:
        inputs = [helper.make_tensor_value_info("qkv", f32, [batch, "seq", (heads + 2 * kv_heads) * dim])]
        qkv = ["qkv", "", ""]
    else:
        inputs = [helper.make_tensor_value_info(n, f32, [batch, "seq", h * dim])
                  for n, h in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
        qkv = ["q", "k", "v"]
    inputs += [helper.make_tensor_value_info(n, cache_type, [batch, kv_heads, capacity, dim]) for n in ("pk", "pv")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [batch]),
               helper.make_tensor_value_info("total", TensorProto.INT32, []),
               helper.make_tensor_value_info("pos", TensorProto.INT64, [batch, "seq"])]
    rng = np.random.default_rng(7)
    tables = [rng.uniform(-1, 1, (capacity + 4, dim // 2)).astype(np.float32) for _ in range(2)]
    inits = [helper.make_tensor(n, f32, t.shape, t.ravel()) for n, t in zip(("cos", "sin"), tables)]
    op, domain = ("GroupQueryAttention", "com.microsoft") if library is None else (decode_kernels.DECODE_OP,
                                                                                  decode_kernels.DOMAIN)
    if window is not None:
        attrs["local_window_size"] = window
    rope = ["cos", "sin", "pos"] if rotary else ["", "", "pos"]
    node = helper.make_node(op, [*qkv, "pk", "pv", "seqlens_k", "total", *rope], ["out", "ck", "cv"], domain=domain,
                            num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rotary), scale=0.3, **attrs)
    outputs = [helper.make_tensor_value_info("out", f32, None)]
    outputs += [helper.make_tensor_value_info(n, cache_type, None) for n in ("ck", "cv")]
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run_shared(session, feeds: dict, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Runs with the caches bound as past and present (the engine's in-place layout); returns the attention."""
    binding = session.io_binding()
    for name, value in {**feeds, "pk": k, "pv": v}.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("out", "cpu")
    for name, buf in (("ck", k), ("cv", v)):
        binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def _feeds(rng, batch, heads, kv_heads, dim, lengths, packed) -> dict:
    lengths = np.asarray(lengths)
    feeds = {"seqlens_k": lengths.astype(np.int32), "total": np.array(lengths.max() + 1, np.int32),
             "pos": lengths[:, None].astype(np.int64)}
    if packed:
        feeds["qkv"] = rng.standard_normal((batch, 1, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    else:
        for name, h in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            feeds[name] = rng.standard_normal((batch, 1, h * dim)).astype(np.float32)
    return feeds


def _compare(library, batch, heads, kv_heads, dim, capacity, lengths, packed, window, rotary=True, cache=np.float32):
    rng = np.random.default_rng(batch * 1000 + capacity)
    feeds = _feeds(rng, batch, heads, kv_heads, dim, lengths, packed)
    k = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(cache)
    v = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(cache)
    ref_k, ref_v, our_k, our_v = k.copy(), v.copy(), k.copy(), v.copy()
    shape = (batch, heads, kv_heads, dim, capacity, packed, window, rotary, cache)
    ref = _run_shared(_attention_session(None, *shape), feeds, ref_k, ref_v)
    ours = _run_shared(_attention_session(library, *shape), feeds, our_k, our_v)
    if cache == np.float32:
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6)
    else:  # the step attends over its new key and value as float16, as later steps read them (ONNX Runtime: float32)
        np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3)
    for b, n in enumerate(lengths):  # the row's new key (rotated) and value, appended in place at its length
        np.testing.assert_allclose(our_k[b, :, n], ref_k[b, :, n], rtol=1e-6 if cache == np.float32 else 1e-3,
                                   atol=1e-6)
        np.testing.assert_array_equal(our_v[b, :, n], ref_v[b, :, n])
        # and nothing else written (ONNX Runtime's float16 path zeroes the positions past the row's length)
        np.testing.assert_array_equal(np.delete(our_k[b], n, axis=1), np.delete(k[b], n, axis=1))
        np.testing.assert_array_equal(np.delete(our_v[b], n, axis=1), np.delete(v[b], n, axis=1))


def _compare_prompt(library, batch, heads, kv_heads, dim, capacity, past, tokens, packed, window, shared=True,
                    cache=np.float32):
    """A step of `tokens` new tokens per row after `past` (prefill chunks), the caches bound as past and present
    (`shared`) or returned as separate outputs: the same outputs and caches as GroupQueryAttention's, exactly (the
    op hands such steps to it; a float16 cache's positions in use through float32 copies). Past the positions in use
    ONNX Runtime's float16 path zeroes the cache; the op leaves it as it was."""
    rng = np.random.default_rng(batch * 100 + tokens)
    width = (heads + 2 * kv_heads) * dim if packed else None
    feeds = {"seqlens_k": np.full(batch, past + tokens - 1, np.int32), "total": np.array(past + tokens, np.int32),
             "pos": np.tile(np.arange(past, past + tokens), (batch, 1)).astype(np.int64)}
    if packed:
        feeds["qkv"] = rng.standard_normal((batch, tokens, width)).astype(np.float32)
    else:
        for name, h in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            feeds[name] = rng.standard_normal((batch, tokens, h * dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(cache)
    v = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(cache)
    shape = (batch, heads, kv_heads, dim, capacity, packed, window)
    results = []
    for lib in (None, library):
        session = _attention_session(lib, *shape, cache=cache)
        kk, vv = k.copy(), v.copy()
        if shared:
            results.append((_run_shared(session, feeds, kk, vv), kk, vv))
        else:
            results.append(tuple(session.run(None, {**feeds, "pk": kk, "pv": vv})))
    used = past + tokens
    np.testing.assert_array_equal(results[1][0], results[0][0])
    for ref, ours, before in zip(results[0][1:], results[1][1:], (k, v)):
        np.testing.assert_array_equal(ours[:, :, :used], ref[:, :, :used])
        if cache == np.float32:
            np.testing.assert_array_equal(ours, ref)
        elif shared:
            np.testing.assert_array_equal(ours[:, :, used:], before[:, :, used:])


@pytest.mark.parametrize("case", [
    # batch, heads, kv_heads, dim, capacity, past, new tokens per row, packed, window, caches shared in place
    (1, 9, 3, 64, 600, 0, 512, True, None, True),     # SmolLM2's heads, a whole prompt
    (1, 9, 3, 64, 400, 128, 128, True, None, True),   # a second chunk after a first (one row: GQA's rule)
    (1, 4, 1, 256, 700, 300, 64, False, 512, True),   # Gemma-3's heads, unpacked, a window across the chunk
    (3, 4, 2, 32, 90, 0, 20, True, None, True),       # several rows of a first chunk
    (1, 8, 2, 64, 200, 10, 7, True, None, False),     # present returned apart from past (copied, not shared)
], ids=["smollm2-prompt", "second-chunk", "gemma3-window", "rows", "unshared-cache"])
def test_prompt_steps_run_group_query_attention(library, case):
    _compare_prompt(library, *case)


@pytest.mark.parametrize("case", [
    # batch, heads, kv_heads, dim, capacity, lengths (each row's past), packed, window
    (1, 9, 3, 64, 80, [10], True, None),                  # SmolLM2's heads, one short row
    (3, 9, 3, 64, 700, [0, 300, 699], True, None),        # an empty past, a mid row, a full buffer (several chunks)
    (2, 4, 1, 256, 600, [5, 590], False, 512),            # Gemma-3's heads, unpacked, sliding window
    (2, 8, 2, 64, 300, [100, 299], True, 64),             # window shorter than the past
    (2, 12, 1, 32, 90, [40, 89], True, None),             # generic path: 12 heads per KV head, head size 32
    (4, 6, 2, 128, 520, [511, 512, 513, 3], False, None),  # chunk boundaries (256 keys per chunk)
], ids=["smollm2", "rows-of-every-length", "gemma3-window", "short-window", "generic", "chunk-edges"])
def test_decode_kernel_matches_group_query_attention(library, case):
    _compare(library, *case)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decode_kernel_matches_on_random_shapes(library, data):
    kv_heads = data.draw(st.integers(1, 3))
    heads = kv_heads * data.draw(st.integers(1, 9))
    dim = data.draw(st.sampled_from([16, 32, 64, 128]))
    batch = data.draw(st.integers(1, 4))
    capacity = data.draw(st.integers(1, 600))
    lengths = data.draw(st.lists(st.integers(0, capacity - 1), min_size=batch, max_size=batch))
    window = data.draw(st.one_of(st.none(), st.integers(1, 700)))
    _compare(library, batch, heads, kv_heads, dim, capacity, lengths, data.draw(st.booleans()), window,
             rotary=data.draw(st.booleans()))


@pytest.mark.parametrize("case", [
    # batch, heads, kv_heads, dim, capacity, lengths, packed, window
    (3, 9, 3, 64, 700, [0, 300, 699], True, None),        # SmolLM2's heads, rows of every length, several chunks
    (2, 4, 1, 256, 600, [5, 590], False, 512),            # Gemma-3's heads, unpacked, sliding window
    (2, 12, 1, 32, 90, [40, 89], True, None),             # generic path
], ids=["smollm2", "gemma3-window", "generic"])
def test_decode_kernel_reads_float16_caches(library, case):
    """--kv-dtype float16 engines: the kernel reads the float16 cache (half the bytes) against GroupQueryAttention
    with the same float16 T_CACHE."""
    _compare(library, *case, cache=np.float16)


@pytest.mark.parametrize("case", [
    (1, 9, 3, 64, 600, 0, 512, True, None, True),
    (1, 9, 3, 64, 400, 128, 128, True, None, True),
    (1, 4, 1, 256, 700, 300, 64, False, 512, True),
    (1, 8, 2, 64, 200, 10, 7, True, None, False),
], ids=["smollm2-prompt", "second-chunk", "gemma3-window", "unshared-cache"])
def test_prompt_steps_over_float16_caches_equal_group_query_attention(library, case):
    _compare_prompt(library, *case, cache=np.float16)


def test_attention_without_a_past_runs_on_the_op(library):
    """A layer the plan does not cache (its attention skipped in every decode step): the node has no past and nobody
    reads its present outputs. decode_graph leaves those out (the op takes float32 or float16 caches and could not
    type them), and the node's attention equals GroupQueryAttention's, for a prompt and for a single token."""
    import onnxruntime as ort

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", f32, [1, "seq", 15 * 64]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "seq"])]
    rng = np.random.default_rng(3)
    tables = [rng.uniform(-1, 1, (64, 32)).astype(np.float32) for _ in range(2)]
    inits = [helper.make_tensor(n, f32, t.shape, t.ravel()) for n, t in zip(("cos", "sin"), tables)]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "", "", "seqlens_k", "total", "cos", "sin", "pos"],
                            ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=9, kv_num_heads=3,
                            do_rotary=1, scale=0.125)
    model = helper.make_model(helper.make_graph([node], "uncached", inputs,
                                                [helper.make_tensor_value_info("out", f32, None)], inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    swapped = decode_kernels.decode_graph(model)
    assert list(swapped.graph.node[0].output) == ["out", "", ""]
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    ours = ort.InferenceSession(swapped.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for tokens in (6, 1):
        feeds = {"qkv": rng.standard_normal((1, tokens, 15 * 64)).astype(np.float32),
                 "seqlens_k": np.array([tokens - 1], np.int32), "total": np.array(tokens, np.int32),
                 "pos": np.arange(tokens)[None].astype(np.int64)}
        np.testing.assert_allclose(ours.run(None, feeds)[0], ref.run(None, feeds)[0], rtol=1e-5, atol=2e-6)


def test_decode_kernel_refuses_what_it_cannot_run(library):
    rng = np.random.default_rng(0)
    session = _attention_session(library, 1, 4, 2, 16, 8, True, None)
    k, v = np.zeros((1, 2, 8, 16), np.float32), np.zeros((1, 2, 8, 16), np.float32)
    feeds = _feeds(rng, 1, 4, 2, 16, [8], True)  # past length 8 in an 8-position buffer: no room
    with pytest.raises(Exception, match="outside the KV buffer of 8 positions"):
        _run_shared(session, feeds, k, v)
    two = _attention_session(library, 2, 4, 2, 16, 8, True, None)
    k2, v2 = rng.standard_normal((2, 2, 8, 16)).astype(np.float32), rng.standard_normal((2, 2, 8, 16)).astype(np.float32)
    before = k2.copy(), v2.copy()
    with pytest.raises(Exception, match=r"seqlens_k\[1\] = 9"):  # row 0 is fine, row 1 is not: nothing is written
        _run_shared(two, _feeds(rng, 2, 4, 2, 16, [2, 9], True), k2, v2)
    np.testing.assert_array_equal(k2, before[0])
    np.testing.assert_array_equal(v2, before[1])
    with pytest.raises(Exception, match="softcap is not supported"):
        _attention_session(library, 1, 4, 2, 16, 8, True, None, softcap=30.0)


def test_decode_graph_swaps_attention_and_refuses_int8_caches(smollm2_k8_engine, tmp_path):
    model = onnx.load(str(smollm2_k8_engine / "model.onnx"), load_external_data=False)
    before = sum(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    swapped = decode_kernels.decode_graph(model)
    assert sum(n.op_type == decode_kernels.DECODE_OP for n in swapped.graph.node) == before > 0
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == before  # the input is untouched
    for cache_type in (TensorProto.FLOAT16, TensorProto.INT8):  # float16 caches are the kernel's, int8 not
        for i in model.graph.input:
            if i.name.startswith("past_"):
                i.type.tensor_type.elem_type = cache_type
        if cache_type == TensorProto.FLOAT16:
            assert sum(n.op_type == decode_kernels.DECODE_OP for n in decode_kernels.decode_graph(model).graph.node)
    with pytest.raises(InputError, match="float32 or float16 KV caches; this engine's are int8"):
        decode_kernels.decode_graph(model)


def test_a_missing_library_is_a_one_line_error(smollm2_k8_engine, tmp_path):
    env = {**os.environ, decode_kernels.ENV: str(tmp_path / "nope.so")}
    run = subprocess.run([sys.executable, "-m", "adaskip.cli.run", "--engine", str(smollm2_k8_engine),
                          "--prompt", "hi", "--max-new-tokens", "2"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "nope.so" in run.stderr and "Traceback" not in run.stderr
    not_a_library = tmp_path / "junk.so"
    not_a_library.write_bytes(b"not an ELF file")
    with pytest.raises(InputError, match="cannot load the decode kernels"):
        _runtime(smollm2_k8_engine, not_a_library)


def _runtime(engine: Path, library: Path | str):
    """The engine opened with ADASKIP_DECODE_KERNELS=library ("": ONNX Runtime's kernels), the caller's environment
    left as it was."""
    from adaskip.runtime.loader import load_runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(decode_kernels.ENV, str(library))
        return load_runtime(engine, threads=2)


def test_engine_with_decode_kernels_generates_the_same_tokens(library, smollm2_k8_engine):
    """The real SmolLM2 with the K=8 e2e plan (online FFN skipping fires on this prompt): same greedy tokens and skip
    statistics with and without the decode kernels, which the one session of the engine runs (prompt and decode)."""
    from adaskip.runtime.generate import SamplingParams

    plain, fast = _runtime(smollm2_k8_engine, ""), _runtime(smollm2_k8_engine, library)
    assert (fast.engine.decode_kernels, plain.engine.decode_kernels) == (library, None)
    ids = plain.tokenizer.encode(long_text()[40000:43000])[:512]
    params = SamplingParams(max_new_tokens=48, stop_token_ids=())
    ref, ours = (rt.generator.generate([ids], params)[0] for rt in (plain, fast))
    assert ref.online_skipped, "the online FFN skipping should fire on this prompt"
    assert ours.tokens == ref.tokens
    assert (ours.online_skipped, ours.decode_skipped_offline) == (ref.online_skipped, ref.decode_skipped_offline)


def test_cpp_runtime_decodes_with_the_kernels_like_python(cpp_build, library, smollm2_k8_engine, tmp_path):
    """adaskip_generate --decode-kernels (or $ADASKIP_DECODE_KERNELS) loads the engine dir's decode graph, which
    adaskip-build wrote, and gives the Python runtime's greedy tokens and skip statistics; what it cannot use is one
    line and exit 2."""
    from adaskip.runtime.generate import SamplingParams

    graph = json.loads((smollm2_k8_engine / "manifest.json").read_text())["build"]["graph"]
    assert graph["decode_kernels_file"] == decode_kernels.DECODE_FILE
    swapped = onnx.load(str(smollm2_k8_engine / decode_kernels.DECODE_FILE), load_external_data=False)
    ops = [n.op_type for n in all_nodes(swapped.graph)]  # If branches included
    assert decode_kernels.DECODE_OP in ops and "GroupQueryAttention" not in ops
    plain = _runtime(smollm2_k8_engine, "")
    ids = plain.tokenizer.encode(long_text()[40000:43000])[:512]
    ref = plain.generator.generate([ids], SamplingParams(max_new_tokens=48, stop_token_ids=()))[0]
    cli = cpp_build.wait() / "cpp" / "runtime" / "adaskip_generate"
    args = [str(cli), "--engine", str(smollm2_k8_engine), "--ids", ",".join(map(str, ids)), "--max-new-tokens", "48",
            "--stop-ids", "", "--threads", "2", "--json"]
    env = {k: v for k, v in os.environ.items() if k != decode_kernels.ENV}
    for extra, extra_env in ((["--decode-kernels", str(library)], {}), ([], {decode_kernels.ENV: str(library)})):
        run = subprocess.run(args + extra, capture_output=True, text=True, env={**env, **extra_env}, timeout=300)
        assert run.returncode == 0, run.stderr
        got = json.loads(run.stdout)
        assert got["tokens"] == ref.tokens and got["decode_skipped_online"] == sorted(ref.online_skipped)
    # an engine dir built without the decode graph (as before this adaskip, or with an int8 cache): a copy whose
    # manifest names none (hard links: the weights are not copied)
    old = tmp_path / "old"
    shutil.copytree(smollm2_k8_engine, old, copy_function=os.link)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["build"]["graph"]["decode_kernels_file"], manifest["files"][decode_kernels.DECODE_FILE]
    (old / "manifest.json").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    for engine, lib, message in ((smollm2_k8_engine, tmp_path / "nope.so", "which is not a file"),
                                 (smollm2_k8_engine, junk, "cannot load the decode kernels"),
                                 (old, library, "has no graph for the decode kernels")):
        run = subprocess.run([str(cli), "--engine", str(engine), "--ids", "1,2", "--decode-kernels", str(lib)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def _pool_steps(rt, ids: list[int], slots: int, prompts: tuple[tuple[int, int], ...],
                steps: tuple[list[int], ...]) -> tuple[list[np.ndarray], object]:
    """The serving scheduler's path on `rt`'s engine: a pool of `slots` x 700 positions, `prompts` ((slot, length):
    the first `length` ids) prefilled, then one decode step per entry of `steps` (the slots decoding; free slots inside
    their range ride along as filler rows). Returns each step's logits and the pool."""
    engine = rt.engine
    n = engine.spec.num_sublayers
    cache = engine.new_cache(slots, 700, list(rt.policy.layout.cached_layers))
    skip, scales = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    for slot, length in prompts:
        engine.prefill_slot(slot, torch.tensor(ids[:length]), cache, skip, scales)
    logits = []
    for decoding in steps:
        tokens = torch.tensor([ids[700 + s] for s in decoding])
        b = len(decoding)
        logits.append(np.asarray(engine.decode_slots(decoding, tokens, cache, skip.expand(b, -1),
                                                     scales.expand(b, -1)).logits))
    return logits, cache


def test_slot_pool_decodes_like_onnx_runtime_kernels(library, smollm2_k8_engine):
    """The serving scheduler's path: a pool of slots holding prompts of different lengths, decode steps over subsets
    of them (filler rows inside the range): logits agree with ONNX Runtime's kernels, the cache is the same."""
    plain, fast = _runtime(smollm2_k8_engine, ""), _runtime(smollm2_k8_engine, library)
    ids = plain.tokenizer.encode(long_text()[:6000])
    (ref_steps, ref_cache), (our_steps, our_cache) = (
        _pool_steps(rt, ids, 4, ((0, 600), (1, 37), (3, 250)), ([0, 3], [0, 1, 3], [1])) for rt in (plain, fast))
    for ref, ours in zip(ref_steps, our_steps):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-4)
    np.testing.assert_array_equal(our_cache.lengths, ref_cache.lengths)
    for i in ref_cache.k:
        np.testing.assert_allclose(our_cache.k[i], ref_cache.k[i], atol=1e-5)
        np.testing.assert_allclose(our_cache.v[i], ref_cache.v[i], atol=1e-5)


def test_bench_times_the_decode_kernels_beside_onnx_runtime(cpp_build, library, tiny_gqa_chat_model, tmp_path,
                                                           capsys):
    """adaskip-bench --decode-kernels: ort-dk and ort-dk-spin beside ort and ort-spin, timed like them, with
    --fp16-kv the same on a float16 KV cache, and with --cpp-runtime their C++ runtime twins; a path that is not a
    file, or --fp16-kv without the kernels, is refused in one line."""
    import json

    from adaskip.cli import bench

    common = ["--model", str(tiny_gqa_chat_model), "--contexts", "16,32", "--budgets", "", "--repeats", "1",
              "--decode-tokens", "2", "--no-hf", "--no-genai", "--no-llamacpp"]
    assert bench.main(common + ["--decode-kernels", str(tmp_path / "missing.so"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.so" in err and "\n" not in err
    out = tmp_path / "docs"
    program = cpp_build.wait() / "cpp" / "runtime" / "adaskip_generate"
    assert bench.main(common + ["--fp16-kv", "--out", str(tmp_path)]) == 2  # a float16 cache without the kernels
    err = capsys.readouterr().err.strip()
    assert "--decode-kernels" in err and "\n" not in err
    assert bench.main(common + ["--decode-kernels", str(library), "--fp16-kv", "--cpp-runtime", str(program),
                                "--out", str(out)]) == 0
    data = json.loads((out / "benchmarks.json").read_text())
    names = [c["name"] for c in data["columns"]]
    assert names == ["torch-reference", "ort", "ort-cpp", "ort-spin", "ort-spin-cpp", "ort-dk", "ort-dk-cpp",
                     "ort-dk-spin", "ort-dk-spin-cpp", "ort-kv16-dk", "ort-kv16-dk-cpp", "ort-kv16-dk-spin",
                     "ort-kv16-dk-spin-cpp"]
    notes = {c["name"]: c["note"] for c in data["columns"]}
    assert all("DecodeGroupQueryAttention" in notes[n] for n in names if "-dk" in n)
    assert all(("float16 KV cache" in notes[n]) == ("kv16" in n) for n in names)
    assert not any("DecodeGroupQueryAttention" in notes[n] for n in names if "-dk" not in n)
    assert all(data["results"][n][c]["decode"] > 0 for n in names[1:] for c in ("16", "32"))
    assert "| ort-dk |" in (out / "benchmarks.md").read_text()


def test_decode_profile_counts_every_rows_cache_with_the_kernels(library, tiny_gqa_chat_model, tmp_path):
    """scripts/decode_profile.py --rows N --decode-kernels LIB: the profiled steps run the engine's graph with the op
    (every attention node is the op, none is GroupQueryAttention), and each one is charged N rows of K/V."""
    import importlib.util

    from adaskip.cli import build as build_cli

    engine = tmp_path / "engine"
    assert build_cli.main(["--model", str(tiny_gqa_chat_model), "--skip", "0", "-q", "--calib-prompts", "2",
                           "--calib-tokens", "32", "--output", str(engine)]) == 0
    spec = importlib.util.spec_from_file_location("decode_profile", Path(__file__).parents[1] / "scripts" /
                                                  "decode_profile.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.MonkeyPatch.context() as mp:  # the script sets the variable for the engine it opens
        mp.setenv(decode_kernels.ENV, "")
        one, rows = (script.profile(str(engine), 40, 3, 1, 2, rows=r, kernels=str(library)) for r in (1, 3))
    attention = [[x for x in r["nodes"] if x["op"] == decode_kernels.DECODE_OP] for r in (one, rows)]
    assert attention[0] and not any(x["op"] == "GroupQueryAttention" for r in (one, rows) for x in r["nodes"])
    layers = json.loads((engine / "manifest.json").read_text())["build"]["graph"]["kv_layers"]
    assert len(attention[0]) == len(attention[1]) == len(layers)
    for a, b in zip(*attention):  # the same weights (rotary tables' row), three rows' cache instead of one
        kv_one = (b["bytes"] - a["bytes"]) / 2  # bytes = weights + rows x one row's K/V
        assert kv_one > 0 and b["bytes"] - 3 * kv_one == pytest.approx(a["bytes"] - kv_one)
    assert rows["rows"] == 3 and rows["decode_kernels"] == str(library)


@pytest.fixture(scope="module")
def smollm2_fp16_kv_engine(tmp_path_factory) -> Path:
    """The real SmolLM2 with the stored K=8 e2e plan, built with --kv-dtype float16."""
    from adaskip.builder.build import build
    from adaskip.builder.options import BuildOptions, EngineOptions, SelectionOptions

    out = tmp_path_factory.mktemp("smollm2-fp16-kv") / "engine"
    plan = Path(__file__).parent / "data" / "smollm2-k8-e2e-plan.json"
    build(BuildOptions(model="smollm2-135m", output=str(out), selection=SelectionOptions(plan=str(plan)),
                       engine=EngineOptions(kv_dtype="float16"), progress=False))
    return out


def test_float16_cache_engine_decodes_with_the_kernels(cpp_build, library, smollm2_fp16_kv_engine):
    """A --kv-dtype float16 engine on the kernels, against the same engine on ONNX Runtime's float16 path: a slot
    pool's logits and caches (positions in use), the Python runtime's greedy tokens and skip statistics, and the C++
    runtime's (adaskip-build wrote the decode graph)."""
    from adaskip.runtime.generate import SamplingParams

    engine_dir = smollm2_fp16_kv_engine
    plain, fast = _runtime(engine_dir, ""), _runtime(engine_dir, library)
    ids = plain.tokenizer.encode(long_text()[:6000])
    prompts = ((0, 600), (1, 37), (2, 250))
    (ref_steps, ref_cache), (our_steps, our_cache) = (
        _pool_steps(rt, ids, 3, prompts, ([0, 2], [0, 1, 2], [1])) for rt in (plain, fast))
    assert next(iter(our_cache.k.values())).dtype == np.float16
    for ref, ours in zip(ref_steps, our_steps):
        np.testing.assert_allclose(ours, ref, rtol=1e-2, atol=2e-2)  # float16 keys and values read either way
    np.testing.assert_array_equal(our_cache.lengths, ref_cache.lengths)
    for i in ref_cache.k:
        for (slot, prompt_len), used in zip(prompts, ref_cache.lengths):
            for ours, ref in ((our_cache.k[i][slot], ref_cache.k[i][slot]),
                              (our_cache.v[i][slot], ref_cache.v[i][slot])):
                np.testing.assert_array_equal(ours[:, :prompt_len], ref[:, :prompt_len])  # prompts: exactly
                # decode steps' keys and values come from hidden states that already differ in the last bits
                np.testing.assert_allclose(ours[:, prompt_len:used], ref[:, prompt_len:used], rtol=1e-2, atol=2e-2)

    prompt = plain.tokenizer.encode(long_text()[40000:43000])[:512]
    params = SamplingParams(max_new_tokens=32, stop_token_ids=())
    ref, ours = (rt.generator.generate([prompt], params)[0] for rt in (plain, fast))
    assert ours.tokens == ref.tokens
    assert (ours.online_skipped, ours.decode_skipped_offline) == (ref.online_skipped, ref.decode_skipped_offline)
    cli = cpp_build.wait() / "cpp" / "runtime" / "adaskip_generate"
    env = {k: v for k, v in os.environ.items() if k != decode_kernels.ENV}
    run = subprocess.run([str(cli), "--engine", str(engine_dir), "--ids", ",".join(map(str, prompt)),
                          "--max-new-tokens", "32", "--stop-ids", "", "--threads", "2", "--json",
                          "--decode-kernels", str(library)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"] == ours.tokens
