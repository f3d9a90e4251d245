"""Init container: download a .mar into the model store and refuse it unless its sha256 matches.

The expected digest comes from the archive manifest (``<name>.manifest.json`` written by
``make archive`` and uploaded next to the .mar) and/or a pinned ``--sha256``; when both are given
they must agree. The archive is streamed to ``<dest>/<name>.mar.part`` while hashing and renamed
into place only after the digest matched, so TorchServe never sees a partial or swapped archive.

Standard library only: it runs in the serving image before TorchServe starts. ``s3://`` URLs need
boto3 in the image.

Example:
    python fetch_model.py --url https://models.example.com/segmenter.mar \\
        --manifest-url https://models.example.com/segmenter.manifest.json \\
        --dest /srv/segserve/model_archives
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
_SHA256_HEX = frozenset("0123456789abcdef")


class FetchError(RuntimeError):
    """The archive cannot be installed; the message names the URL/field and the fix."""


def normalise_sha256(value: str | None, source: str) -> str | None:
    """Lower-case hex digest, or None when unset; raises FetchError on a malformed one.

    >>> normalise_sha256("  ", "--sha256") is None
    True
    >>> normalise_sha256("AB" * 32, "--sha256") == "ab" * 32
    True
    """
    if value is None or not value.strip():
        return None
    digest = value.strip().lower()
    if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
        raise FetchError(f"{source}: {value!r} is not a sha256 hex digest (64 hex characters)")
    return digest


def expected_sha256(manifest: dict[str, Any] | None, pinned: str | None) -> str:
    """The digest the archive must have: from the manifest, the pin, or both when they agree."""
    from_manifest = None
    if manifest is not None:
        if "sha256" not in manifest:
            raise FetchError("archive manifest has no 'sha256' key; rebuild it with `make archive`")
        from_manifest = normalise_sha256(str(manifest["sha256"]), "manifest 'sha256'")
    from_pin = normalise_sha256(pinned, "--sha256 (MODEL_SHA256)")
    if from_manifest and from_pin and from_manifest != from_pin:
        raise FetchError(
            f"manifest sha256 {from_manifest} != pinned MODEL_SHA256 {from_pin}: the archive at "
            "the URL is not the one this deployment pins; upload the right one or update the pin"
        )
    digest = from_pin or from_manifest
    if digest is None:
        raise FetchError("no expected sha256: set MANIFEST_URL or MODEL_SHA256 (or both)")
    return digest


def archive_name(url: str, manifest: dict[str, Any] | None) -> str:
    """File name in the model store: the manifest's ``mar`` key, else the URL's last segment.

    >>> archive_name("https://h/x/segmenter.mar?sig=1", None)
    'segmenter.mar'
    """
    name = (manifest or {}).get("mar") or Path(urllib.parse.urlparse(url).path).name
    if not name.endswith(".mar") or "/" in name or name.startswith("."):
        raise FetchError(f"archive name {name!r} (from --url or manifest 'mar') must be <name>.mar")
    return name


def _open(url: str, timeout: float) -> Iterator[bytes]:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https", "file"):
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked)
            while chunk := response.read(CHUNK):
                yield chunk
    elif scheme == "s3":
        try:
            import boto3  # optional: only S3 sources need it
        except ImportError as exc:
            raise FetchError(f"{url}: s3:// needs boto3 in the image (pip install boto3)") from exc
        parsed = urllib.parse.urlparse(url)
        body = boto3.client("s3").get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
        yield from body["Body"].iter_chunks(CHUNK)
    else:
        raise FetchError(
            f"{url}: unsupported scheme {scheme!r}; use https://, http://, file://, s3://"
        )


def read_bytes(url: str, timeout: float = 60.0, retries: int = 3) -> bytes:
    """Whole body of a (small) URL, retried on network errors."""
    return b"".join(_with_retries(lambda: list(_open(url, timeout)), url, retries))


def _with_retries(fn, url: str, retries: int):
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            if attempt == retries:
                raise FetchError(f"{url}: {exc} (after {retries} attempts)") from exc
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def download_verified(url: str, dest: Path, sha256: str, timeout: float, retries: int) -> int:
    """Stream ``url`` to ``dest`` (atomically) if its sha256 equals ``sha256``; returns bytes."""
    part = dest.with_name(dest.name + ".part")

    def attempt() -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        with open(part, "wb") as out:
            for chunk in _open(url, timeout):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    try:
        actual, size = _with_retries(attempt, url, retries)
        if actual != sha256:
            raise FetchError(
                f"{url}: sha256 {actual} != expected {sha256} ({size} bytes); the archive is "
                "corrupt or not the one the manifest describes: re-upload both from `make archive`"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return size


def fetch(
    url: str,
    dest_dir: Path,
    manifest_url: str | None = None,
    pinned_sha256: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Install the archive at ``url`` into ``dest_dir``; returns the installed path."""
    manifest = None
    if manifest_url:
        try:
            manifest = json.loads(read_bytes(manifest_url, timeout, retries))
        except json.JSONDecodeError as exc:
            raise FetchError(
                f"{manifest_url}: not JSON ({exc}); expected <name>.manifest.json"
            ) from exc
        if not isinstance(manifest, dict):
            raise FetchError(f"{manifest_url}: expected a JSON object (the archive manifest)")
    sha256 = expected_sha256(manifest, pinned_sha256)
    if not dest_dir.is_dir():
        raise FetchError(f"--dest {dest_dir} is not a directory (mount the model-store volume)")
    dest = dest_dir / archive_name(url, manifest)
    size = download_verified(url, dest, sha256, timeout, retries)
    if manifest is not None:
        (dest_dir / dest.name.replace(".mar", ".manifest.json")).write_text(json.dumps(manifest))
    print(f"fetch-model: {dest} ({size:,} bytes, sha256 {sha256}) verified", flush=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the .mar (https://, http://, file://, s3://)")
    parser.add_argument("--manifest-url", default="", help="<name>.manifest.json next to it")
    parser.add_argument("--sha256", default="", help="pinned digest (optional when a manifest is)")
    parser.add_argument("--dest", required=True, type=Path, help="model store directory")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per network read")
    parser.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        fetch(
            args.url, args.dest, args.manifest_url or None, args.sha256, args.timeout, args.retries
        )
    except FetchError as exc:
        print(f"fetch-model: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
