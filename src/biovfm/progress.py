"""Progress for long work: a tqdm bar on a terminal, periodic plain lines in a log file (cluster jobs)."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

LOG_EVERY_S = 30.0  # seconds between plain progress lines when the stream is not a terminal


def process_times() -> dict[str, float | None]:
    """This process's age (wall seconds since it was started: interpreter, imports and all) and its CPU seconds
    (user + system over all its threads and reaped children): what a job reports of itself, so that
    ``benchmarks/where_time_goes.py`` can split a job's wall time into start-up, work and the rest. The age is
    read from /proc (Linux); elsewhere it is None."""
    import os
    import resource

    ru, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime + ch.ru_utime + ch.ru_stime
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age: float | None = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        age = None
    return {"process_age_s": age, "cpu_s": cpu}


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
