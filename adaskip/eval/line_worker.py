"""A benchmark column's engine in a process of its own, spoken to in JSON lines: one request per stdin line, one
answer per stdout line (llama.cpp's worker, the C++ runtime's `adaskip_generate --jsonl`). Its stderr goes to a file,
so a chatty process never blocks on a full pipe, and is quoted when the process dies."""

from __future__ import annotations

import json
import subprocess
import tempfile
from typing import Any

from adaskip.errors import ModelLoadError


class LineWorker:
    def __init__(self, command: list[str], what: str, env: dict[str, str] | None = None):
        self.what = what  # named in errors: "the llama.cpp worker", "adaskip_generate"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, encoding="utf-8", env=env)

    def reply(self) -> dict[str, Any]:
        """The next answer line, or ModelLoadError with the end of its stderr if the process has exited."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise ModelLoadError(f"{self.what} exited ({self.proc.returncode}): {self.log.read().strip()[-400:]}")
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it has exited (a broken pipe): reply() says why, from its stderr
            pass
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # both workers end at the end of their input
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
