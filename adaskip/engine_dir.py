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


@dataclass(frozen=True)
class OutputState:
    """What `--output` was when a build checked it: absent, or which directory with which manifest. Publishing
    refuses to replace anything else (a directory created or rebuilt at `--output` while the build ran)."""
    identity: tuple[int, int, int, int] | None  # (st_dev, st_ino of the dir, st_ino and st_mtime_ns of its manifest)


def _state(output: Path) -> OutputState:
    try:
        d = os.lstat(output)
    except FileNotFoundError:
        return OutputState(None)
    try:
        m = os.lstat(output / MANIFEST)
        return OutputState((d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns))
    except OSError:
        return OutputState((d.st_dev, d.st_ino, 0, 0))


@contextlib.contextmanager
def atomic_dir(output: Path, force: bool = False, expect: OutputState | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; on success publish it at `output`, on any failure or interrupt (Ctrl-C,
    SIGTERM) remove it, so `output` never holds a half-written engine.

    Publishing holds a lock per output (a concurrent build into the same output is refused, not silently overwritten),
    re-checks `output` (nothing may have appeared there or changed since `expect`, the state check_replaceable saw
    when the build started; --force replaces a real engine only), swaps with signals blocked and puts the old engine
    back if the swap fails, and then removes only the files the old engine's manifest lists."""
    output = output.resolve()
    expect = check_replaceable(output, force) if expect is None else expect
    output.parent.mkdir(parents=True, exist_ok=True)

    def _term(signum, frame):  # turn SIGTERM into an exception so the cleanup below runs
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
    try:
        with _output_lock(output):
            tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
            try:
                yield tmp
                _publishable(tmp)
                if _state(output) != expect:
                    raise EngineDirError(f"{output} was created or replaced by someone else while this build ran; "
                                         f"nothing was replaced (build again, with --force to replace it)")
                check_replaceable(output, force)
                _swap(tmp, output)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _output_lock(output: Path) -> Iterator[None]:
    """An exclusive flock on `.NAME.lock` beside `output`, removed afterwards. A lock file unlinked by its previous
    holder between our open and our flock is not the lock any more: open it again."""
    import fcntl

    path = output.with_name(f".{output.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EngineDirError(f"another build is writing {output} right now; wait for it or choose another "
                                 f"--output") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _swap(new: Path, output: Path) -> None:
    """Put `new` at `output`; an earlier engine there is moved aside, restored if the swap fails, else removed.
    SIGINT/SIGTERM wait until the swap is done: an interrupt never leaves the old engine hidden and no new one."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    masked = _main_thread()
    if masked:
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        old = None
        if os.path.lexists(output):
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
        try:
            os.replace(new, output)
        except BaseException:
            if old is not None:
                os.replace(old, output)
            raise
        if old is not None:
            remove_engine(old)
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


def check_replaceable(output: Path, force: bool) -> OutputState:
    """--force replaces an earlier engine or an empty directory, never anything else (`-o . --force` is refused).
    An engine is a directory whose manifest has the engine format and lists every file in it; returns the state
    that publishing re-checks."""
    output = Path(output).resolve()
    state = _state(output)
    if state.identity is None:
        return state
    if not force:
        raise EngineDirError(f"{output} already exists (pass --force to replace it)")
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        return state
    if _engine_files(output) is None:
        raise EngineDirError(f"{output} exists and is not an adaskip engine directory (or holds files its manifest "
                             f"does not list); --force only replaces engines (choose another --output)")
    return state


def _engine_files(root: Path) -> list[Path] | None:
    """The files of engine dir `root` (its manifest, and the files it lists), or None unless `root` is a real
    directory whose manifest has the engine format and lists every file found in it (symlinks count as files)."""
    if root.is_symlink() or not root.is_dir():
        return None
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        listed = set(manifest["files"]) if manifest.get("format") == ENGINE_FORMAT else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        return None
    if listed is None:
        return None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST and rel not in listed:
                return None
            found.append(path)
    return found


def remove_engine(root: Path) -> None:
    """Remove engine dir `root`: the files its manifest lists, then its empty directories; anything else stays."""
    files = _engine_files(root)
    if files is None:  # an empty directory that --force replaced; anything else is left alone
        with contextlib.suppress(OSError):
            os.rmdir(root)
        return
    for f in files:
        with contextlib.suppress(OSError):
            f.unlink()
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


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
