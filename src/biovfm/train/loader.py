"""Training batches streamed from the memory-mapped corpus store, prepared one step ahead in a background thread.

Memory is bounded by the batch, not the data set: a step reads only the rows it trains on, straight from the
shards. Which rows a step reads is a pure function of (seed, step, world rank, accumulation index), so results do
not depend on the loader, the number of processes or where a resumed run starts.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

PREFETCH_STEPS = 2  # steps prepared ahead of the one training: hides the read behind compute


@lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: cached, since every step of an epoch slices the same permutation
    (a fresh ``randperm`` of 10^7 rows per step would cost more than the step at scale)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Sampling without replacement, epoch by epoch, as a pure function of (seed, step): resuming needs no sampler state."""
    start = step * batch
    pos = torch.arange(start, start + batch)
    epochs = pos // n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = epoch_permutation(n, seed, e)[pos[sel] % n]
    return out


def micro_batch(batch: int, world: int, accum: int) -> int:
    """Samples per forward pass on one process; the global batch must split evenly."""
    if batch % (world * accum):
        raise ValueError(f"pretrain.batch_size={batch} does not split into {world} processes x {accum} accumulation steps; "
                         "pick a batch size divisible by their product")
    return batch // (world * accum)


def step_rows(rows: np.ndarray, batch: int, step: int, seed: int, rank: int, accum: int, mb: int) -> list[np.ndarray]:
    """Store rows of each of this process's micro-batches at ``step`` (micro-batch k of rank r is the slice
    ``[(r * accum + k) * mb, ... + mb)`` of the step's global batch)."""
    idx = batch_indices(len(rows), batch, step, seed).numpy()
    return [rows[idx[(rank * accum + k) * mb:(rank * accum + k + 1) * mb]] for k in range(accum)]


def read_batch(images, rows: np.ndarray, pin: bool = False) -> torch.Tensor:
    """uint8 N x 3 x H x W of these store rows, in this order (a contiguous copy of just these images)."""
    x = torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2).contiguous()
    return x.pin_memory() if pin else x


class BatchStream:
    """Iterates the micro-batches of steps ``[start, stop)`` for one process, read ``PREFETCH_STEPS`` ahead by a
    daemon thread. An error in the thread is raised in the training loop; :meth:`close` stops it early."""

    def __init__(self, images, rows: np.ndarray, batch: int, seed: int, rank: int, accum: int, mb: int,
                 start: int, stop: int, pin: bool = False) -> None:
        self._args = (images, rows, batch, seed, rank, accum, mb, pin)
        self._range = (start, stop)
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH_STEPS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="biovfm-batch-stream", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        images, rows, batch, seed, rank, accum, mb, pin = self._args
        try:
            for step in range(*self._range):
                item = [read_batch(images, r, pin) for r in step_rows(rows, batch, step, seed, rank, accum, mb)]
                if not self._put((step, item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put((None, e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        for _ in range(*self._range):
            step, item = self._queue.get()
            if step is None:
                raise item
            yield step, item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
