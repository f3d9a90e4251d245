"""Init container: download a .mar into the model store and refuse it unless its sha256 is pinned.

The digest the archive must have is the deployment's pin (``--sha256`` / ``MODEL_SHA256``), which
is mandatory. A manifest (``<name>.manifest.json`` written by ``make archive`` and uploaded next to
the .mar) may be checked as well, and must then agree, but it comes from the same origin as the
archive: whoever can swap the archive can swap the manifest, so it is never the only source of
trust.

Transport rules: ``https://`` only (``http://`` and any redirect to a non-https URL are refused;
``--ca-file`` / ``MODEL_CA_FILE`` adds a private CA), ``file://`` for an archive on a mounted
volume, ``s3://`` with boto3 in the image. Every source has a size cap (``--max-bytes``) and a
total deadline (``--deadline``, retries included), so a huge or stalled download fails the pod
instead of filling the volume or hanging it forever. The archive is streamed to
``<dest>/<name>.mar.part`` while hashing and renamed into place only after the digest matched, so
TorchServe never sees a partial or swapped archive.

Standard library only: it runs in the serving image before TorchServe starts.

Example:
    MODEL_SHA256=$(sha256sum segmenter.mar | cut -d' ' -f1) python fetch_model.py \\
        --url https://models.example.com/segmenter.mar \\
        --manifest-url https://models.example.com/segmenter.manifest.json \\
        --dest /srv/segserve/model_archives
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
_SHA256_HEX = frozenset("0123456789abcdef")
# What k8s/base ships in MODEL_SHA256 until an overlay pins the real digest; k8s/tools/
# consistency.py knows the same string (a test holds them equal).
SHA256_PLACEHOLDER = "REPLACE_WITH_SHA256_OF_THE_MAR"
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB
DEFAULT_DEADLINE_S = 900.0
MANIFEST_MAX_BYTES = 1 << 20
SCHEMES = ("https", "file", "s3")


class FetchError(RuntimeError):
    """The archive cannot be installed; the message names the URL/field and the fix."""


@dataclass
class Limits:
    """Caps shared by every request of one fetch: bytes, total time, per-read timeout, TLS."""

    max_bytes: int = DEFAULT_MAX_BYTES
    deadline_s: float = DEFAULT_DEADLINE_S
    read_timeout_s: float = 60.0
    ca_file: str | None = None
    started: float = field(default_factory=time.monotonic)

    def remaining(self, url: str) -> float:
        """Seconds left before the deadline; FetchError once it has passed."""
        left = self.started + self.deadline_s - time.monotonic()
        if left <= 0:
            raise FetchError(
                f"{url}: not complete after the {self.deadline_s:g} s deadline (--deadline / "
                "MODEL_FETCH_DEADLINE_S); the store is slow or stalled: check it, or raise the "
                "deadline"
            )
        return left

    def timeout(self, url: str) -> float:
        """Socket timeout for the next request: never beyond the deadline."""
        return min(self.read_timeout_s, self.remaining(url))


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
    if value.strip() == SHA256_PLACEHOLDER:
        raise FetchError(
            f"{source} is still the placeholder {SHA256_PLACEHOLDER}: set MODEL_SHA256 in your "
            "overlay's segserve-model-source to `sha256sum segmenter.mar` (k8s/README.md step 2)"
        )
    if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
        raise FetchError(f"{source}: {value!r} is not a sha256 hex digest (64 hex characters)")
    return digest


def expected_sha256(manifest: dict[str, Any] | None, pinned: str | None) -> str:
    """The pinned digest; when a manifest is given too, its digest must equal the pin."""
    from_pin = normalise_sha256(pinned, "--sha256 (MODEL_SHA256)")
    if from_pin is None:
        raise FetchError(
            "no pinned sha256: set MODEL_SHA256 (or --sha256) to `sha256sum segmenter.mar`; a "
            "manifest from the same origin as the archive cannot vouch for it on its own"
        )
    if manifest is not None:
        if "sha256" not in manifest:
            raise FetchError("archive manifest has no 'sha256' key; rebuild it with `make archive`")
        from_manifest = normalise_sha256(str(manifest["sha256"]), "manifest 'sha256'")
        if from_manifest != from_pin:
            raise FetchError(
                f"manifest sha256 {from_manifest} != pinned MODEL_SHA256 {from_pin}: the archive "
                "at the URL is not the one this deployment pins; upload the right one or update "
                "the pin"
            )
    return from_pin


def archive_name(url: str, manifest: dict[str, Any] | None) -> str:
    """File name in the model store: the manifest's ``mar`` key, else the URL's last segment.

    >>> archive_name("https://h/x/segmenter.mar?sig=1", None)
    'segmenter.mar'
    """
    name = (manifest or {}).get("mar") or Path(urllib.parse.urlparse(url).path).name
    if not name.endswith(".mar") or "/" in name or name.startswith("."):
        raise FetchError(f"archive name {name!r} (from --url or manifest 'mar') must be <name>.mar")
    return name


def check_scheme(url: str, what: str = "--url") -> str:
    """The URL's scheme if allowed; FetchError naming the fix for http:// and the unknown.

    >>> check_scheme("https://h/x.mar")
    'https'
    """
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "http":
        raise FetchError(
            f"{what} {url}: http:// is refused (anyone on the path could read, stall or swap the "
            "download); serve it over https:// (a private CA: --ca-file / MODEL_CA_FILE)"
        )
    if scheme not in SCHEMES:
        raise FetchError(
            f"{what} {url}: unsupported scheme {scheme!r}; use https://, file://, s3://"
        )
    return scheme


class HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another https:// URL: https -> http would undo TLS."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlparse(target).scheme != "https":
            raise FetchError(
                f"{req.full_url}: HTTP {code} redirects to {target}, which is not https://; "
                "refused: point MODEL_URL at the final https:// location"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(limits: Limits) -> urllib.request.OpenerDirector:
    context = ssl.create_default_context(cafile=limits.ca_file)
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), HttpsOnlyRedirects
    )


def _open(url: str, limits: Limits) -> Iterator[bytes]:
    """Raw chunks of ``url``; a declared Content-Length above the cap is refused up front."""
    if check_scheme(url) == "s3":
        yield from _open_s3(url)
        return
    with _opener(limits).open(url, timeout=limits.timeout(url)) as response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise FetchError(_too_big(url, int(declared), limits.max_bytes))
        # read1, not read: read(n) blocks until n bytes arrive, so a server trickling a byte at a
        # time would never give the deadline check below a chance to run.
        read = getattr(response, "read1", response.read)
        while chunk := read(CHUNK):
            yield chunk


def _open_s3(url: str) -> Iterator[bytes]:
    try:
        import boto3  # optional: only S3 sources need it
    except ImportError as exc:
        raise FetchError(f"{url}: s3:// needs boto3 in the image (pip install boto3)") from exc
    parsed = urllib.parse.urlparse(url)
    body = boto3.client("s3").get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
    yield from body["Body"].iter_chunks(CHUNK)


def _too_big(url: str, size: int, cap: int) -> str:
    return (
        f"{url}: {size:,} bytes exceed the {cap:,}-byte cap (--max-bytes / "
        "MODEL_MAX_BYTES); wrong URL, or raise the cap together with the model-store sizeLimit"
    )


def _limited(url: str, limits: Limits, max_bytes: int | None = None) -> Iterator[bytes]:
    """Chunks of ``url``, FetchError as soon as the byte cap or the deadline is passed."""
    cap, size = max_bytes or limits.max_bytes, 0
    for chunk in _open(url, limits):
        size += len(chunk)
        if size > cap:
            raise FetchError(_too_big(url, size, cap))
        limits.remaining(url)
        yield chunk


def _with_retries(fn: Callable[[], Any], url: str, retries: int, limits: Limits) -> Any:
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            if isinstance(reason, ssl.SSLCertVerificationError):  # not transient: no retry
                raise FetchError(
                    f"{url}: TLS certificate not trusted ({reason.verify_message}); for a "
                    "private CA pass --ca-file / MODEL_CA_FILE"
                ) from exc
            if attempt == retries:
                raise FetchError(f"{url}: {exc} (after {retries} attempts)") from exc
            time.sleep(min(2**attempt, limits.remaining(url)))
    raise AssertionError("unreachable")


def read_bytes(url: str, limits: Limits, retries: int = 3) -> bytes:
    """Whole body of a small URL (the manifest), retried on network errors."""
    return b"".join(
        _with_retries(lambda: list(_limited(url, limits, MANIFEST_MAX_BYTES)), url, retries, limits)
    )


def download_verified(url: str, dest: Path, sha256: str, limits: Limits, retries: int) -> int:
    """Stream ``url`` to ``dest`` (atomically) if its sha256 equals ``sha256``; returns bytes."""
    part = dest.with_name(dest.name + ".part")

    def attempt() -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        with open(part, "wb") as out:
            for chunk in _limited(url, limits):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    try:
        actual, size = _with_retries(attempt, url, retries, limits)
        if actual != sha256:
            raise FetchError(
                f"{url}: sha256 {actual} != pinned {sha256} ({size} bytes); the archive is "
                "corrupt or not the one this deployment pins: re-upload it from `make archive` "
                "or update MODEL_SHA256"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return size


def fetch(
    url: str,
    dest_dir: Path,
    pinned_sha256: str | None,
    manifest_url: str | None = None,
    limits: Limits | None = None,
    retries: int = 3,
) -> Path:
    """Install the archive at ``url`` into ``dest_dir``; returns the installed path."""
    limits = limits or Limits()
    check_scheme(url)
    normalise_sha256(pinned_sha256, "--sha256 (MODEL_SHA256)")  # a bad pin fails before I/O
    manifest = None
    if manifest_url:
        check_scheme(manifest_url, "--manifest-url")
        try:
            manifest = json.loads(read_bytes(manifest_url, limits, retries))
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
    size = download_verified(url, dest, sha256, limits, retries)
    if manifest is not None:
        (dest_dir / dest.name.replace(".mar", ".manifest.json")).write_text(json.dumps(manifest))
    print(f"fetch-model: {dest} ({size:,} bytes, sha256 {sha256}) verified", flush=True)
    return dest


def _hard_deadline(seconds: float) -> None:
    """Backstop for what the cooperative checks cannot interrupt (a connect or headers that
    trickle in): SIGALRM a little after the deadline raises FetchError in the main thread."""

    def expire(signum, frame):
        raise FetchError(f"still running {seconds:g} s after start (--deadline); gave up")

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=env("MODEL_URL"), help="the .mar (https, file, s3)")
    parser.add_argument(
        "--sha256", default=env("MODEL_SHA256", ""), help="pinned digest (required)"
    )
    parser.add_argument("--manifest-url", default=env("MANIFEST_URL", ""), help="also check this")
    parser.add_argument("--dest", required=True, type=Path, help="model store directory")
    parser.add_argument(
        "--max-bytes", type=int, default=int(env("MODEL_MAX_BYTES") or DEFAULT_MAX_BYTES)
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=float(env("MODEL_FETCH_DEADLINE_S") or DEFAULT_DEADLINE_S),
        help="seconds for the whole fetch, retries included",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per network read")
    parser.add_argument("--ca-file", default=env("MODEL_CA_FILE") or None, help="extra CA (PEM)")
    parser.add_argument("--retries", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    limits = Limits(args.max_bytes, args.deadline, args.timeout, args.ca_file)
    try:
        if not args.url:
            raise FetchError("no archive URL: set MODEL_URL (or --url)")
        _hard_deadline(args.deadline + 5)
        fetch(args.url, args.dest, args.sha256, args.manifest_url or None, limits, args.retries)
    except FetchError as exc:
        print(f"fetch-model: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
