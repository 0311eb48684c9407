"""adaskip-serve --engine DIR: an OpenAI-compatible HTTP server (in-flight batching) for an engine directory.

Run it as `python -m adaskip.cli.serve_openai --engine DIR`; the `adaskip-serve` command takes it behind `--engine`
(the Triton launcher stays behind `--repo`).
"""

from __future__ import annotations

import argparse
import sys

from adaskip.cli.common import ArgumentParser, HelpFormatter, main_wrapper
from adaskip.deploy.openai_server import OpenAIServer, ServerOptions
from adaskip.runtime.scheduler import SchedulerOptions


def parser() -> argparse.ArgumentParser:
    d, s = ServerOptions(), SchedulerOptions()
    p = ArgumentParser(prog="adaskip-serve", formatter_class=HelpFormatter,
                                description="Serve an adaskip engine directory over the OpenAI API "
                                            "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) "
                                            "with in-flight batching and per-request adaptive skipping.")
    p.add_argument("--engine", required=True, help="engine directory written by adaskip-build (`ort` variant)")
    p.add_argument("--host", default=d.host, help="address to bind (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=d.port, help="port (0: any free port)")
    p.add_argument("--model-name", help="model id clients send (default: the engine directory's name)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    g = p.add_argument_group("scheduler")
    g.add_argument("--slots", type=int, default=s.slots, help="KV slots: requests in flight at once")
    g.add_argument("--slot-capacity", type=int, default=s.slot_capacity,
                   help="positions per slot (a request's prompt + max_tokens)")
    g.add_argument("--max-queue", type=int, default=s.max_queue,
                   help="requests waiting for a slot; more get HTTP 429")
    g.add_argument("--step-tokens", type=int, default=s.step_tokens,
                   help="tokens per step: one per decoding request, the rest for prompt chunks")
    g = p.add_argument_group("request limits")
    g.add_argument("--max-prompt-tokens", type=int, help="default: slot capacity - 1")
    g.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask (default: slot "
                                                        "capacity - 1)")
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    g.add_argument("--max-stop", type=int, default=d.max_stop, help="stop strings per request")
    g.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop string")
    p.add_argument("--log-level", default=d.log_level, choices=("critical", "error", "warning", "info", "debug"))
    return p


def options(a: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        engine_dir=a.engine, host=a.host, port=a.port, model_name=a.model_name, threads=a.threads,
        scheduler=SchedulerOptions(slots=a.slots, slot_capacity=a.slot_capacity, max_queue=a.max_queue,
                                   step_tokens=a.step_tokens),
        max_prompt_tokens=a.max_prompt_tokens, max_tokens_limit=a.max_tokens_limit,
        default_max_tokens=a.default_max_tokens, max_stop=a.max_stop, max_stop_chars=a.max_stop_chars,
        log_level=a.log_level)


@main_wrapper("adaskip-serve")
def main(argv: list[str] | None = None) -> int:
    server = OpenAIServer(options(parser().parse_args(argv)))
    print(f"adaskip-serve: serving {server.model_name!r} on http://{server.options.host}:{server.options.port} "
          f"({server.options.scheduler.slots} slots)", file=sys.stderr)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
