"""Lesson 6: fetching a corpus once: URL + SHA-256 + cache (tested on a loopback server in tests/test_data.py)."""
from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .run_files import atomic_file

# Named corpora fetched over the network: (URL, SHA-256 of the file).
DOWNLOADS = {
    "tinyshakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
DEFAULT_CACHE = Path(os.environ.get("M07_CACHE", Path.home() / ".cache" / "m07"))


class DownloadFailed(RuntimeError):
    """The server could not be reached, stopped answering, or took longer than the deadline."""


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_corpus(url: str, sha256: str, cache_dir: str | Path | None = None, *,
                    filename: str | None = None, timeout: float = 30.0, deadline: float = 600.0,
                    progress: bool = True) -> Path:
    """Fetch a file once into cache_dir, check its SHA-256, and return its path.

    A cached file with the right hash is reused without touching the network; a download
    whose hash is wrong is discarded (never cached); being offline gives a clear error.
    `timeout` bounds each wait for the server (seconds without a byte), `deadline` the whole
    download, so that a server that trickles bytes cannot hold the caller forever. `progress`
    shows the bytes received and the rate on stderr (tqdm).
    """
    if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    target = cache / (filename or Path(urllib.request.urlparse(url).path).name or "download")
    if target.is_file() and sha256_of_file(target) == sha256:
        return target
    with atomic_file(target, suffix=".part") as f, \
            tqdm(desc=f"downloading {target.name}", unit="B", unit_scale=True, disable=not progress) as bar:
        digest = hashlib.sha256()
        for chunk in _chunks(url, target, timeout, deadline, bar):
            f.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
        if digest.hexdigest() != sha256:  # raised inside the block: the partial file is deleted
            raise ValueError(f"SHA-256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}; "
                             f"the file was not kept")
    return target


def _chunks(url: str, target: Path, timeout: float, deadline: float, bar):
    """The bytes of url as they arrive (the bar learns their total), or DownloadFailed with what to do instead."""
    give_up = time.monotonic() + deadline
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            bar.total = int(response.headers.get("Content-Length") or 0) or None
            while chunk := response.read1(1 << 20):
                yield chunk
                if time.monotonic() > give_up:
                    raise DownloadFailed(f"could not download {url} within {deadline:g} s (the server sends "
                                         f"too slowly). Put the file at {target} yourself or train on a local "
                                         f"file with --data PATH.")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadFailed(f"could not download {url} ({reason}). If this machine is offline, put the file "
                             f"at {target} yourself or train on a local file with --data PATH.") from None
