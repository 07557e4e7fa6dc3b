"""Peak resident memory of running processes, for "memory stays flat" checks."""

from __future__ import annotations

import contextlib
import threading

import psutil


class RssSampler:
    """Peak RSS per name, sampled every 20 ms in a thread.

    Each name maps to one process or to a group (a transformer and its
    workers), whose RSS is summed.
    """

    def __init__(self, procs: dict[str, psutil.Process | list[psutil.Process]]) -> None:
        self.groups = {k: v if isinstance(v, list) else [v] for k, v in procs.items()}
        self.base = {k: self._rss(v) for k, v in self.groups.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(procs: list[psutil.Process]) -> int:
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for k, v in self.groups.items():
                self.peak[k] = max(self.peak[k], self._rss(v))

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def growth_mib(self) -> dict[str, float]:
        return {k: (self.peak[k] - self.base[k]) / 2**20 for k in self.groups}
