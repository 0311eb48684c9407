"""The `tensorrt` runtime backend: a serialized TensorRT engine behind the Engine protocol (needs an NVIDIA GPU).

Same graph interface as the portable graph on ONNX Runtime (adaskip/runtime/ort_engines.py): the KV cache is a caller-owned
buffer per live attention layer, here on the GPU ([B, kv_heads, head_dim, capacity] keys, [B, kv_heads, capacity,
head_dim] values, plus a validity mask); prefill passes an empty view of it, decode the whole buffer, and the engine
returns only the new tokens' K/V, which are written into the buffer in place. The skip mask, scales and want_stats
are inputs of every forward. Each optimization profile gets its own execution context: prefill forwards run in the
`prefill` one, decode steps in the `decode` one (or both in `combined`).

Not executed in this project's CI (no GPU there); the build side is (adaskip/export/tensorrt/builder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaskip.errors import EngineDirError, InputError
from adaskip.model.spec import ModelSpec
from adaskip.runtime.engine import StepOutput
from adaskip.runtime.graph_engine import GraphEngine, kv_layers_of
from adaskip.runtime.trt.lib import TensorRTError, errors_of, load_tensorrt
from adaskip.runtime.trt.plugin import register_plugin
from adaskip.runtime.trt.profiles import Limits


class TrtKVCache:
    def __init__(self, spec: ModelSpec, batch: int, capacity: int, layers: list[int], device: torch.device):
        kvh, hd = spec.num_kv_heads, spec.head_dim
        self.k = {i: torch.zeros(batch, kvh, hd, capacity, device=device) for i in layers}  # transposed keys
        self.v = {i: torch.zeros(batch, kvh, capacity, hd, device=device) for i in layers}
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = np.zeros(batch, np.int64)
        self.capacity = capacity
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    @property
    def cached_layers(self) -> list[int]:
        return sorted(self.k)


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise TensorRTError("the tensorrt backend runs its engine on an NVIDIA GPU, and torch sees none here "
                            "(torch.cuda.is_available() is False); run this engine on a GPU machine, or build an "
                            "ort engine for CPU")


class TrtEngine(GraphEngine):

    def __init__(self, engine_path: str | Path, spec: ModelSpec, info: dict[str, Any]):
        env = load_tensorrt()
        if info.get("flavour") != env.flavour:
            raise EngineDirError(f"{engine_path} was built with {info.get('flavour')} {info.get('version')}; this "
                                 f"machine has {env.flavour} {env.version}: rebuild the engine here")
        require_gpu()
        trt = self.trt = env.trt
        register_plugin(env)  # Python plugins are not serialized into the engine: the creator must be registered
        self.spec = spec
        self.limits = Limits(**info["limits"])
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        with env.logger.capture() as messages:
            self.runtime = trt.Runtime(env.logger)
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise EngineDirError(f"{env.flavour} {env.version} cannot load {engine_path}: "
                                     + "; ".join(errors_of(messages) or ["(no message)"]))
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            self.contexts = {}
            for k, profile in enumerate(info["profiles"]):
                ctx = self.engine.create_execution_context()
                if ctx is None or not ctx.set_optimization_profile_async(k, self.stream.cuda_stream):
                    raise TensorRTError(f"cannot create an execution context for profile {profile['name']}: "
                                        + "; ".join(errors_of(messages) or ["(no message)"]))
                self.contexts[profile["name"]] = ctx
        self.stream.synchronize()
        self.kv_layers = kv_layers_of(self.inputs)
        self._logger = env.logger

    @classmethod
    def from_engine_dir(cls, ed: Any, threads: int | None = None) -> "TrtEngine":
        info = ed.manifest["build"].get("tensorrt")
        if not isinstance(info, dict) or "engine" not in info:
            raise EngineDirError(f"{ed.root}: manifest has no TensorRT build record; rebuild the engine")
        return cls(ed.root / info["engine"], ed.spec, info)

    def _make_cache(self, batch: int, capacity: int) -> TrtKVCache:
        if batch > self.limits.max_batch_size:
            raise InputError(f"the engine was built for batches of up to {self.limits.max_batch_size} prompts "
                             f"(--max-batch-size); got {batch}")
        if capacity > self.limits.max_seq_len:
            raise InputError(f"prompt + new tokens need {capacity} positions; the engine was built for "
                             f"{self.limits.max_seq_len} (--max-seq-len)")
        return TrtKVCache(self.spec, batch, capacity, self.kv_layers, self.device)

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, cache: TrtKVCache, skip: torch.Tensor,
                scales: torch.Tensor, all_logits: bool = False, want_stats: bool = True) -> StepOutput:
        self._check_prefill(cache, all_logits)
        if ids.shape[1] > self.limits.max_input_len:
            raise InputError(f"the prompt batch is {ids.shape[1]} tokens wide; the engine was built for "
                             f"{self.limits.max_input_len} (--max-input-len)")
        valid_np = valid.numpy().astype(bool)
        positions = self._prompt_positions(cache.next_pos, valid_np)
        return self._run("prefill", ids.numpy().astype(np.int64), positions, valid_np, cache, skip,
                         scales, past_len=0, want_stats=want_stats)

    def decode(self, tokens: torch.Tensor, cache: TrtKVCache, skip: torch.Tensor, scales: torch.Tensor,
               want_stats: bool = True) -> StepOutput:
        ids = tokens.numpy().astype(np.int64).reshape(-1, 1)
        return self._run("decode", ids, cache.next_pos[:, None].copy(), np.ones_like(ids, dtype=bool), cache, skip,
                         scales, past_len=cache.capacity, want_stats=want_stats)

    def _run(self, phase: str, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, cache: TrtKVCache,
             skip: torch.Tensor, scales: torch.Tensor, past_len: int, want_stats: bool) -> StepOutput:
        seq = ids.shape[1]
        start = cache.length
        if start + seq > cache.capacity:
            raise InputError(f"KV cache holds {cache.capacity} positions; {start + seq} requested")
        skip_np = self._check_skip(skip)
        ctx = self.contexts.get(phase) or self.contexts["combined"]
        dev = self.device
        self.stream.wait_stream(torch.cuda.current_stream(dev))  # the cache was zeroed on the default stream
        with torch.cuda.stream(self.stream), self._logger.capture() as messages:
            feeds = {"input_ids": torch.from_numpy(ids).to(dev), "position_ids": torch.from_numpy(positions).to(dev),
                     "token_valid": torch.from_numpy(valid).to(dev), "past_valid": cache.valid[:, :past_len],
                     "skip": torch.from_numpy(skip_np).to(dev), "scale": scales.float().to(dev).contiguous(),
                     "want_stats": torch.tensor(bool(want_stats), device=dev)}
            for i in self.kv_layers:  # the whole buffer (decode) or an empty view of it (prefill): bound, not copied
                feeds[f"past_key_{i}"] = cache.k[i] if past_len else cache.k[i][..., :0]
                feeds[f"past_value_{i}"] = cache.v[i] if past_len else cache.v[i][:, :, :0]
            for name in self.inputs:
                t = feeds[name]
                if not t.is_contiguous() and t.numel():
                    t = feeds[name] = t.contiguous()
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise InputError(f"input {name} of shape {tuple(t.shape)} is outside the engine's {phase} "
                                     f"profile: " + "; ".join(errors_of(messages)))
                ctx.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)),
                                         device=dev)
                ctx.set_tensor_address(name, outs[name].data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTError("TensorRT failed to run the engine: " + "; ".join(errors_of(messages)))
            for i in self.kv_layers:  # write only the new tokens into the buffer
                cache.k[i][..., start:start + seq].copy_(outs[f"new_key_{i}"])
                cache.v[i][:, :, start:start + seq].copy_(outs[f"new_value_{i}"])
            cache.valid[:, start:start + seq] = feeds["token_valid"]
            host = {n: outs[n].float().cpu().numpy() for n in ("logits", "similarity", "norm_ratio")}
        self.stream.synchronize()
        cache.length += seq
        cache.next_pos += valid.sum(axis=1)
        return self._step_output(host, skip_np)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    return table[dtype]
