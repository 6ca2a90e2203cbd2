"""Progress of a run: a tqdm bar (done / failed / rate / ETA) on a terminal, else one line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

#: Seconds between progress lines when the output is not a terminal (a log file, CI).
LINE_EVERY_S = 10.0


class Progress:
    def __init__(self, total: int, done: int, failed: int, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.total, self.done, self.failed = total, done, failed
        self._start_done, self._started = done, time.monotonic()
        self._last_line = self._started
        self._bar: tqdm | None = None
        if self.out.isatty():
            self._bar = tqdm(total=total, initial=done, unit="line", file=self.out, dynamic_ncols=True)
            self._bar.set_postfix(failed=failed)

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self._bar is not None:
            self._bar.update(1)
            if failed:
                self._bar.set_postfix(failed=self.failed)
        elif time.monotonic() - self._last_line >= LINE_EVERY_S:
            self.line()

    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def line(self, prefix: str = "") -> None:
        """One line: done / total, failed, rate, ETA."""
        self._last_line = time.monotonic()
        rate, left = self.rate(), self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        share = 100 * self.done / self.total if self.total else 100.0
        print(
            f"broker-batch: {prefix}{self.done}/{self.total} lines ({share:.0f}%), {self.failed} failed, "
            f"{rate:.1f} lines/s, ETA {eta}",
            file=self.out,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
