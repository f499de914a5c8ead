"""Downloading MVTec AD: resumable, checksum-verified, and explicit when the machine is offline.

The official archive (about 4.9 GB) is ``mvtec_anomaly_detection.tar.xz`` from MVTec's share;
its SHA-256 is the one anomalib checks. A broken download resumes where it stopped (HTTP Range);
a file that fails the checksum is deleted, never extracted. Without a network the helper stops at
once with the manual steps: download the archive in a browser, put it where the message says,
run again — the archive is then verified and extracted without any network access.

MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial); the helper does not change that.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adnb.runtime.errors import AdnbError, OfflineError
from adnb.runtime.progress import progress


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str
    filename: str
    licence: str


MVTEC_AD = Archive(
    url="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
        "mvtec_anomaly_detection.tar.xz",
    sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
    filename="mvtec_anomaly_detection.tar.xz",
    licence="CC BY-NC-SA 4.0, MVTec Software GmbH (cite Bergmann et al., CVPR 2019)",
)
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_steps(archive: Archive, target: Path) -> str:
    return (f"download {archive.url} in a browser on a connected machine, copy it to {target}, and run the same "
            f"command again (it is then verified against SHA-256 {archive.sha256[:16]}… and extracted offline)")


def fetch(archive: Archive, folder: str | Path, timeout: float = 30.0) -> Path:
    """Download ``archive`` into ``folder`` (resuming a partial ``.part`` file) and verify it."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    target, partial = folder / archive.filename, folder / (archive.filename + ".part")
    if target.is_file():
        return _verified(archive, target)
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(archive.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if have and response.status != 206:  # the server ignored Range: start over
                have = 0
            total = int(response.headers.get("Content-Length") or 0) + have
            with open(partial, "ab" if have else "wb") as fh, progress(total=total or None, initial=have, unit="B",
                                                                          unit_scale=True, desc=archive.filename) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    bar.update(len(block))
        if total and partial.stat().st_size < total:
            raise ConnectionError(f"the connection closed after {partial.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        kept = f" ({partial.stat().st_size} bytes kept in {partial.name}; a re-run resumes)" if partial.is_file() else ""
        raise OfflineError(f"cannot download {archive.filename}: {reason}{kept}. To fetch it by hand, "
                           f"{_manual_steps(archive, target)}.") from None
    partial.replace(target)
    return _verified(archive, target)


def _verified(archive: Archive, path: Path) -> Path:
    actual = sha256_of(path)
    if actual != archive.sha256:
        path.unlink()
        raise AdnbError(f"{path.name} failed its checksum (SHA-256 {actual[:16]}…, expected {archive.sha256[:16]}…) "
                        "and was deleted; run again to download it afresh")
    return path


def extract(path: Path, dest: str | Path, categories: Sequence[str] | None = None) -> Path:
    """Extract the archive into ``dest`` (only the given top-level category folders, if any)."""
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if not categories or Path(m.name).parts[0] in categories]
        if categories and not members:
            found = sorted({Path(m.name).parts[0] for m in tar.getmembers() if Path(m.name).parts})
            raise AdnbError(f"no category {', '.join(categories)} in {path.name}; it holds: {', '.join(found)}")
        tar.extractall(dest, members=members, filter="data")
    return dest


def download_mvtec(root: str | Path, categories: Sequence[str] | None = None, archive: Archive = MVTEC_AD,
                   keep_archive: bool = True) -> Path:
    """Fetch and extract MVTec AD (or some categories of it) under ``root``; returns ``root``."""
    root = Path(root).expanduser()
    wanted = list(categories or [])
    if wanted and all((root / c / "train").is_dir() for c in wanted):
        return root
    path = fetch(archive, root)
    extract(path, root, wanted or None)
    if not keep_archive:
        path.unlink()
    return root

