"""adaskip-serve: `--engine DIR` serves an engine directory over the OpenAI API on the in-flight batching scheduler
(adaskip/cli/serve_openai.py); `--repo DIR` serves a model repository written by `adaskip-deploy triton` with the
bundled tritonserver."""

from __future__ import annotations

import argparse
import sys

from adaskip.cli import serve_openai
from adaskip.cli.common import ArgumentParser, HelpFormatter, main_wrapper
from adaskip.deploy.serve import ADMIN_HEADER, ALL_APIS, RESTRICTED_APIS, ServeOptions, serve


def parser() -> argparse.ArgumentParser:
    d = ServeOptions(repo="")
    p = ArgumentParser(prog="adaskip-serve", formatter_class=HelpFormatter,
                                description="Serve a model repository written by `adaskip-deploy triton` with the "
                                            "Triton Inference Server bundled in nvidia-pytriton, restarting it if it "
                                            "crashes. `adaskip-serve --engine DIR` serves an engine directory over "
                                            "the OpenAI API instead (`adaskip-serve --engine DIR --help`).")
    p.add_argument("--repo", required=True, help="model repository")
    p.add_argument("--address", default=d.address, help="address every endpoint binds to")
    p.add_argument("--http-port", type=int, default=d.http_port)
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout, help="seconds to wait for every model to load")
    p.add_argument("--restrict-api", default=",".join(RESTRICTED_APIS), metavar="APIS",
                   help=f"comma-separated Triton API groups that need the admin header ({', '.join(ALL_APIS)}), or "
                        f"'none'")
    p.add_argument("--admin-key", default=None,
                   help=f"value of the {ADMIN_HEADER} header the restricted APIs "
                        f"need (default: a random key nobody else knows)")
    p.add_argument("--max-restarts", type=int, default=d.max_restarts,
                   help=f"restarts of a crashed server within {d.restart_window_s:.0f} s before giving up")
    p.add_argument("--verbose", action="store_true", help="verbose server log")
    p.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                   help="extra tritonserver argument, e.g. --triton-arg=--exit-timeout-secs=10; repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a == "--engine" or a.startswith("--engine=") for a in args):
        return serve_openai.main(args)
    if not any(a in ("-h", "--help", "--repo") or a.startswith("--repo=") for a in args):
        print("adaskip-serve: error: give --engine DIR (OpenAI API server) or --repo DIR (Triton model repository) "
              "(see adaskip-serve --help)", file=sys.stderr)
        return 2
    return triton_main(args)


@main_wrapper("adaskip-serve")
def triton_main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    apis = () if a.restrict_api.strip() == "none" else tuple(x.strip() for x in a.restrict_api.split(",") if x.strip())
    opts = ServeOptions(repo=a.repo, address=a.address, http_port=a.http_port, grpc_port=a.grpc_port,
                        metrics_port=a.metrics_port, ready_timeout=a.ready_timeout, verbose=a.verbose,
                        triton_args=a.triton_arg, restricted_apis=apis, max_restarts=a.max_restarts)
    if a.admin_key is not None:
        opts.admin_key = a.admin_key
    return serve(opts)


if __name__ == "__main__":
    sys.exit(main())
