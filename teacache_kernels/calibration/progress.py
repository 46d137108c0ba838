"""Progress of a long calibration: tqdm when installed (diffusers depends on it), else a line per item on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "sample"):
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.done = 0
        self.start = time.perf_counter()
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True)
            except ImportError:
                pass

    def step(self, **info) -> None:
        """One item done; `info` is shown next to the bar (e.g. calls=60)."""
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(info, refresh=False)
            self._bar.update(1)
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        print(
            f"{self.desc}: {self.unit} {self.done}/{self.total} {extra} elapsed {elapsed:.1f}s ETA {eta:.1f}s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
