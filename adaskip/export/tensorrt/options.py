"""TensorRTOptions: what adaskip-build's --backend tensorrt takes (in trtllm-build's spirit), its defaults and checks.

The limits default from the model's context, so they stay None here and are resolved (and checked against the
context) into TrtSettings (builder.py) once the model is known. Nothing here needs TensorRT installed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from adaskip.errors import InputError
from adaskip.runtime.trt.profiles import check_profile_mode

OPT_LEVELS = range(6)  # TensorRT's builder optimization levels


@dataclass
class TensorRTOptions:
    max_batch_size: int | None = None  # None: profiles.DEFAULT_MAX_BATCH
    max_input_len: int | None = None  # None: min(DEFAULT_MAX_INPUT, max_seq_len)
    max_seq_len: int | None = None  # None: min(DEFAULT_MAX_SEQ, the model's context)
    profiles: str = "split"  # "split" (prefill + decode profiles) or "combined" (one); profiles.py
    timing_cache: str | None = None  # file read before and updated after the build (full TensorRT)
    builder_opt_level: int | None = None  # None: TensorRT's default (3)

    def given(self) -> list[str]:
        """The flags set away from their defaults (each field is its flag: max_seq_len -> --max-seq-len)."""
        return ["--" + f.name.replace("_", "-") for f in fields(self) if getattr(self, f.name) != f.default]

    def validate(self) -> None:
        """What can be refused without the model or TensorRT (the limits are checked when resolved)."""
        check_profile_mode(self.profiles)
        if self.builder_opt_level is not None and self.builder_opt_level not in OPT_LEVELS:
            raise InputError(f"--builder-opt-level must be between {OPT_LEVELS[0]} and {OPT_LEVELS[-1]}; "
                             f"got {self.builder_opt_level}")

    def record(self) -> dict[str, Any]:
        """The manifest's build options (flat keys, as engine directories have always recorded them)."""
        return {"max_batch_size": self.max_batch_size, "max_input_len": self.max_input_len,
                "max_seq_len": self.max_seq_len, "trt_profiles": self.profiles, "timing_cache": self.timing_cache,
                "builder_opt_level": self.builder_opt_level}
