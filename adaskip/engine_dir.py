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


LARGE_FILE = 64 << 20  # larger files are size-checked at every load, hashed by adaskip-verify


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
    check_replaceable(output, force)
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


def check_replaceable(output: Path, force: bool) -> None:
    """--force replaces an earlier engine or an empty directory, never anything else (`-o . --force` is refused)."""
    if not output.exists():
        return
    if not force:
        raise EngineDirError(f"{output} already exists (pass --force to replace it)")
    if output.is_dir() and not any(output.iterdir()):
        return
    try:
        is_engine = json.loads((output / MANIFEST).read_text()).get("format") == ENGINE_FORMAT
    except (OSError, ValueError, AttributeError):
        is_engine = False
    if not is_engine:
        raise EngineDirError(f"{output} exists and is not an adaskip engine directory; --force only replaces "
                             f"engines (choose another --output)")


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
    files = {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(root.rglob("*")) if p.is_file()}
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
    """Read and verify an engine dir: manifest format, every file's size and digest (digests of files over 64 MB only
    with `verify_large_files`; torch weights are also checked against the fingerprint when loaded), plan vs model."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        hint = " (an interrupted build leaves no engine: rerun adaskip-build)" if root.is_dir() else ""
        raise EngineDirError(f"{root} is not an adaskip engine directory: no {MANIFEST}{hint}")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{root / MANIFEST} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise EngineDirError(f"{root}: not an adaskip engine manifest")
    if manifest.get("format_version") != ENGINE_VERSION:
        raise EngineDirError(f"{root}: engine format version {manifest.get('format_version')!r} is not supported "
                             f"(this adaskip reads {ENGINE_VERSION}); rebuild it")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"sha256", "bytes"} <= set(e)
                                              for e in files.values()):
        raise EngineDirError(f"{root}: manifest is malformed: bad 'files' table")
    for rel, entry in files.items():
        f = root / rel
        if not f.is_file():
            raise EngineDirError(f"{root}: file {rel} listed in the manifest is missing")
        if f.stat().st_size != entry["bytes"]:
            raise EngineDirError(f"{root}: {rel} has {f.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                 f"(truncated or replaced)")
        if f.stat().st_size <= LARGE_FILE or verify_large_files:
            if sha256_file(f) != entry["sha256"]:
                raise EngineDirError(f"{root}: {rel} does not match its digest in the manifest (corrupt or edited)")
    try:
        spec = ModelSpec.from_dict(manifest["model"]["spec"])
        fp, plan_digest = manifest["model"]["fingerprint"], manifest["plan"]["digest"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EngineDirError(f"{root}: manifest is malformed: {e!r}") from None
    try:
        plan = SkipPlan.load(root / PLAN)
        if plan.digest() != plan_digest:
            raise EngineDirError(f"{root}: plan.json does not match the plan digest in the manifest")
        plan.check_model(fp, spec.num_layers)
    except PlanError as e:
        raise EngineDirError(f"{root}: {e}") from None
    return EngineDir(root=root, manifest=manifest, spec=spec, plan=plan)
