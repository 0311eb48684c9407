"""ONNX Runtime backend (the embedded default): the exported graph behind the Engine protocol.

The KV cache is a caller-owned buffer of the request's full capacity, bound to the session without copies; each
step the graph returns only the new tokens' K/V and we write them into the buffer in place, so a decode step never
copies the cache (see adaskip/export/onnx/portable.py and ort.py for the two graphs' KV layouts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from adaskip.engine_dir import EngineDir
from adaskip.errors import EngineDirError, InputError
from adaskip.model.spec import ModelSpec
from adaskip.runtime.decode_kernels import decode_graph, kernel_library
from adaskip.runtime.engine import GRAPH_INTERFACE, StepOutput
from adaskip.runtime.graph_engine import GraphEngine, kv_layers_of


class _BufferCache:
    """Shared by both ORT caches: per-layer K/V numpy buffers in `k` and `v`."""

    k: dict[int, np.ndarray]
    v: dict[int, np.ndarray]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k.values()) + sum(a.nbytes for a in self.v.values())

    @property
    def cached_layers(self) -> list[int]:
        return sorted(self.k)


class OrtKVCache(_BufferCache):
    def __init__(self, spec: ModelSpec, batch: int, capacity: int, layers: list[int]):
        kvh, hd = spec.num_kv_heads, spec.head_dim
        self.k = {i: np.zeros((batch, kvh, hd, capacity), np.float32) for i in layers}  # transposed keys
        self.v = {i: np.zeros((batch, kvh, capacity, hd), np.float32) for i in layers}
        self.valid = np.zeros((batch, capacity), bool)
        self.next_pos = np.zeros(batch, np.int64)
        self.capacity = capacity
        self.length = 0


def session_options(threads: int | None = None, spinning: bool | None = None):
    """Spinning stays off by default: with several sessions in one process (or a busy machine) spinning threads
    doubled decode time here. A process that runs one engine alone may turn it on (`spinning=True`, or
    ADASKIP_SPINNING=1 where `spinning` is None): every parallel kernel then skips waking its worker threads, which
    took 5-25% off decode here (docs/benchmarks.md), as llama.cpp's and onnxruntime-genai's defaults do."""
    import onnxruntime as ort

    if spinning is None:
        env_spin = os.environ.get("ADASKIP_SPINNING", "0") or "0"
        if env_spin not in ("0", "1"):
            raise InputError(f"ADASKIP_SPINNING must be 0 (intra-op threads sleep when idle) or 1 (they spin); "
                             f"got {env_spin!r}")
        spinning = env_spin == "1"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.intra_op_num_threads = thread_count(threads)
    so.log_severity_level = 3
    return so


def thread_count(threads: int | None = None) -> int:
    """The intra-op threads of a session: `threads` where given, else ADASKIP_THREADS (0 or unset: all cores). Both
    are checked, whichever wins: a bad value is the caller's InputError, not a silent default."""
    cores = os.cpu_count() or 1  # more threads than cores only adds contention (10000 took minutes to start)
    env = os.environ.get("ADASKIP_THREADS", "0") or "0"
    if not env.isdigit() or int(env) > cores:
        raise InputError(f"ADASKIP_THREADS must be 0 (all cores) or a number of threads up to {cores}; got {env!r}")
    if threads is not None and not 1 <= threads <= cores:
        raise InputError(f"--threads must be between 1 and {cores} (this machine's cores); got {threads}")
    return threads or int(env)


class OrtGraphEngine(GraphEngine):
    """An exported graph in an ONNX Runtime session (CPU)."""

    def __init__(self, model_path: str | Path, spec: ModelSpec, threads: int | None = None,
                 spinning: bool | None = None):
        import onnxruntime as ort

        self.spec = spec
        options = session_options(threads, spinning)  # a bad setting is the caller's error, not the engine's
        graph = self.session_graph(Path(model_path), options)
        try:
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineDirError(f"ONNX Runtime cannot load {model_path}{self._graph_note()}: {e}") from None
        self.kv_layers = kv_layers_of([i.name for i in self.session.get_inputs()])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def session_graph(self, model_path: Path, options: Any) -> str | bytes:
        """What this engine's session loads, given the session options it will load with: the graph file (a
        subclass may give a changed copy and set `options` for it)."""
        return str(model_path)

    def _graph_note(self) -> str:
        return ""

    @classmethod
    def from_engine_dir(cls, ed: EngineDir, threads: int | None = None,
                        spinning: bool | None = None) -> "OrtGraphEngine":
        graph = ed.manifest["build"].get("graph", {})
        if graph.get("interface") != GRAPH_INTERFACE:
            raise EngineDirError(f"{ed.root}: graph interface {graph.get('interface')!r} is not the one this adaskip "
                                 f"runs ({GRAPH_INTERFACE}); rebuild the engine with adaskip-build")
        return cls(ed.root / graph["file"], ed.spec, threads=threads, spinning=spinning)


class OrtPortableEngine(OrtGraphEngine):
    """The portable graph (standard ONNX ops) on ONNX Runtime: caller-owned KV buffers, the graph returns the new
    tokens' K/V and they are written into the buffer in place."""

    def _make_cache(self, batch: int, capacity: int) -> OrtKVCache:
        return OrtKVCache(self.spec, batch, capacity, self.kv_layers)

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, cache: OrtKVCache, skip: torch.Tensor,
                scales: torch.Tensor, all_logits: bool = False, want_stats: bool = True) -> StepOutput:
        self._check_prefill(cache, all_logits)
        valid_np = valid.numpy().astype(bool)
        positions = self._prompt_positions(cache.next_pos, valid_np)
        return self._run(ids.numpy().astype(np.int64), positions, valid_np, cache, skip, scales,
                         past_len=0, want_stats=want_stats)

    def decode(self, tokens: torch.Tensor, cache: OrtKVCache, skip: torch.Tensor, scales: torch.Tensor,
               want_stats: bool = True) -> StepOutput:
        ids = tokens.numpy().astype(np.int64).reshape(-1, 1)
        return self._run(ids, cache.next_pos[:, None].copy(), np.ones_like(ids, dtype=bool), cache, skip, scales,
                         past_len=cache.capacity, want_stats=want_stats)

    def _run(self, ids, positions, valid, cache: OrtKVCache, skip, scales, past_len: int,
             want_stats: bool) -> StepOutput:
        batch, seq = ids.shape
        start = cache.length
        if start + seq > cache.capacity:
            raise InputError(f"KV cache holds {cache.capacity} positions; {start + seq} requested")
        skip_np = self._check_skip(skip)
        feeds = {"input_ids": ids, "position_ids": positions, "token_valid": valid,
                 "past_valid": np.ascontiguousarray(cache.valid[:, :past_len]), "skip": skip_np,
                 "scale": np.ascontiguousarray(scales.numpy().astype(np.float32)),
                 "want_stats": np.array(want_stats)}
        for i in self.kv_layers:  # the whole buffer (decode) or an empty view of it (prefill): bound, not copied
            feeds[f"past_key_{i}"] = cache.k[i] if past_len else cache.k[i][..., :0]
            feeds[f"past_value_{i}"] = cache.v[i] if past_len else cache.v[i][:, :, :0]
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        out = dict(zip(self.outputs, (v.numpy() for v in binding.get_outputs())))
        for i in self.kv_layers:  # write only the new tokens into the buffer
            cache.k[i][..., start:start + seq] = out[f"new_key_{i}"]
            cache.v[i][:, :, start:start + seq] = out[f"new_value_{i}"]
        cache.valid[:, start:start + seq] = valid
        cache.length += seq
        cache.next_pos += valid.sum(axis=1)
        return self._step_output(out, skip_np)


# Prompt tokens per GroupQueryAttention forward in prefill. Chunking skips the attention work above the causal
# diagonal between chunks and bounds the activations' memory. Measured on SmolLM2 here (2 threads, medians of 3)
# against one pass: 4k prefill -5%, 8k -13% (1024-token chunks: -4%, -10%).
PREFILL_CHUNK = 2048


class GqaKVCache(_BufferCache):
    """BNSH buffers of the request's capacity that ONNX Runtime's GroupQueryAttention updates in place; rows are
    right-padded, each with its own length."""

    def __init__(self, spec: ModelSpec, batch: int, capacity: int, layers: list[int], dtype=np.float32):
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        self.k = {i: np.zeros(shape, dtype) for i in layers}
        self.v = {i: np.zeros(shape, dtype) for i in layers}
        self.lengths = np.zeros(batch, np.int64)
        self.capacity = capacity
        self.length = 0  # forwards' token count, as in the other caches (the widest row)
        # the engine session's IO bindings with this cache's buffers bound once (OrtGqaEngine), one per range of
        # slots [first, stop) a forward runs over (a slot's rows are contiguous in BNSH, so any range is a view), each
        # with the arrays its small inputs and its step outputs are bound to (inputs updated in place while their
        # shapes hold; outputs written in place by every run, into rows [first, stop) of `outputs`)
        self.bindings: dict[tuple[int, int], tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        # the step outputs, one row per slot, shared by every binding's rows (forwards run one at a time and their
        # results are copied out before the next): memory stays at one row per slot however many ranges run
        self.outputs: dict[str, np.ndarray] = {}

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def release(self, slot: int) -> None:
        """Empties one slot for the next request (its stale K/V stays; lengths say what is valid)."""
        self.lengths[slot] = 0


# ONNX Runtime's names of the element types our graphs' outputs carry
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# a KV buffer's ONNX Runtime type -> numpy, and numpy -> torch (the Generator charges KV bytes by the torch dtype)
_KV_TYPES = {**_NUMPY_TYPES, "tensor(int8)": np.int8}
_TORCH_TYPES = {np.float32: torch.float32, np.float16: torch.float16, np.int8: torch.int8}


class OrtGqaEngine(OrtGraphEngine):
    """The ORT-optimized graph variant: fused GroupQueryAttention over a shared, in-place KV buffer (no copy of the
    cache at any step, no T x S score matrix in prefill). Left-padded batches from the Generator are laid out
    right-padded for the kernel; every row keeps its own length."""

    def __init__(self, model_path: str | Path, spec: ModelSpec, threads: int | None = None,
                 spinning: bool | None = None, prefill_chunk: int | None = PREFILL_CHUNK,
                 decode_kernels: str | Path | None = None):
        """`decode_kernels`: cpp/ortops's library, whose attention kernel then runs the decode steps (None:
        $ADASKIP_DECODE_KERNELS; "": ONNX Runtime's kernels only; adaskip/runtime/decode_kernels.py)."""
        self.decode_kernels = kernel_library(decode_kernels)  # a bad path fails before the graph loads
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1 token (or None); got {prefill_chunk}")
        super().__init__(model_path, spec, threads, spinning)
        self.prefill_chunk = prefill_chunk
        # logits [B, vocab], similarity and norm_ratio [B, 2L]: element type and width of each (the KV buffers are the
        # cache's own arrays)
        self.step_outputs = {o.name: (_NUMPY_TYPES[o.type], o.shape[1]) for o in self.session.get_outputs()
                             if not o.name.startswith("present_")}
        # the graph's KV buffer type (float32, or float16 / int8 from adaskip-build --kv-dtype): one for every buffer
        types = {i.type for i in self.session.get_inputs() if i.name.startswith("past_")}
        if len(types) > 1 or not types <= set(_KV_TYPES):
            raise EngineDirError(f"{model_path}: its KV cache buffers are not all float32, float16 or int8 of one "
                                 f"type ({', '.join(sorted(types))}); the engine dir is inconsistent: rebuild it")
        self.kv_dtype = _KV_TYPES[types.pop()] if types else np.float32  # no cached layer: nothing is allocated
        self.dtype = _TORCH_TYPES[self.kv_dtype]  # bytes per KV element (generate.dtype_bytes)

    def _make_cache(self, batch: int, capacity: int) -> GqaKVCache:
        return GqaKVCache(self.spec, batch, capacity, self.kv_layers, self.kv_dtype)

    def session_graph(self, model_path: Path, options: Any) -> str | bytes:
        """With decode kernels: the graph with its attention on cpp/ortops's op (decode steps on its kernel, prompts
        on ONNX Runtime's GroupQueryAttention), reading the same weights file."""
        if self.decode_kernels is None:
            return str(model_path)
        try:
            options.register_custom_ops_library(str(self.decode_kernels))
        except Exception as e:  # not a shared library, or not one built for this ONNX Runtime
            raise InputError(f"cannot load the decode kernels {self.decode_kernels}: {e}") from None
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model_path.parent))
        return decode_graph(onnx.load(str(model_path), load_external_data=False)).SerializeToString()

    def _graph_note(self) -> str:
        return f" with the decode kernels {self.decode_kernels}" if self.decode_kernels else ""

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, cache: GqaKVCache, skip: torch.Tensor,
                scales: torch.Tensor, all_logits: bool = False, want_stats: bool = True) -> StepOutput:
        self._check_prefill(cache, all_logits)
        valid_np = valid.numpy().astype(bool)
        counts = valid_np.sum(axis=1)
        if (counts == 0).any():
            raise InputError("every prompt row needs at least one valid token")
        width = int(counts.max())
        ids_np = ids.numpy()
        right = np.zeros((len(counts), width), np.int64)
        token_valid = np.zeros((len(counts), width), bool)
        for b, n in enumerate(counts):  # left padding -> right padding
            right[b, :n] = ids_np[b, valid_np[b]]
            token_valid[b, :n] = True
        positions = np.tile(np.arange(width, dtype=np.int64), (len(counts), 1))
        chunk = self.prefill_chunk
        # Chunks only when every row is full in every chunk (the kernel infers each row's past length from its
        # seqlens_k and the chunk width) and no stats are wanted (a norm ratio over the prompt is not a mean of
        # per-chunk ratios). Same math as one pass; each chunk attends only to what it can see.
        if want_stats or chunk is None or width <= chunk or (counts != width).any():
            return self._run_gqa(right, positions, token_valid, counts, cache, skip, scales, want_stats)
        for start in range(0, width, chunk):
            part = slice(start, start + chunk)
            n = min(chunk, width - start)
            out = self._run_gqa(right[:, part], positions[:, part], token_valid[:, part], np.full(len(counts), n),
                                cache, skip, scales, want_stats=False)
        return out

    def decode(self, tokens: torch.Tensor, cache: GqaKVCache, skip: torch.Tensor, scales: torch.Tensor,
               want_stats: bool = True) -> StepOutput:
        ids = tokens.numpy().astype(np.int64).reshape(-1, 1)
        ones = np.ones(len(ids), np.int64)
        return self._run_gqa(ids, cache.lengths[:, None].copy(), np.ones_like(ids, dtype=bool), ones, cache, skip,
                             scales, want_stats)

    # -- slots: a cache as a pool of independent rows (the serving scheduler) ----------------------------------------
    supports_slots = True

    def prefill_slot(self, slot: int, ids: torch.Tensor, cache: GqaKVCache, skip: torch.Tensor,
                     scales: torch.Tensor) -> StepOutput:
        """Appends a chunk of one request's prompt (ids [T]) to its slot, after what the slot holds already (an
        earlier chunk, or nothing). The kernel reads the slot's past length from seqlens_k and the chunk width, so
        chunks of any size give the logits of one pass. Returns the chunk's last-token logits [1, vocab]."""
        if not 0 <= slot < cache.slots:
            raise InputError(f"slot {slot} is outside the pool of {cache.slots}")
        n = int(ids.numel())
        if n < 1:
            raise InputError("a prefill chunk needs at least one token")
        start = int(cache.lengths[slot])
        return self._run_gqa(ids.numpy().astype(np.int64).reshape(1, n), np.arange(start, start + n)[None],
                             np.ones((1, n), bool), np.array([n]), cache, skip, scales, want_stats=False,
                             rows=(slot, slot + 1))

    def decode_slots(self, slots: list[int], tokens: torch.Tensor, cache: GqaKVCache, skip: torch.Tensor,
                     scales: torch.Tensor, want_stats: bool = True) -> StepOutput:
        """One decode step for the rows in `slots` (any order, any subset of the pool); outputs in `slots` order.

        The forward runs over the contiguous range of slots they span (a view of every buffer). A slot inside that
        range that is not decoding (free, or between prefill chunks) rides along as a filler row: it writes one
        position at its current length, which its next token or chunk overwrites, and its length does not move."""
        if len(set(slots)) != len(slots) or not slots:
            raise InputError(f"decode_slots needs distinct slots; got {slots}")
        first, stop = min(slots), max(slots) + 1
        if first < 0 or stop > cache.slots:
            raise InputError(f"slots {slots} are outside the pool of {cache.slots}")
        width = stop - first
        where = [s - first for s in slots]
        ids = np.zeros((width, 1), np.int64)
        ids[where, 0] = tokens.numpy().astype(np.int64)
        # fillers take a decoding row's attention decisions (they agree across a forward) and skip every FFN, so a
        # conditional FFN that all decoding rows skip is not computed for the fillers' sake
        skip_all = skip[:1].expand(width, -1).clone()
        skip_all[:, 1::2] = True
        scales_all = scales[:1].expand(width, -1).clone()
        skip_all[where], scales_all[where] = skip, scales
        saved = cache.lengths[first:stop].copy()
        lengths = np.minimum(saved, cache.capacity - 1)  # a filler never writes past its buffer
        lengths[where] = saved[where]
        cache.lengths[first:stop] = lengths
        try:
            return self._run_gqa(ids, lengths[:, None].copy(), np.ones((width, 1), bool), np.ones(width, np.int64),
                                 cache, skip_all, scales_all, want_stats, rows=(first, stop), select=where)
        finally:
            moved = cache.lengths[first:stop].copy()
            cache.lengths[first:stop] = saved
            cache.lengths[slots] = moved[where]

    def _run_gqa(self, ids, positions, token_valid, counts, cache: GqaKVCache, skip, scales,
                 want_stats: bool, rows: tuple[int, int] | None = None,
                 select: list[int] | None = None) -> StepOutput:
        """One forward over the slots `rows` (default: all); the outputs of its rows `select` (default: all), in
        that order."""
        first, stop = rows or (0, cache.slots)
        total = cache.lengths[first:stop] + counts
        if int(total.max()) > cache.capacity:
            raise InputError(f"KV cache holds {cache.capacity} positions; {int(total.max())} requested")
        skip_np = self._check_skip(skip)
        feeds = {"input_ids": ids, "position_ids": positions, "token_valid": token_valid,
                 "seqlens_k": (total - 1).astype(np.int32),
                 "total_sequence_length": np.array(int(total.max()), np.int32),
                 "last_index": (counts - 1).astype(np.int64), "skip": skip_np,
                 "scale": np.ascontiguousarray(scales.numpy().astype(np.float32)), "want_stats": np.array(want_stats)}
        binding, held, results = cache.bindings.get((first, stop), (None, {}, {}))
        if binding is None:  # KV buffers and outputs are bound once per request (or range of slots), not every step
            binding = self.session.io_binding()
            cache.bindings[first, stop] = binding, held, results
            for name, (dtype, width) in self.step_outputs.items():
                if name not in cache.outputs:
                    cache.outputs[name] = np.empty((cache.slots, width), dtype)
                results[name] = array = cache.outputs[name][first:stop]  # contiguous: whole rows
                binding.bind_output(name, "cpu", 0, dtype, list(array.shape), array.ctypes.data)
            for i in self.kv_layers:  # past and present are the same memory: the kernel appends in place
                for kind, buf in (("key", cache.k[i][first:stop]), ("value", cache.v[i][first:stop])):
                    binding.bind_cpu_input(f"past_{kind}_{i}", buf)
                    binding.bind_output(f"present_{kind}_{i}", "cpu", 0, buf.dtype, list(buf.shape),
                                        buf.ctypes.data)
        for name, value in feeds.items():
            array = held.get(name)
            if array is not None and array.shape == np.shape(value) and array.dtype == value.dtype:
                np.copyto(array, value)  # the binding reads this array's memory: nothing to rebind
            else:
                held[name] = array = np.array(value, order="C")  # our own copy, so no caller's array is bound
                binding.bind_cpu_input(name, array)
        self.session.run_with_iobinding(binding)
        # the next run overwrites the bound arrays: the caller gets its own logits (picking rows copies them; the
        # stats are copied in _step_output)
        pick = slice(None) if select is None else select
        logits = results["logits"].copy() if select is None else results["logits"][select]
        out = {"logits": logits, "similarity": results["similarity"][pick], "norm_ratio": results["norm_ratio"][pick]}
        cache.lengths[first:stop] = total
        if rows is None:
            cache.length += ids.shape[1]
        return self._step_output(out, skip_np[pick])
