"""adaskip-serve: run the tritonserver that the nvidia-pytriton wheel bundles on a model repository.

The wheel ships the server binary, its shared libraries, the Python backend and one backend stub per Python version,
but no backends directory a plain `tritonserver` can use. We assemble one in a temporary directory (backend library,
its utils module, the stub for this Python), set LD_LIBRARY_PATH (this Python's LIBDIR first: the stub links
`libpython3.x.so` and must get the one this interpreter's standard library belongs to, then the wheel's libraries),
put this environment's bin/ first on PATH (the stub's embedded Python locates its environment from `python3` on PATH,
as an activated virtualenv would), start the server on 127.0.0.1, wait until it is ready, and forward SIGTERM/SIGINT.

Hardening (README "Security"): the shared-memory, model-repository (model control), trace and logging APIs are
restricted by default (Triton's --http-restricted-api / --grpc-restricted-protocol: a request must carry a header
only adaskip-serve knows), and the server is supervised: if it dies (tritonserver 2.51 crashes on some malformed
HTTP bodies, see docs/triton.md) it is restarted with a log line, a bounded number of times.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import secrets
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
from dataclasses import dataclass, field
from pathlib import Path

from adaskip.errors import AdaskipError, InputError
from adaskip.deploy.triton_repo import CONFIG


class ServeError(AdaskipError):
    """The server could not be started or did not become ready."""


# Triton API groups a client could misuse: registering (the Python backend's own) system shared-memory regions, loading
# or unloading models, tracing and log settings. Inference, health, metadata, model config and statistics stay open.
RESTRICTED_APIS = ("shared-memory", "model-repository", "trace", "logging")
ALL_APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics",
            "trace", "logging")
ADMIN_HEADER = "adaskip-admin-key"


@dataclass
class ServeOptions:
    repo: str
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout: float = 600.0  # seconds to wait for every model to load
    verbose: bool = False
    triton_args: list[str] = field(default_factory=list)
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS  # () opens every API
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16))  # the header value restricted APIs need
    max_restarts: int = 5  # restarts of a crashed server within restart_window_s; then adaskip-serve gives up
    restart_window_s: float = 600.0

    def validate(self) -> None:
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise InputError("--http-port, --grpc-port and --metrics-port must differ")
        unknown = sorted(set(self.restricted_apis) - set(ALL_APIS))
        if unknown:
            raise InputError(f"--restrict-api: unknown API group(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(ALL_APIS)} or 'none'")
        if not 0 <= self.max_restarts <= 1000:
            raise InputError(f"--max-restarts must be in 0..1000; got {self.max_restarts}")
        if not 0 < self.ready_timeout <= 86400:
            raise InputError(f"--ready-timeout must be in (0, 86400] seconds; got {self.ready_timeout}")
        if not self.admin_key.isalnum():
            raise InputError("--admin-key must be letters and digits only")


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


def server_command(dist: Path, repo: Path, backends: Path, o: ServeOptions, start: int = 0) -> list[str]:
    restricted = []
    if o.restricted_apis:
        apis = ",".join(o.restricted_apis)
        restricted = [f"--http-restricted-api={apis}:{ADMIN_HEADER}={o.admin_key}",
                      f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={o.admin_key}"]
    return [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        f"--http-address={o.address}", f"--http-port={o.http_port}",
        f"--grpc-address={o.address}", f"--grpc-port={o.grpc_port}",
        f"--metrics-address={o.address}", f"--metrics-port={o.metrics_port}",
        # a prefix of our own, per start: two servers on one machine, or a restarted server and the shared-memory
        # regions its crashed predecessor left behind, must not share the backend's regions
        f"--backend-config=python,shm-region-prefix-name=adaskip{os.getpid()}s{start}_",
        f"--log-verbose={1 if o.verbose else 0}",
        *restricted,
        *o.triton_args,
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


def ready_models(address: str, port: int, admin_key: str | None = None) -> list[str]:
    headers = {ADMIN_HEADER: admin_key} if admin_key else {}
    req = urllib.request.Request(f"http://{address}:{port}/v2/repository/index", data=b"{}", method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return [m["name"] for m in json.loads(r.read()) if m.get("state") == "READY"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return []


def serve(o: ServeOptions) -> int:
    """Run and supervise tritonserver on `o.repo` until it is stopped (SIGTERM/SIGINT) or gives up."""
    o.validate()
    repo = Path(o.repo).absolute()
    models = repo_models(repo)
    for what, port in (("http", o.http_port), ("grpc", o.grpc_port), ("metrics", o.metrics_port)):
        check_port_free(o.address, port, what)
    dist, libs = pytriton_dist()
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        print(f"adaskip-serve: warning: {sys.executable} is a static Python build; the backend stub will load the "
              f"system's libpython{sys.version_info.major}.{sys.version_info.minor}, which must be the same Python "
              f"release", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="adaskip-serve-"))
    try:
        backends = assemble_backends(dist, work / "backends")
        return _Supervisor(lambda n: server_command(dist, repo, backends, o, n), server_env(libs), o, models).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _log(msg: str, error: bool = False) -> None:
    print(f"adaskip-serve: {'error: ' if error else ''}{msg}", file=sys.stderr if error else sys.stdout, flush=True)


class _Supervisor:
    """Start tritonserver, wait until it is ready, restart it when it dies unasked (bounded), forward signals."""

    def __init__(self, command, env: dict[str, str], o: ServeOptions, models: list[str]):
        self.command, self.env, self.o, self.models = command, env, o, models
        self.signals = 0
        self.failed = 1  # adaskip-serve's exit status when a server never got ready
        self.proc: subprocess.Popen | None = None

    def _forward(self, signum, frame) -> None:  # first signal: graceful stop; a second one: kill
        self.signals += 1
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.signals == 1 else signal.SIGKILL)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        restarts: list[float] = []
        try:
            start = 0
            while True:
                rc = self._serve_once(start)
                if rc is None:
                    return self.failed
                if self.signals:  # asked to stop
                    return _status(rc)
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < self.o.restart_window_s] + [now]
                how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
                if len(restarts) > self.o.max_restarts:
                    _log(f"tritonserver exited with {how}; it failed {len(restarts)} times within "
                         f"{self.o.restart_window_s:.0f} s, not restarting it (see its log above)", error=True)
                    return _status(rc) or 1
                start += 1
                _log(f"tritonserver (pid {self.proc.pid}) exited with {how}; restarting it (restart {len(restarts)} "
                     f"of at most {self.o.max_restarts} within {self.o.restart_window_s:.0f} s)", error=True)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.proc is not None and self.proc.poll() is None:  # an exception above: never leave it behind
                self.proc.kill()
                self.proc.wait()

    def _serve_once(self, start: int) -> int | None:
        """One server process that got ready (or was asked to stop): its exit status once it ends. None when it
        did not get ready: it timed out (stopped) or exited first (a model cannot load: restarting would not help);
        self.failed then holds adaskip-serve's exit status."""
        o = self.o
        self.proc = subprocess.Popen(self.command(start), env=self.env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + o.ready_timeout
        while not self.signals:
            if self.proc.poll() is not None:
                self.failed = _status(self.proc.returncode) or 1
                _log(f"tritonserver exited with status {self.proc.returncode} (see its log above)", error=True)
                return None
            if http_ready(o.address, o.http_port):
                ready = ready_models(o.address, o.http_port, o.admin_key if o.restricted_apis else None)
                restricted = ", ".join(o.restricted_apis) or "none"
                _log(f"ready (tritonserver pid {self.proc.pid}): HTTP http://{o.address}:{o.http_port}  "
                     f"gRPC {o.address}:{o.grpc_port}  metrics http://{o.address}:{o.metrics_port}/metrics  "
                     f"models: {', '.join(ready or self.models)}  restricted APIs: {restricted}")
                break
            if time.monotonic() > deadline:
                _log(f"the server was not ready after {o.ready_timeout:.0f} s; stopping it", error=True)
                self._forward(signal.SIGTERM, None)
                self.proc.wait()
                return None
            time.sleep(0.25)
        return self.proc.wait()  # signals arriving meanwhile run `_forward` (and wait resumes, PEP 475)


def _status(rc: int) -> int:
    """A child's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return rc if rc >= 0 else 128 - rc
