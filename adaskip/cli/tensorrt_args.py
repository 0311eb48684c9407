"""adaskip-build's flags for --backend tensorrt (in trtllm-build's spirit), filling TensorRTOptions."""

from __future__ import annotations

import argparse
from dataclasses import fields

from adaskip.cli.common import defaults
from adaskip.export.tensorrt.options import OPT_LEVELS, TensorRTOptions
from adaskip.runtime.trt.profiles import DEFAULT_MAX_BATCH, DEFAULT_MAX_INPUT, DEFAULT_MAX_SEQ, PROFILE_MODES


def add_tensorrt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensorrt backend", "optimization profiles and builder settings (--backend tensorrt)")
    unset = argparse.SUPPRESS  # defaults depend on the model: described in the help, resolved at build time
    g.add_argument("--max-batch-size", type=int, default=unset, help=f"largest batch (default {DEFAULT_MAX_BATCH})")
    g.add_argument("--max-input-len", type=int, default=unset,
                   help=f"longest prompt (default min({DEFAULT_MAX_INPUT}, --max-seq-len))")
    g.add_argument("--max-seq-len", type=int, default=unset,
                   help=f"longest prompt + generated tokens, the KV capacity (default min({DEFAULT_MAX_SEQ}, context))")
    g.add_argument("--profiles", choices=PROFILE_MODES, default=defaults(TensorRTOptions).profiles,
                   help="split: one profile for prefill shapes and one for decode shapes; combined: one for both "
                        "(one compile pass instead of two)")
    g.add_argument("--timing-cache", metavar="FILE", default=unset,
                   help="timing cache read before and updated after the build (full TensorRT; TensorRT-RTX has none)")
    g.add_argument("--builder-opt-level", type=int, choices=OPT_LEVELS,
                   metavar=f"{OPT_LEVELS[0]}-{OPT_LEVELS[-1]}", default=unset,
                   help="TensorRT builder optimization level (default: TensorRT's, 3)")


def tensorrt_options(a: argparse.Namespace) -> TensorRTOptions:
    """The flags given (the unset ones keep TensorRTOptions' defaults); each field is the flag of its name."""
    return TensorRTOptions(**{f.name: getattr(a, f.name) for f in fields(TensorRTOptions) if hasattr(a, f.name)})
