"""Stop-string search in time linear in the generated text: an Aho-Corasick automaton over the stop strings.

Generated text arrives a few characters per token. Re-scanning a window for every stop string costs
O(stops x length) per token and finding the longest held-back prefix O(stops x length^2); the automaton reads each
new character once (amortized constant work) and its state's depth *is* the longest suffix of the text that is a
prefix of some stop string, i.e. what must be held back while it could still become a stop.
"""

from __future__ import annotations

from collections import deque


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self._goto: list[dict[str, int]] = [{}]
        self._fail = [0]
        self._depth = [0]
        self._longest = [0]  # length of the longest stop string ending at this state (0: none)
        for stop in stops:
            if stop:
                self._add(stop)
        self._link()
        self._state = 0
        self._fed = 0  # characters of the text read so far

    def _add(self, stop: str) -> None:
        s = 0
        for ch in stop:
            nxt = self._goto[s].get(ch)
            if nxt is None:
                nxt = len(self._goto)
                self._goto[s][ch] = nxt
                self._goto.append({})
                self._fail.append(0)
                self._depth.append(self._depth[s] + 1)
                self._longest.append(0)
            s = nxt
        self._longest[s] = len(stop)

    def _link(self) -> None:
        queue = deque(self._goto[0].values())
        while queue:
            s = queue.popleft()
            self._longest[s] = self._longest[s] or self._longest[self._fail[s]]
            for ch, t in self._goto[s].items():
                f = self._fail[s]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                self._fail[t] = self._goto[f].get(ch, 0) if self._goto[f].get(ch, 0) != t else 0
                queue.append(t)

    def feed(self, text: str) -> tuple[int | None, int]:
        """Read what `text` (the whole text so far, which only grows) adds. Returns (where the earliest stop string
        ending in the new characters starts, or None; how many trailing characters could begin a stop string)."""
        cut = None
        goto, fail, longest = self._goto, self._fail, self._longest
        s = self._state
        for i in range(self._fed, len(text)):
            ch = text[i]
            while s and ch not in goto[s]:
                s = fail[s]
            s = goto[s].get(ch, 0)
            if longest[s]:
                start = i + 1 - longest[s]
                cut = start if cut is None else min(cut, start)
        self._state, self._fed = s, len(text)
        return cut, self._depth[s]
