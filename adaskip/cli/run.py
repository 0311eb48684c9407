"""adaskip-run: generate with an engine directory, with adaptive sublayer skipping."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaskip.cli.common import ArgumentParser, HelpFormatter, defaults, main_wrapper
from adaskip.errors import InputError
from adaskip.runtime.generate import TRUNCATE_MODES, GenerationResult, SamplingParams
from adaskip.runtime.loader import load_runtime


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adaskip-run", description="Generate text with an adaskip engine directory.",
                                formatter_class=HelpFormatter)
    p.add_argument("--engine", required=True, help="engine directory written by adaskip-build")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", action="append", default=[], help="read a prompt from a file; repeatable")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    d = defaults(SamplingParams)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop", action="append", default=list(d.stop_strings), help="stop string; repeatable")
    p.add_argument("--truncate", choices=TRUNCATE_MODES, default=d.truncate,
                   help="prompt over the context: fail, or keep its beginning and end")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    p.add_argument("--json", action="store_true", help="print results as JSON (one object per prompt)")
    p.add_argument("--threads", type=int, help="intra-op threads for the ONNX Runtime backend (default: all cores)")
    p.add_argument("--spinning", action="store_true", default=None,
                   help="ONNX Runtime backend: intra-op threads spin between kernels instead of sleeping (faster "
                   "decode when this process has the cores to itself; default: ADASKIP_SPINNING, else off)")
    return p


def _summary_line(r: GenerationResult) -> str:
    s = r.summary()
    return (f"[adaskip] TTFT {s['ttft_s'] * 1000:.0f} ms | decode {s['decode_tokens_per_s']:.1f} tok/s | "
            f"prompt {s['prompt_tokens']} + {s['new_tokens']} new ({s['finish_reason']}) | skipped: prefill "
            f"{len(s['prefill_skipped'])}, decode {len(s['decode_skipped_offline'])} offline + "
            f"{len(s['decode_skipped_online'])} online | KV saved {s['kv_bytes_saved'] / 2**20:.1f} MiB "
            f"of {(s['kv_bytes'] + s['kv_bytes_saved']) / 2**20:.1f} MiB")


def _excerpt(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[:width - 3] + "...")


def sampling(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          seed=a.seed, stop_strings=tuple(a.stop), truncate=a.truncate)


@main_wrapper("adaskip-run")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    texts = list(a.prompt)
    for f in a.prompt_file:
        try:
            texts.append(Path(f).read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"cannot read prompt file {f}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"prompt file {f} is not UTF-8 text") from None
    if not texts:
        raise InputError("give at least one --prompt or --prompt-file")
    if a.stream and len(texts) > 1:
        raise InputError("--stream prints one prompt's tokens; give a single prompt")
    params = sampling(a)
    params.validate()
    rt = load_runtime(a.engine, threads=a.threads, spinning=a.spinning)
    ids = [rt.generator.encode(t, chat=a.chat) for t in texts]
    results: list[GenerationResult] = []
    if a.stream:
        for event in rt.generator.stream(ids, params, results):
            if not a.json:
                print(event.text, end="", flush=True)
        if not a.json:
            print()
    else:
        results = rt.generator.generate(ids, params)
    for n, r in enumerate(results, 1):
        if a.json:
            print(json.dumps({"text": r.text, **r.summary()}))
        else:
            if len(results) > 1:  # a batch: say which prompt each answer and summary line belong to
                print(f"{'' if n == 1 else chr(10)}=== prompt {n} of {len(results)}: {_excerpt(texts[n - 1])}")
            if not a.stream:
                print(r.text)
            print(_summary_line(r), file=sys.stderr if a.stream else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
