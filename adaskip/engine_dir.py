"""The engine directory: written atomically by adaskip-build, read and verified by every runtime.

    manifest.json   format version, backend, ModelSpec, fingerprint, plan digest, build options, file digests
    plan.json       the SkipPlan
    weights.safetensors   role-named weights (torch backend)
    tokenizer/      tokenizer files
    importance.png  per-sublayer similarity with the skip set marked
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from adaskip import __version__
from adaskip.errors import EngineDirError, PlanError
from adaskip.model.spec import ModelSpec
from adaskip.plan import SkipPlan

ENGINE_FORMAT = "adaskip.engine"
ENGINE_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
WEIGHTS = "weights.safetensors"
TOKENIZER = "tokenizer"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def atomic_dir(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; on success rename it into place, on any failure or interrupt
    (Ctrl-C, SIGTERM) remove it, so `output` never holds a half-written engine."""
    output = output.resolve()
    if output.exists() and not force:
        raise EngineDirError(f"{output} already exists (pass --force to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))

    def _term(signum, frame):  # turn SIGTERM into an exception so the cleanup below runs
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
    try:
        yield tmp
        _publishable(tmp)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _publishable(root: Path) -> None:
    """mkdtemp and some writers create owner-only files; give the finished engine the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def write_manifest(root: Path, backend: str, spec: ModelSpec, fingerprint: str, plan: SkipPlan,
                   build: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, Any]:
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {
        "format": ENGINE_FORMAT, "format_version": ENGINE_VERSION, "backend": backend,
        "model": {"spec": spec.to_dict(), "fingerprint": fingerprint},
        "plan": {"file": PLAN, "digest": plan.digest()},
        "build": build, "tokenizer": tokenizer,
        "tool": {"name": "adaskip", "version": __version__},
        "files": files,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class EngineDir:
    root: Path
    manifest: dict[str, Any]
    spec: ModelSpec
    plan: SkipPlan

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]


def open_engine_dir(path: str | Path, verify_large_files: bool = False) -> EngineDir:
    """Read and verify an engine dir: manifest format, every file's digest (files over 64 MB only with
    `verify_large_files`; the weights are checked against the fingerprint when loaded), plan vs model."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        hint = " (an interrupted build leaves no engine: rerun adaskip-build)" if root.is_dir() else ""
        raise EngineDirError(f"{root} is not an adaskip engine directory: no {MANIFEST}{hint}")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{root / MANIFEST} is corrupt: {e}") from None
    if manifest.get("format") != ENGINE_FORMAT:
        raise EngineDirError(f"{root}: not an adaskip engine (format {manifest.get('format')!r})")
    if manifest.get("format_version") != ENGINE_VERSION:
        raise EngineDirError(f"{root}: engine format version {manifest.get('format_version')!r} is not supported "
                             f"(this adaskip reads {ENGINE_VERSION}); rebuild it")
    for rel, digest in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file():
            raise EngineDirError(f"{root}: file {rel} listed in the manifest is missing")
        if f.stat().st_size <= 64 << 20 or verify_large_files:
            if sha256_file(f) != digest:
                raise EngineDirError(f"{root}: {rel} does not match its digest in the manifest (corrupt or edited)")
    try:
        spec = ModelSpec.from_dict(manifest["model"]["spec"])
        plan = SkipPlan.load(root / PLAN)
    except (KeyError, TypeError, ValueError) as e:
        raise EngineDirError(f"{root}: manifest is malformed: {e}") from None
    if plan.digest() != manifest["plan"]["digest"]:
        raise EngineDirError(f"{root}: plan.json does not match the plan digest in the manifest")
    try:
        plan.check_model(manifest["model"]["fingerprint"], spec.num_layers)
    except PlanError as e:
        raise EngineDirError(f"{root}: {e}") from None
    return EngineDir(root=root, manifest=manifest, spec=spec, plan=plan)
