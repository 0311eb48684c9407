"""Optimization profiles from trtllm-build-style limits.

The graph's dynamic axes carry names (adaskip/export/onnx/graph.py): `batch`, `seq` (the tokens of this forward) and
`past` (the KV buffer the runtime passes in). Prefill runs T prompt tokens over an empty buffer (past = 0); decode
runs one token over the whole buffer (past = the request's capacity, prompt + new tokens).

* `split` (default): two profiles, `prefill` (seq 1..max_input_len, past 0) and `decode` (seq 1, past
  1..max_seq_len). Each phase gets kernels chosen and specialised for its own shapes (a decode step is a matrix-vector
  product, prefill a matrix product), at the price of building the network twice and of one execution context per
  profile at run time.
* `combined`: one profile covering both (seq 1..max_input_len, past 0..max_seq_len): one compile pass instead of
  two (SmolLM2: ~55 s instead of ~75 s here) and one execution context; the kernels are tuned for one opt shape.

opt points: batch 1 (a single request is the common case), half the maximum for seq and past.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adaskip.errors import InputError, check_choice
from adaskip.runtime.trt.lib import TensorRTError

PROFILE_MODES = ("split", "combined")
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_INPUT = 2048
DEFAULT_MAX_SEQ = 4096
Range = tuple[int, int, int]  # (min, opt, max)


def check_profile_mode(mode: str) -> None:
    check_choice(mode, PROFILE_MODES, "--profiles")


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int

    @classmethod
    def resolve(cls, max_batch_size: int | None, max_input_len: int | None, max_seq_len: int | None,
                context: int) -> "Limits":
        """Fill defaults from the model's context and check the limits against it (before any heavy work)."""
        seq = max_seq_len if max_seq_len is not None else min(DEFAULT_MAX_SEQ, context)
        inp = max_input_len if max_input_len is not None else min(DEFAULT_MAX_INPUT, seq)
        batch = max_batch_size if max_batch_size is not None else DEFAULT_MAX_BATCH
        for flag, value in (("--max-batch-size", batch), ("--max-input-len", inp), ("--max-seq-len", seq)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1; got {value}")
        if seq > context:
            raise InputError(f"--max-seq-len {seq} exceeds the model's context of {context} tokens")
        if inp > seq:
            raise InputError(f"--max-input-len {inp} exceeds --max-seq-len {seq} (a prompt must fit in the sequence)")
        return cls(batch, inp, seq)


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[list[int], list[int], list[int]]]  # input -> (min, opt, max) shapes

    def to_dict(self) -> dict[str, Any]:
        shapes = {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.shapes.items()}
        return {"name": self.name, "shapes": shapes}


def axis_ranges(limits: Limits, phase: str) -> dict[str, Range]:
    """(min, opt, max) of each named axis in one profile."""
    half_in, half_seq = max(1, limits.max_input_len // 2), max(1, limits.max_seq_len // 2)
    batch = (1, 1, limits.max_batch_size)
    if phase == "prefill":
        return {"batch": batch, "seq": (1, half_in, limits.max_input_len), "past": (0, 0, 0)}
    if phase == "decode":
        return {"batch": batch, "seq": (1, 1, 1), "past": (1, half_seq, limits.max_seq_len)}
    if phase == "combined":
        return {"batch": batch, "seq": (1, half_in, limits.max_input_len), "past": (0, half_seq, limits.max_seq_len)}
    raise ValueError(phase)


def make_profiles(input_axes: dict[str, list[int | str]], limits: Limits, mode: str) -> list[Profile]:
    """input_axes: each graph input's dims, an int or the dynamic axis name (from the ONNX graph)."""
    check_profile_mode(mode)
    phases = ["prefill", "decode"] if mode == "split" else ["combined"]
    profiles = []
    for phase in phases:
        ranges = axis_ranges(limits, phase)
        shapes = {}
        for name, dims in input_axes.items():
            if all(isinstance(d, int) for d in dims):
                continue  # static (e.g. the want_stats scalar): no range to give
            unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
            if unknown:
                raise TensorRTError(f"graph input {name} has dynamic axis {unknown[0]!r}, which the TensorRT builder "
                                    f"has no range for (known: {', '.join(ranges)}); was it exported as the "
                                    f"portable variant?")
            shapes[name] = tuple([d if isinstance(d, int) else ranges[d][k] for d in dims] for k in range(3))
        profiles.append(Profile(phase, shapes))
    return profiles
