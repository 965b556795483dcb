"""Download stage, the only code of the project that touches the network.

For the embedded default, 'downloading' means generating the synthetic benchmark (deterministically,
offline) into data/raw/synthetic in the same files real MedMNIST would give. For ``data.source:
medmnist`` it fetches the published MedMNIST+ npz files: streamed, resumed from a ``*.part`` file
with HTTP Range (restarted when the server ignores Range), retried with exponential backoff, MD5
verified, and renamed into place only once the MD5 matches. A verified file is never fetched again:
a small JSON sidecar ``<file>.md5`` (hash, size, mtime) written at placement makes the check free;
without it (or when size/mtime changed) the file is re-hashed once and the sidecar rewritten.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np

from biovfm.data.medmnist import ZENODO_FILES, npz_name, published_md5, task_info, validate_arrays
from biovfm.io import read_json, write_json, write_npz

CORPUS = "corpus.npz"


def raw_task_name(flag: str) -> str:
    return f"{flag}.npz"


def generate_synthetic(out_dir: str | Path, tasks: list[str], n_train: int, n_val: int, n_test: int,
                       size: int, corpus_size: int, seed: int) -> dict:
    from biovfm.data import synthetic

    out = Path(out_dir)
    t0 = time.perf_counter()
    for i, flag in enumerate(tasks):
        data = synthetic.generate_task(flag, n_train, n_val, n_test, size=size, seed=seed)
        validate_arrays(data, out / raw_task_name(flag), task_info(flag))
        write_npz(out / raw_task_name(flag), **data)
        print(f"[download] synthetic {flag}: {n_train}/{n_val}/{n_test} images at {size}px ({i + 1}/{len(tasks)})", flush=True)
    images, modality = synthetic.generate_corpus(corpus_size, synthetic.MODALITIES, size=size, seed=seed)
    write_npz(out / CORPUS, images=images, modality=np.asarray(modality, dtype=str))
    n_eval = len(tasks) * (n_train + n_val + n_test)
    manifest = {"source": "synthetic", "tasks": tasks, "size": size, "seed": seed, "corpus_size": corpus_size,
                "eval_images": n_eval, "seconds": round(time.perf_counter() - t0, 2)}
    print(f"[download] synthetic corpus: {corpus_size} images; total {manifest['seconds']}s", flush=True)
    return manifest


# --------------------------------------------------------------------------- real MedMNIST+ over HTTP(S)
CHUNK = 1 << 20
MAX_WAIT_S = 120.0
PROGRESS_EVERY_S = 5.0
USER_AGENT = "biovfm-scale (MedMNIST+ download stage)"


class DownloadError(RuntimeError):
    """A download that cannot succeed as configured; the message names the URL and what to do."""


class _Retryable(Exception):
    """A transient failure (timeout, dropped connection, HTTP 5xx/408/429, bad MD5): try again after a pause."""


class _Md5Mismatch(_Retryable):
    def __init__(self, got: str) -> None:
        super().__init__(f"MD5 mismatch (got {got})")
        self.got = got


def _log(msg: str) -> None:
    print(f"[download] {msg}", flush=True)


def medmnist_url(base_url: str, name: str) -> str:
    """``<base_url>/<name>``; Zenodo gets ``?download=1`` as in medmnist.INFO (its plain link may be a preview)."""
    url = f"{base_url.rstrip('/')}/{name}"
    if (urlparse(url).hostname or "").endswith("zenodo.org"):
        url += "?download=1"
    return url


def expected_md5(flag: str, size: int, overrides: dict[str, str] | None = None) -> str:
    """The published MD5, unless ``overrides`` (file name -> MD5, for private re-packed mirrors) names the file."""
    return (overrides or {}).get(npz_name(flag, size)) or published_md5(flag, size)


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def sidecar_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".md5")


def is_verified(dest: str | Path, md5: str) -> bool:
    """True when ``dest`` holds the file with this MD5: free via the sidecar, else one re-hash (then recorded)."""
    dest = Path(dest)
    if not dest.is_file():
        return False
    st = dest.stat()
    side = sidecar_path(dest)
    try:
        rec = read_json(side)
        if rec["md5"] == md5 and rec["bytes"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns:
            return True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if file_md5(dest) != md5:
        return False
    _record(dest, md5, _recorded_url(side))
    return True


def _recorded_url(side: Path) -> str:
    try:
        return str(read_json(side).get("url", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _record(dest: Path, md5: str, url: str) -> None:
    st = dest.stat()
    write_json(sidecar_path(dest), {"md5": md5, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "url": url})


class _Progress:
    """Periodic log lines (every few seconds and at the end): readable in Snakemake logs, unlike a tqdm bar."""

    def __init__(self, name: str, log: Callable[[str], None]) -> None:
        self.name, self.log = name, log
        self.t0 = self.last = time.monotonic()
        self.start = 0

    def begin(self, offset: int, total: int | None) -> None:
        self.start, self.total = offset, total
        self.t0 = self.last = time.monotonic()
        where = f"resuming at {offset / 1e6:.1f} MB" if offset else "starting"
        self.log(f"{self.name}: {where}" + (f" of {total / 1e6:.1f} MB" if total else ""))

    def update(self, received: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = (received - self.start) / max(now - self.t0, 1e-6) / 1e6
        pct = f" ({100 * received / self.total:.0f}%)" if self.total else ""
        of = f"/{self.total / 1e6:.1f}" if self.total else ""
        self.log(f"{self.name}: {received / 1e6:.1f}{of} MB{pct}, {rate:.1f} MB/s")


def _open(url: str, offset: int, timeout: float):
    """The response for ``url`` from byte ``offset``; None when the server says the range is past the end (416)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return None
        if e.code in (408, 429) or e.code >= 500:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        hint = ("no such file on this server; check data.medmnist.base_url and the file name"
                if e.code in (404, 410) else "the server refused the request; check data.medmnist.base_url")
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}: {hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retryable(f"cannot reach the server: {getattr(e, 'reason', e)}") from None


def _content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total or None) of a ``Content-Range: bytes a-b/total`` header."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        raise _Retryable(f"unreadable Content-Range header {value!r}") from None


def _fetch(url: str, part: Path, timeout: float, progress: _Progress) -> None:
    """One attempt: append to ``part`` from its current size (HTTP Range), or restart when the server ignores Range."""
    offset = part.stat().st_size if part.exists() else 0
    resp = _open(url, offset, timeout)
    if resp is None:  # 416: the part already holds every byte (or is stale); the MD5 decides
        return
    with resp:
        status = getattr(resp, "status", None) or 200  # file:// URLs have no status
        length = resp.headers.get("Content-Length")
        if offset and status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Retryable(f"server sent a range from byte {start}, asked for {offset}; restarting")
            mode = "ab"
        else:
            if offset:
                progress.log(f"{part.name}: the server ignored the Range request; restarting from byte 0")
            offset, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        progress.begin(offset, total)
        received = offset
        with open(part, mode) as f:
            while True:
                try:
                    block = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _Retryable(f"connection lost after {received:,} bytes ({type(e).__name__}: {e})") from None
                if not block:
                    break
                f.write(block)
                received += len(block)
                progress.update(received)
    progress.update(received, final=True)
    if total is not None and received < total:
        raise _Retryable(f"connection closed after {received:,} of {total:,} bytes")


def download_file(url: str, dest: str | Path, md5: str, retries: int = 5, timeout: float = 60.0,
                  backoff: float = 2.0, log: Callable[[str], None] = _log) -> dict:
    """Fetch ``url`` to ``dest`` (resume, retry, verify, atomic rename); no request when ``dest`` is verified.

    Returns a record (url, md5, bytes, downloaded, seconds); raises :class:`DownloadError` naming the URL.
    """
    dest = Path(dest)
    t0 = time.perf_counter()
    if is_verified(dest, md5):
        log(f"{dest.name}: present and verified (md5 {md5}); not downloading")
        return {"url": url, "file": str(dest), "md5": md5, "bytes": dest.stat().st_size, "downloaded": False, "seconds": 0.0}
    if dest.exists():
        log(f"{dest}: MD5 differs from the expected {md5}; downloading it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, progress = part_path(dest), _Progress(dest.name, log)
    last: _Retryable | None = None
    for attempt in range(retries + 1):
        if attempt:
            wait = min(backoff * 2 ** (attempt - 1), MAX_WAIT_S)
            log(f"{dest.name}: {last}; retry {attempt}/{retries} in {wait:.1f}s")
            time.sleep(wait)
        try:
            _fetch(url, part, timeout, progress)
            got = file_md5(part)
            if got != md5:
                part.unlink()
                raise _Md5Mismatch(got)
        except _Retryable as e:
            last = e
            continue
        os.replace(part, dest)
        _record(dest, md5, url)
        seconds = round(time.perf_counter() - t0, 2)
        log(f"{dest.name}: verified (md5 {md5}) in {seconds}s")
        return {"url": url, "file": str(dest), "md5": md5, "bytes": dest.stat().st_size, "downloaded": True, "seconds": seconds}
    attempts = f"{retries + 1} attempt(s)"
    if isinstance(last, _Md5Mismatch):
        raise DownloadError(
            f"{url}: MD5 mismatch after {attempts}: expected {md5}, got {last.got}; the partial file was deleted. "
            f"If this mirror serves re-packed files on purpose, set data.medmnist.md5: {{{dest.name}: {last.got}}}; "
            f"otherwise use another data.medmnist.base_url"
        )
    kept = f"; {part} is kept and the next run resumes from it" if part.exists() else ""
    raise DownloadError(f"{url}: download failed after {attempts} ({last}){kept}. "
                        f"Check the network, data.medmnist.base_url and data.medmnist.timeout/retries")


def download_medmnist(out_dir: str | Path, flags: list[str], size: int, base_url: str = ZENODO_FILES,
                      md5_overrides: dict[str, str] | None = None, retries: int = 5, timeout: float = 60.0,
                      backoff: float = 2.0) -> list[dict]:
    """Fetch ``<flag>[_<size>].npz`` of each flag into ``out_dir`` (any subset of the 12 tasks, any MedMNIST+ size)."""
    out = Path(out_dir)
    records = []
    for flag in flags:
        name = npz_name(flag, size)
        records.append(download_file(medmnist_url(base_url, name), out / name, expected_md5(flag, size, md5_overrides),
                                     retries=retries, timeout=timeout, backoff=backoff))
    return records
