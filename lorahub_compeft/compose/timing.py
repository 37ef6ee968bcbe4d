"""Where a composition's time goes: the phases measured once, reported as
CompositionResult.timings (see there for what each holds)."""
from __future__ import annotations

import time
from contextlib import contextmanager


class Stopwatch:
    """Seconds per phase, from when it is made. split(name, **measured) books phases measured
    elsewhere and the rest of the time so far as `name`; lap(name) times a block."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def split(self, name: str, **measured: float) -> None:
        self.seconds.update(measured)
        self.seconds[name] = time.perf_counter() - self.start - sum(self.seconds.values())

    @contextmanager
    def lap(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start

    def report(self, scorer_timings: dict, steps: int) -> dict:
        """CompositionResult.timings: the search's lap split into the scorer's mix and forward
        and the optimizer's rest."""
        s, t = self.seconds, scorer_timings
        return {"decode": s["decode"], "mix": t["mix"], "forward": t["forward"],
                "optimizer": s["search"] - t["mix"] - t["forward"], "setup": s["setup"],
                "select": s["select"], "steps": steps, "forwards": t["forwards"]}
