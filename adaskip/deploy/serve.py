"""adaskip-serve: run the tritonserver that the nvidia-pytriton wheel bundles on a model repository.

The wheel ships the server binary, its shared libraries, the Python backend and one backend stub per Python version,
but no backends directory a plain `tritonserver` can use. We assemble one in a temporary directory (backend library,
its utils module, the stub for this Python), set LD_LIBRARY_PATH (this Python's LIBDIR first: the stub links
`libpython3.x.so` and must get the one this interpreter's standard library belongs to, then the wheel's libraries),
put this environment's bin/ first on PATH (the stub's embedded Python locates its environment from `python3` on PATH,
as an activated virtualenv would), start the server on 127.0.0.1, wait until it is ready, and forward SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from adaskip.cli.common import main_wrapper
from adaskip.errors import AdaskipError, InputError
from adaskip.deploy.triton_repo import CONFIG


class ServeError(AdaskipError):
    """The server could not be started or did not become ready."""


def pytriton_dist() -> tuple[Path, Path]:
    """(the wheel's tritonserver dir, its bundled shared libraries)."""
    spec = importlib.util.find_spec("pytriton")  # locate without importing pytriton itself
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("the Triton server is not installed: pip install 'adaskip[triton]' (nvidia-pytriton)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    dist, libs = pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").is_file() or not libs.is_dir():
        raise ServeError(f"{pkg} holds no bundled tritonserver (expected nvidia-pytriton 0.7.0)")
    return dist, libs


def assemble_backends(dist: Path, dest: Path) -> Path:
    """A backends dir with the Python backend and the stub for the running Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise ServeError(f"nvidia-pytriton ships Python backend stubs for {', '.join(have)}, not for Python {version}")
    python = dest / "python"
    python.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / f, python / f)
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return dest


def server_env(libs: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow a shared CPU down
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def repo_models(repo: Path) -> list[str]:
    if not repo.is_dir():
        raise InputError(f"--repo {repo}: no such directory (write one with `adaskip-deploy triton`)")
    models = sorted(p.name for p in repo.iterdir() if p.is_dir() and (p / CONFIG).is_file())
    if not models:
        raise InputError(f"--repo {repo} holds no model (no <model>/{CONFIG}); write one with `adaskip-deploy triton`")
    return models


def check_port_free(address: str, port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise InputError(f"--{what}-port must be in 1..65535; got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            raise InputError(f"{what} port {port} on {address} is not available ({e.strerror}); choose another "
                             f"--{what}-port") from None


def server_command(dist: Path, repo: Path, backends: Path, a: argparse.Namespace) -> list[str]:
    return [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        f"--http-address={a.address}", f"--http-port={a.http_port}",
        f"--grpc-address={a.address}", f"--grpc-port={a.grpc_port}",
        f"--metrics-address={a.address}", f"--metrics-port={a.metrics_port}",
        # a prefix of our own: two servers on one machine must not share the backend's shared-memory regions
        f"--backend-config=python,shm-region-prefix-name=adaskip{os.getpid()}_",
        f"--log-verbose={1 if a.verbose else 0}",
        *a.triton_arg,
    ]


def _die_with_parent() -> None:
    """Runs in the child before exec: the server gets SIGTERM if adaskip-serve dies without stopping it (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def http_ready(address: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ready_models(address: str, port: int) -> list[str]:
    req = urllib.request.Request(f"http://{address}:{port}/v2/repository/index", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return [m["name"] for m in json.loads(r.read()) if m.get("state") == "READY"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return []


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaskip-serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Serve a model repository written by `adaskip-deploy triton` with the "
                                            "Triton Inference Server bundled in nvidia-pytriton.")
    p.add_argument("--repo", required=True, help="model repository")
    p.add_argument("--address", default="127.0.0.1", help="address every endpoint binds to")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every model to load")
    p.add_argument("--verbose", action="store_true", help="verbose server log")
    p.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                   help="extra tritonserver argument, e.g. --triton-arg=--exit-timeout-secs=10; repeatable")
    return p


@main_wrapper("adaskip-serve")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    repo = Path(a.repo).absolute()
    models = repo_models(repo)
    if len({a.http_port, a.grpc_port, a.metrics_port}) != 3:
        raise InputError("--http-port, --grpc-port and --metrics-port must differ")
    for what, port in (("http", a.http_port), ("grpc", a.grpc_port), ("metrics", a.metrics_port)):
        check_port_free(a.address, port, what)
    dist, libs = pytriton_dist()
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        print(f"adaskip-serve: warning: {sys.executable} is a static Python build; the backend stub will load the "
              f"system's libpython{sys.version_info.major}.{sys.version_info.minor}, which must be the same Python "
              f"release", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="adaskip-serve-"))
    try:
        backends = assemble_backends(dist, work / "backends")
        return _run(server_command(dist, repo, backends, a), server_env(libs), a, models)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(cmd: list[str], env: dict[str, str], a: argparse.Namespace, models: list[str]) -> int:
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    signals = {"count": 0}

    def forward(signum, frame):  # first signal: graceful stop; a second one: kill
        signals["count"] += 1
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signals["count"] == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = time.monotonic() + a.ready_timeout
        while proc.poll() is None and not signals["count"]:
            if http_ready(a.address, a.http_port):
                ready = ready_models(a.address, a.http_port)
                print(f"adaskip-serve: ready (tritonserver pid {proc.pid}): HTTP http://{a.address}:{a.http_port}  "
                      f"gRPC {a.address}:{a.grpc_port}  metrics http://{a.address}:{a.metrics_port}/metrics  "
                      f"models: {', '.join(ready or models)}", flush=True)
                break
            if time.monotonic() > deadline:
                print(f"adaskip-serve: error: the server was not ready after {a.ready_timeout:.0f} s; stopping it",
                      file=sys.stderr, flush=True)
                forward(signal.SIGTERM, None)
                proc.wait()
                return 1
            time.sleep(0.25)
        rc = proc.wait()  # signals arriving meanwhile run `forward` (and wait resumes, PEP 475)
        if rc != 0 and not signals["count"]:
            print(f"adaskip-serve: error: tritonserver exited with status {rc} (see its log above)",
                  file=sys.stderr, flush=True)
        return rc if rc >= 0 else 128 - rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception above: never leave the server behind
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
