"""adaskip-bench: time to first token and per-token decode time, side by side, at several context lengths
(adaskip/eval/bench.py: the columns and how they are measured)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaskip.cli.common import ArgumentParser, HelpFormatter, defaults, int_list, joined, main_wrapper, word_list
from adaskip.eval.bench import BenchOptions, run_bench, write_outputs
from adaskip.eval.bench import __doc__ as bench_doc


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adaskip-bench", formatter_class=HelpFormatter,
                                description=bench_doc.split("\n\n")[0])
    d = defaults(BenchOptions)
    p.add_argument("--model", default=d.model)
    p.add_argument("--contexts", default=joined(d.contexts), help="prompt lengths (each plus the decode tokens "
                   "must fit the model's context)")
    p.add_argument("--budgets", default=joined(d.budgets), help="AdaSkip K values (e2e plans)")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--calibration", help="take calibration stats from this plan.json instead of calibrating")
    p.add_argument("--calib-prompts", type=int, default=d.calib_prompts)
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    p.add_argument("--int4", action="store_true", help="add int4 columns (ours and onnxruntime-genai)")
    p.add_argument("--int8-kv", action="store_true", help="add our engines with an int8 KV cache: ort-kv8, and with "
                   "--int4 ort-int4-kv8 (scales fitted as adaskip-build --kv-dtype int8 fits them)")
    p.add_argument("--fp16-kv", action="store_true", help="with --decode-kernels: add ort-kv16-dk (and "
                   "ort-kv16-dk-spin): a float16 KV cache, as llama.cpp keeps by default, on the decode kernels")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-genai", action="store_true")
    p.add_argument("--no-spinning-pair", dest="spinning_pair", action="store_false",
                   help="leave out the -spin columns (ours and onnxruntime-genai's engines with intra-op spinning "
                   "on; the int4 ones too with --int4)")
    p.add_argument("--no-llamacpp", action="store_true", help="leave out the llama.cpp columns (they run when "
                   "llama-cpp-python is installed)")
    p.add_argument("--llamacpp-types", default=joined(d.llamacpp_types), help="GGUF types of the llama.cpp columns, "
                   "converted from the same weights")
    p.add_argument("--llamacpp-convert", help="llama.cpp's convert_hf_to_gguf.py (default: the one in the sdist of "
                   "the installed llama-cpp-python, fetched once with pip)")
    p.add_argument("--cpp-runtime", metavar="PATH", help="cpp/runtime's adaskip_generate (docs/cpp-runtime.md): adds "
                   "ort-cpp, ort-spin-cpp (and with --int4 / --int8-kv ort-int4-cpp, ort-kv8-cpp, ...): the same "
                   "engines driven by the C++ runtime's loop")
    p.add_argument("--decode-kernels", metavar="LIB", help="cpp/ortops's libadaskip_ortops.so (docs/benchmarks.md): "
                   "adds ort-dk, ort-dk-spin (and with --int4 ort-int4-dk, ort-int4-dk-spin): the same engines with "
                   "their decode attention on that library's kernel")
    p.add_argument("--out", default="docs", help="folder for benchmarks.md/.json/.png")
    return p


def options(a: argparse.Namespace) -> BenchOptions:
    return BenchOptions(model=a.model, contexts=int_list(a.contexts, "--contexts"),
                        budgets=int_list(a.budgets, "--budgets"), repeats=a.repeats, decode_tokens=a.decode_tokens,
                        threads=a.threads, calibration=a.calibration, calib_prompts=a.calib_prompts,
                        calib_tokens=a.calib_tokens, int4=a.int4, int8_kv=a.int8_kv, fp16_kv=a.fp16_kv,
                        hf=not a.no_hf,
                        genai=not a.no_genai, spinning_pair=a.spinning_pair, llamacpp=not a.no_llamacpp,
                        llamacpp_types=word_list(a.llamacpp_types), llamacpp_convert=a.llamacpp_convert,
                        cpp_runtime=a.cpp_runtime, decode_kernels=a.decode_kernels)


@main_wrapper("adaskip-bench")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    print(write_outputs(run_bench(options(a)), Path(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
