"""Hypothesis strategies that damage an engine dir the way a hostile or careless hand would: any value of the
manifest or plan replaced (huge and negative integers, NaN, strings such as '../x' or '/etc/passwd', containers),
keys deleted or added, values nested 100,000 deep, the text truncated or a byte flipped. Shared by the Python and
C++ fuzz tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

DEEP = "[" * 100_000 + "]" * 100_000
_MARK = "@@deep@@"

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**32 + 4, 2**63, 2**64 - 1, 1e300, 1.5])
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["", "../x", "/etc/passwd", "tokenizer/../../x", "model.onnx", "plan.json", "ort",
                              "sha256:" + "0" * 64, _MARK])
           | st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def json_mutation(draw, doc: Any) -> str:
    """The text of `doc` after one random structural mutation (or a text-level one)."""
    doc = json.loads(json.dumps(doc))
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add", "truncate", "flip"]))
    text = json.dumps(doc)
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + chr(draw(st.integers(0, 0x7F))) + text[i + 1:]
    path = draw(st.sampled_from(_paths(doc)[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(values)
    else:
        parent[path[-1]] = draw(values)
    return json.dumps(doc, allow_nan=True).replace(json.dumps(_MARK), DEEP)


def mutated_copy(engine: Path, dest: Path, manifest_text: str | None, plan_text: str | None) -> Path:
    """A copy of `engine` (files over 64 MB hard-linked) with the given manifest and/or plan text; a new plan
    is re-listed in the manifest, so the mutation reaches the plan checks, not only the digest check."""
    from adaskip.engine_dir import sha256_file

    if dest.exists():
        shutil.rmtree(dest)
    for f in engine.rglob("*"):
        target = dest / f.relative_to(engine)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.stat().st_size > 64 << 20:  # weights: a hard link (never written below; a symlink is refused)
                os.link(f, target)
            else:  # a real copy: manifest.json and plan.json are rewritten, and must not write through a link
                shutil.copy(f, target)
    if plan_text is not None:
        (dest / "plan.json").write_text(plan_text)
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["files"]["plan.json"] = {"sha256": sha256_file(dest / "plan.json"),
                                          "bytes": (dest / "plan.json").stat().st_size}
        (dest / "manifest.json").write_text(json.dumps(manifest))
    if manifest_text is not None:
        (dest / "manifest.json").write_text(manifest_text)
    return dest
