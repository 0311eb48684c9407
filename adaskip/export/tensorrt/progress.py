"""Build progress: a TensorRT IProgressMonitor that draws the builder's phases as tqdm bars.

TensorRT nests phases ("Building engine" > "Building engine from subgraph" > "Computing profile costs" > ...). On
a terminal the outer MAX_DEPTH levels get a bar each (the innermost ones flicker by in microseconds); otherwise (CI
logs) each of the outer LOG_DEPTH levels prints one line when it finishes, with its duration.

The monitor is also how a build is cancelled. Ctrl-C or SIGTERM during the build only sets a flag (a Python
exception raised inside one of TensorRT's callbacks would be swallowed by the bindings): the next step_complete
returns False, TensorRT stops, and KeyboardInterrupt is raised once it has returned, so atomic_dir removes the
half-written engine directory. TensorRT reports steps between phases, not inside one profile's compilation, so a
cancel takes effect within about one profile's compile time.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any, Iterator

from tqdm import tqdm

MAX_DEPTH = 4
LOG_DEPTH = 3


def make_monitor(trt: Any, show: bool) -> Any:
    bars_on = show and sys.stderr.isatty()

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}
            self.depth: dict[str, int] = {}
            self.started: dict[str, float] = {}
            self.interrupt: BaseException | None = None
            self.cancel_requested = False
            self.phases: list[str] = []  # outer phases seen, for the record

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                depth = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self.depth[phase_name] = depth
                self.started[phase_name] = time.perf_counter()
                if depth < MAX_DEPTH and phase_name not in self.phases:
                    self.phases.append(phase_name)
                if bars_on and depth < MAX_DEPTH:
                    self.bars[phase_name] = tqdm(total=num_steps, desc=f"{'  ' * depth}{phase_name}", position=depth,
                                                 leave=depth == 0, file=sys.stderr, dynamic_ncols=True,
                                                 bar_format="{desc}: {n}/{total} [{elapsed}]")
            except BaseException as e:  # noqa: BLE001 - never let an exception cross into TensorRT
                self.interrupt = self.interrupt or e

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            except BaseException as e:  # noqa: BLE001
                self.interrupt = self.interrupt or e
            return self.interrupt is None and not self.cancel_requested  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            try:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.update(bar.total - bar.n)
                    bar.close()
                elif show and not bars_on and self.depth.get(phase_name, MAX_DEPTH) < LOG_DEPTH:
                    took = time.perf_counter() - self.started.get(phase_name, time.perf_counter())
                    indent = "  " * self.depth[phase_name]
                    print(f"adaskip-build: TensorRT: {indent}{phase_name} ({took:.1f} s)", file=sys.stderr, flush=True)
            except BaseException as e:  # noqa: BLE001
                self.interrupt = self.interrupt or e

        def close(self) -> None:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

        def reraise(self) -> None:
            """Raise what arrived during the build (an exception in a callback, or a cancel request)."""
            if self.interrupt is not None:
                raise self.interrupt
            if self.cancel_requested:
                raise KeyboardInterrupt("TensorRT build cancelled")

        @contextlib.contextmanager
        def cancellable(self) -> Iterator[None]:
            """While TensorRT builds: SIGINT/SIGTERM request a cancel instead of raising (main thread only)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def request(signum: int, frame: Any) -> None:
                if not self.cancel_requested:
                    print("adaskip-build: cancelling at TensorRT's next build step", file=sys.stderr, flush=True)
                self.cancel_requested = True

            previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Monitor()
