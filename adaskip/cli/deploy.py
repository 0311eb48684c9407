"""adaskip-deploy: turn an engine dir into something a serving system runs (today: a Triton model repository)."""

from __future__ import annotations

import argparse
import sys

from adaskip.cli.common import ArgumentParser, HelpFormatter, defaults, main_wrapper
from adaskip.deploy.triton_repo import ENGINE_MODES, TritonModelOptions, batching, write_model_repository


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adaskip-deploy", description="Deploy an adaskip engine dir to a serving system.")
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    t = sub.add_parser("triton", formatter_class=HelpFormatter,
                       help="write a Triton Inference Server model repository (Python backend)",
                       description="Add a Python-backend model that serves ENGINE to the Triton model repository "
                                   "REPO (created if missing). Serve it with `adaskip-serve --repo REPO`.")
    d = defaults(TritonModelOptions)
    t.add_argument("--engine", required=True, help="engine directory written by adaskip-build")
    t.add_argument("--repo", required=True, help="model repository to write or add to")
    t.add_argument("--model-name", default=d.name, help="the model's name in the repository")
    t.add_argument("--instances", type=int, default=d.instances,
                   help="model instances (processes), each with its own copy of the engine in memory")
    t.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="most requests Triton's dynamic batcher hands the model at once (static batching: one "
                        "generation batch); 0 = no batch dimension")
    t.add_argument("--queue-delay-us", type=int, default=d.queue_delay_us,
                   help="how long the dynamic batcher waits for more requests before it hands them over")
    t.add_argument("--max-queue-size", type=int, default=d.max_queue_size,
                   help="requests waiting for a KV slot (in-flight batching) or in the dynamic batcher's queue; more "
                        "are refused at once (UNAVAILABLE)")
    t.add_argument("--max-input-bytes", type=int, default=d.max_input_bytes,
                   help="largest text_input accepted, checked before tokenizing (0: 32 bytes per context token)")
    t.add_argument("--decoupled", action="store_true",
                   help="decoupled transaction policy: token streaming over a gRPC stream or HTTP generate_stream "
                        "(HTTP infer refuses such models)")
    g = t.add_argument_group("in-flight batching (engines with KV slots: the `ort` graph variant)")
    g.add_argument("--slots", type=int, default=d.slots,
                   help="KV slots per instance: requests decoding or prefilling at once")
    g.add_argument("--slot-capacity", type=int, default=d.slot_capacity,
                   help="positions per slot, a request's prompt + max_tokens (0: the model's context, at most 2048)")
    g.add_argument("--step-tokens", type=int, default=d.step_tokens,
                   help="tokens per scheduler step: one per decoding request, the rest for prompt chunks")
    t.add_argument("--threads", type=int, default=d.threads,
                   help="ONNX Runtime threads per instance (0: ADASKIP_THREADS in the server's environment, or all "
                        "cores)")
    t.add_argument("--engine-mode", choices=ENGINE_MODES, default=d.engine_mode,
                   help="copy the engine into the model (hard links when on the same file system) or reference its "
                        "absolute path")
    t.add_argument("--python-env", default=d.python_env, metavar="auto|none|PATH",
                   help="EXECUTION_ENV_PATH for the backend stub: 'auto' = the virtualenv running this command")
    t.add_argument("--force", action="store_true", help="replace a model of the same name in the repository")
    return p


def options(a: argparse.Namespace) -> TritonModelOptions:
    return TritonModelOptions(name=a.model_name, instances=a.instances, max_batch_size=a.max_batch_size,
                              decoupled=a.decoupled, threads=a.threads, engine_mode=a.engine_mode,
                              python_env=a.python_env, queue_delay_us=a.queue_delay_us,
                              max_queue_size=a.max_queue_size, max_input_bytes=a.max_input_bytes,
                              slots=a.slots, slot_capacity=a.slot_capacity, step_tokens=a.step_tokens)


@main_wrapper("adaskip-deploy")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    opts = options(a)
    model = write_model_repository(a.engine, a.repo, opts, force=a.force)
    kind = "decoupled (streaming)" if opts.decoupled else "request/response"
    print(f"model {opts.name}: {model} -- {kind}, {opts.instances} instance(s), engine "
          f"{'copied' if opts.engine_mode == 'copy' else 'referenced'}; {batching(a.engine, opts)}")
    print(f"serve it: adaskip-serve --repo {model.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
