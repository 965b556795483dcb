"""Progress for long work: a tqdm bar on a terminal, periodic plain lines in a log file (cluster jobs)."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

LOG_EVERY_S = 30.0  # seconds between plain progress lines when the stream is not a terminal


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line, precise enough for an ETA."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Items done of one long loop (the images of a task split): a tqdm bar on a terminal, else a plain line every
    ``every_s`` seconds. A loop that takes less than ``every_s`` prints nothing (the default study has hundreds of
    small splits);
    a long one says how far it is, how fast and how long is left. Progress never touches the features."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.every_s, self.clock = label, total, every_s, clock
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self.last = clock()
        tty = self.stream.isatty()
        self.bar = tqdm(total=total, desc=label, unit="img", file=self.stream, leave=False) if tty else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s or (self.done >= self.total and self.last > self.start):
            self.last = now
            print(progress_line(self.label, self.done, self.total, now - self.start), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_line(label: str, done: int, total: int, elapsed_s: float) -> str:
    """``<label>: 12,288/90,000 images, 410 img/s, ETA 3m40s``."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    return f"{label}: {done:,}/{total:,} images, {rate:,.0f} img/s, ETA {format_duration(eta)}"
