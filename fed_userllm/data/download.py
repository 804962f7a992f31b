"""Named MovieLens variants from GroupLens: verified, atomic, resumable downloads into a user cache dir."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from tqdm import tqdm

from fed_userllm.data.movielens import DataError

GROUPLENS = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Variant:
    """A downloadable release: archive URL, folder inside the archive, and its published digests.

    GroupLens publishes MD5 sums; SHA-256 is pinned where it is known. The SHA-256 of every archive
    actually used is also recorded in the prepared-data manifest.
    """

    name: str
    url: str
    folder: str
    sha256: str | None = None
    md5: str | None = None


VARIANTS = {v.name: v for v in (
    Variant("ml-100k", f"{GROUPLENS}/ml-100k.zip", "ml-100k", md5="0e33842e24a9c977be4e0107933c0723"),
    Variant("ml-1m", f"{GROUPLENS}/ml-1m.zip", "ml-1m", md5="c4d9eecfca2ab87c1945afe126590906"),
    Variant("ml-10m", f"{GROUPLENS}/ml-10m.zip", "ml-10M100K", md5="ce571fd55effeba0271552578f2648bd"),
    Variant("ml-20m", f"{GROUPLENS}/ml-20m.zip", "ml-20m",
            sha256="96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
            md5="cd245b17a1ae2cc31bb14903e1204af3"),
    Variant("ml-25m", f"{GROUPLENS}/ml-25m.zip", "ml-25m", md5="6b51fb2759a8657d3bfcbfc42b592ada"),
    Variant("ml-32m", f"{GROUPLENS}/ml-32m.zip", "ml-32m"),
    Variant("ml-latest", f"{GROUPLENS}/ml-latest.zip", "ml-latest"),  # updated by GroupLens: no fixed digest
)}


def cache_dir() -> Path:
    """Where downloads and prepared data go: $FED_USERLLM_CACHE or the platform's user cache dir."""
    return Path(os.environ.get("FED_USERLLM_CACHE") or platformdirs.user_cache_dir("fed-userllm"))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(variant: Variant, root: Path | None = None) -> Path:
    """Return the extracted folder of ``variant``, downloading it first if needed.

    The archive is streamed to ``<name>.zip.part`` (resumed with an HTTP Range request after an
    interruption), verified, then renamed; extraction goes to a temporary folder renamed into place, so
    an interrupted run never leaves a half-written archive or folder behind under the final name.
    """
    root = Path(root or cache_dir()) / "downloads"
    target = root / variant.name
    if (target / ".complete").is_file():
        return target / variant.folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{variant.name}.zip"
    if not archive.is_file():
        part = archive.with_suffix(".zip.part")
        _download(variant, part)
        _verify(variant, part)
        part.replace(archive)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{variant.name}-"))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as err:
            archive.unlink()
            raise DataError(f"{archive}: corrupt archive ({err}); it was removed, run again to re-download") from err
        if not (tmp / variant.folder).is_dir():
            raise DataError(f"{archive}: expected a folder '{variant.folder}' inside the archive")
        (tmp / ".complete").write_text(file_digest(archive))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target / variant.folder


def _download(variant: Variant, part: Path) -> None:
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(variant.url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"could not download {variant.name} from {variant.url} ({getattr(err, 'reason', err)}). "
            f"Without a network, download {variant.url.rsplit('/', 1)[-1]} elsewhere, unzip it, and pass the "
            f"folder instead: --dataset /path/to/{variant.folder}") from err
    with response:
        resumed = done and response.status == 206
        total = int(response.headers.get("Content-Length") or 0) + (done if resumed else 0)
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total or None, initial=done if resumed else 0, unit="B", unit_scale=True,
                desc=f"download {variant.name}") as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())


def _verify(variant: Variant, part: Path) -> None:
    for algorithm, expected in (("sha256", variant.sha256), ("md5", variant.md5)):
        if expected and (actual := file_digest(part, algorithm)) != expected:
            part.unlink()
            raise DataError(f"{variant.url}: {algorithm} {actual} does not match the published {expected}; "
                            "the download was deleted")
