"""The documented commands work as written.

Every shell block of README.md and docs/*.md is read; each adaskip command in it (console script, `.venv/bin/...`,
or `python -m adaskip.cli.X`) must parse with that command's real argument parser, so a renamed or removed flag
fails here, not in a newcomer's terminal. README's main job (everything after the install) is executed verbatim on
the CPU, in a scratch directory, and its output is checked.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", ";", "|"}


def shell_blocks(path: Path) -> list[str]:
    """The bodies of the fenced shell blocks of a markdown file."""
    text = path.read_text(encoding="utf-8")
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in SHELLS]


def commands(block: str) -> list[list[str]]:
    """Simple commands of a block: continuation lines joined, comments and a synopsis's optional `[...]` groups
    dropped (their placeholders are not values), split at && || ; |."""
    out: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)\[[^\]]*\]", " ", line.strip())
        if line.startswith("$ "):
            line = line[2:]
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell (an output excerpt in the block)
            continue
        current: list[str] = []
        for w in words + [";"]:
            if w in OPERATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(w)
    return out


def adaskip_scripts() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.value.startswith("adaskip.")}


def as_adaskip(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """(command name, module, arguments) when `argv` runs an adaskip command; env assignments in front are skipped."""
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    program = Path(argv[0]).name
    scripts = adaskip_scripts()
    if program in scripts:
        return program, scripts[program].split(":")[0], argv[1:]
    if re.fullmatch(r"python3?", program) and len(argv) > 2 and argv[1] == "-m" and argv[2].startswith("adaskip."):
        return argv[2], argv[2], argv[3:]
    return None


def documented() -> list[tuple[str, str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in shell_blocks(doc):
            for argv in commands(block):
                hit = as_adaskip(argv)
                if hit:
                    found.append((doc.relative_to(ROOT).as_posix(), *hit))
    return found


def test_docs_document_adaskip_commands():
    """The extractor finds the documented commands (an empty parametrization below would pass vacuously)."""
    found = documented()
    assert {"adaskip-build", "adaskip-run", "adaskip-deploy", "adaskip-serve"} <= {name for _, name, _, _ in found}
    assert len(found) >= 10, found


@pytest.mark.parametrize("doc,name,module,args", documented(),
                         ids=lambda v: v if isinstance(v, str) and ("/" in v or v.startswith("adaskip")) else "")
def test_documented_command_parses(doc, name, module, args):
    if module == "adaskip.cli.serve" and any(a == "--engine" or a.startswith("--engine=") for a in args):
        module = "adaskip.cli.serve_openai"  # adaskip-serve --engine is the OpenAI server's parser
    mod = importlib.import_module(module)
    if not hasattr(mod, "parser"):
        pytest.fail(f"{doc}: {name}: module {module} has no parser()")
    try:
        mod.parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{doc}: `{name} {shlex.join(args)}` does not parse (exit {e.code})")


def synopses() -> dict[str, set[str]]:
    """README's command synopsis (the untagged block under "## Commands"): the flags it names per command."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Commands\n+```\n(.*?)^```", text, re.S | re.M).group(1)
    flags: dict[str, set[str]] = {}
    name = ""
    for line in block.splitlines():
        if line and not line[0].isspace():
            name = line.split()[0]
        flags.setdefault(name, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    return flags


def parser_flags(module: str) -> set[str]:
    return set(importlib.import_module(module).parser()._option_string_actions)


def test_readme_synopsis_names_real_flags():
    scripts = adaskip_scripts()
    found = synopses()
    assert {"adaskip-build", "adaskip-run", "adaskip-verify", "adaskip-bench", "adaskip-eval"} <= set(found)
    for name, flags in found.items():
        if name not in scripts:
            continue
        known = parser_flags(scripts[name].split(":")[0])
        if name == "adaskip-serve":
            known |= parser_flags("adaskip.cli.serve_openai")
        if name == "adaskip-deploy":  # its flags live on the `triton` subcommand
            from adaskip.cli.deploy import parser
            sub = next(a for a in parser()._actions if a.choices and "triton" in a.choices)
            known |= set(sub.choices["triton"]._option_string_actions)
        assert flags <= known, f"README's synopsis of {name} names flags it does not have: {sorted(flags - known)}"


def readme_main_job() -> str:
    """README's first shell block, from the first adaskip command on (the install steps are what CI just did)."""
    block = shell_blocks(ROOT / "README.md")[0].strip()
    steps = [s.strip() for s in block.split(" && ")]
    first = next(i for i, s in enumerate(steps) if as_adaskip(shlex.split(s)))
    return " && ".join(steps[first:])


def test_readme_main_job_runs_as_written(tmp_path):
    """README's main job, verbatim after the install, with this venv's scripts standing in for .venv/bin."""
    job = readme_main_job()
    assert "adaskip-build" in job and "adaskip-run" in job
    bin_dir = Path(sys.executable).parent
    (tmp_path / ".venv").symlink_to(bin_dir.parent)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run(["bash", "-c", job], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "[adaskip] TTFT" in out, out
    assert re.search(r"skipped: prefill \d+, decode \d+ offline \+ \d+ online", out), out
    answer = out.split("[adaskip]")[0]
    assert len(answer.split()) >= 5, out
    assert "The capital of France is Paris." in out, out  # the demo's answers stay intact (README's table)
