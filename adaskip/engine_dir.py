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
import stat
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


def swap_into_place(new: Path, target: Path, aside: Path) -> Path | None:
    """Rename `new` to `target`, moving an existing `target` to `aside` first and back if the rename fails.
    Returns where the old one now is (None when there was none); the caller removes it."""
    old = None
    if os.path.lexists(target):
        os.replace(target, aside)
        old = aside
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    return old


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
    SIGINT/SIGTERM wait until the swap is done: an interrupt never leaves the old engine hidden and no new one.
    (Deferred by handlers rather than a signal mask: a mask covers the calling thread only, and ONNX Runtime's or
    torch's worker threads would take the signal and have Python raise it here anyway.)"""
    deferred: list[int] = []
    previous = {}
    if _main_thread():
        previous = {s: signal.signal(s, lambda signum, frame: deferred.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        old = swap_into_place(new, output, output.with_name(f".{output.name}.old-{os.getpid()}"))
        if old is not None:
            remove_engine(old)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if deferred:  # delivered now, to the handlers the process had
            signal.raise_signal(deferred[0])


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


def _write_error(path: Path, e: Exception) -> OSError:
    """safetensors and tokenizers report a full disk as their own error types (Rust I/O errors): make it the OSError
    it is, so the CLI says it in one line."""
    return OSError(f"cannot write {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def save_weights(path: Path, weights: dict[str, Any], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    try:
        save_file(weights, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # SafetensorError: "I/O error: No space left on device"
        raise _write_error(path, e) from None


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    try:
        tokenizer.save_pretrained(str(directory))
    except OSError:
        raise
    except Exception as e:  # tokenizers' Rust I/O errors
        raise _write_error(directory, e) from None


def write_manifest(root: Path, backend: str, spec: ModelSpec, fingerprint: str, plan: SkipPlan,
                   build: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, Any]:
    check_tokenizer_files(root, None)  # the tokenizer wrote data files only (never a model dir's .py)
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


# Bounds every reader shares (cpp/runtime checks the same ones): beyond them a hand-edited manifest would make the
# runtime allocate absurd buffers instead of refusing it.
MAX_MANIFEST_BYTES = 16 << 20
MAX_PLAN_BYTES = 16 << 20
TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # data only: an engine never carries code
_INT = {"type": "integer"}
_REL_PATH = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}){0,3}$"  # no .., /x, \\, ~
_SPEC_INTS = {"num_layers": 1024, "hidden_size": 1 << 17, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096,
              "intermediate_size": 1 << 20, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 24}
MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "format_version", "backend", "model", "plan", "build", "tokenizer", "files"],
    "properties": {
        "format": {"const": ENGINE_FORMAT},
        "format_version": {"const": ENGINE_VERSION},
        "backend": {"type": "string", "maxLength": 64},
        "model": {"type": "object", "required": ["spec", "fingerprint"], "properties": {
            "fingerprint": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
            "spec": {"type": "object", "required": list(_SPEC_INTS), "properties": {
                **{k: {**_INT, "minimum": 1, "maximum": v} for k, v in _SPEC_INTS.items()},
                "attention_windows": {"type": "array", "maxItems": 1024, "items": {
                    "anyOf": [{"type": "null"}, {**_INT, "minimum": 1, "maximum": 1 << 24}]}},
                "spec_version": {**_INT, "minimum": 1, "maximum": 64},
                "family": {"type": "string", "maxLength": 64}, "name": {"type": "string", "maxLength": 1024},
                "rope_theta": {"type": "number", "exclusiveMinimum": 0}, "norm_eps": {"type": "number", "minimum": 0},
            }},
        }},
        "plan": {"type": "object", "required": ["file", "digest"], "properties": {
            "file": {"const": PLAN}, "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}}},
        "build": {"type": "object", "properties": {
            "graph": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "pattern": _REL_PATH}, "data": {"type": "string", "pattern": _REL_PATH},
                "decode_kernels_file": {"type": "string", "pattern": _REL_PATH}, "interface": _INT, "variant": {"type": "string", "maxLength": 64},
                "kv_layers": {"type": "array", "maxItems": 1024, "items": {**_INT, "minimum": 0, "maximum": 1023}},
                "conditionals": {**_INT, "minimum": 0, "maximum": 2048}}},
            "tensorrt": {"type": "object", "properties": {"engine": {"type": "string", "pattern": _REL_PATH}}},
        }},
        "tokenizer": {"type": "object", "required": ["dir"], "properties": {
            "dir": {"const": TOKENIZER},
            "eos_token_ids": {"type": "array", "maxItems": 64, "items": {**_INT, "minimum": 0, "maximum": (1 << 24) - 1}},
            "chat_template": {"type": "boolean"}}},
        "files": {"type": "object", "maxProperties": 4096, "propertyNames": {"pattern": _REL_PATH},
                  "additionalProperties": {"type": "object", "required": ["sha256", "bytes"], "properties": {
                      "sha256": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
                      "bytes": {**_INT, "minimum": 0, "maximum": 1 << 50}}}},
    },
}


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


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of engine dir `root`, validated against MANIFEST_SCHEMA; EngineDirError otherwise."""
    import jsonschema

    path = root / MANIFEST
    if not root.exists():
        raise EngineDirError(f"{root} does not exist (build one with adaskip-build)")
    if not path.is_file():
        hint = " (an interrupted build leaves no engine: rerun adaskip-build)" if root.is_dir() else ""
        raise EngineDirError(f"{root} is not an adaskip engine directory: no {MANIFEST}{hint}")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise EngineDirError(f"{path} is {path.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{path} is corrupt: {e}") from None
    except RecursionError:
        raise EngineDirError(f"{path} is corrupt: nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise EngineDirError(f"{root}: not an adaskip engine manifest")
    if manifest.get("format_version") != ENGINE_VERSION:
        raise EngineDirError(f"{root}: engine format version {manifest.get('format_version')!r} is not supported "
                             f"(this adaskip reads {ENGINE_VERSION}); rebuild it")
    try:
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest))
    except RecursionError:
        raise EngineDirError(f"{path} is malformed: nested too deeply") from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise EngineDirError(f"{path} is malformed at {where}: {_short(error.message)}")
    files = manifest["files"]
    graph = manifest["build"].get("graph", {})
    kept = graph.get("kept", True) is not False  # a TensorRT build drops the graph it was built from
    named = [("graph", graph.get("file") if kept else None), ("graph data", graph.get("data") if kept else None),
             ("decode kernels' graph", graph.get("decode_kernels_file") if kept else None),
             ("TensorRT engine", manifest["build"].get("tensorrt", {}).get("engine")), ("plan", PLAN)]
    for what, rel in named:
        if rel is not None and rel not in files:
            raise EngineDirError(f"{root}: the {what} file {rel} is not in the manifest's file table")
    return manifest


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def confined_file(root: Path, rel: str) -> Path:
    """root/rel, refused unless it is a regular file inside `root` reached through no symlink (rel has passed
    _REL_PATH: no '..', no absolute path)."""
    path = root
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise EngineDirError(f"{root}: file {rel} listed in the manifest is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise EngineDirError(f"{root}: {rel} is reached through a symbolic link; engine files must lie inside "
                                 f"the engine dir")
    if not stat.S_ISREG(st.st_mode):
        raise EngineDirError(f"{root}: {rel} is not a regular file")
    return path


def check_tokenizer_files(root: Path, listed: set[str] | None) -> None:
    """Every file of the tokenizer dir is a data file (TOKENIZER_SUFFIXES) and, with `listed`, in the manifest:
    transformers picks up whatever it finds there (added_tokens.json, additional chat templates, code)."""
    tok = root / TOKENIZER
    if not tok.is_dir() or tok.is_symlink():
        raise EngineDirError(f"{root}: no {TOKENIZER}/ directory")
    for dirpath, dirnames, filenames in os.walk(tok):
        for name in filenames + dirnames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise EngineDirError(f"{root}: {rel} is a symbolic link; engine files must lie inside the engine dir")
            if name in filenames and not name.endswith(TOKENIZER_SUFFIXES):
                raise EngineDirError(f"{root}: {rel} is not a tokenizer data file ({', '.join(TOKENIZER_SUFFIXES)}); "
                                     f"an engine carries no code")
            if listed is not None and name in filenames and rel not in listed:
                raise EngineDirError(f"{root}: {rel} is not in the manifest; transformers would use it, so it is "
                                     f"refused (rebuild the engine or remove the file)")


def open_engine_dir(path: str | Path, verify_large_files: bool = False) -> EngineDir:
    """Read and verify an engine dir: the manifest against its schema, every listed file confined to the dir with its
    size and digest (digests of files over 64 MB only with `verify_large_files`; torch weights are also checked
    against the fingerprint when loaded), no unlisted tokenizer file, plan vs model."""
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest["files"]
    for rel, entry in files.items():
        f = confined_file(root, rel)
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise EngineDirError(f"{root}: {rel} has {size} bytes, the manifest says {entry['bytes']} "
                                 f"(truncated or replaced)")
        if size <= LARGE_FILE or verify_large_files:
            if sha256_file(f) != entry["sha256"]:
                raise EngineDirError(f"{root}: {rel} does not match its digest in the manifest (corrupt or edited)")
    check_tokenizer_files(root, set(files))
    if files[PLAN]["bytes"] > MAX_PLAN_BYTES:
        raise EngineDirError(f"{root}: {PLAN} is {files[PLAN]['bytes']} bytes; a plan is at most {MAX_PLAN_BYTES}")
    try:
        spec = ModelSpec.from_dict(manifest["model"]["spec"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EngineDirError(f"{root}: manifest is malformed: model spec: {_short(str(e))}") from None
    fp, plan_digest = manifest["model"]["fingerprint"], manifest["plan"]["digest"]
    try:
        plan = SkipPlan.load(root / PLAN)
        if plan.digest() != plan_digest:
            raise EngineDirError(f"{root}: plan.json does not match the plan digest in the manifest")
        plan.check_model(fp, spec.num_layers)
    except PlanError as e:
        raise EngineDirError(f"{root}: {e}") from None
    return EngineDir(root=root, manifest=manifest, spec=spec, plan=plan)
