"""Backups in an S3-compatible object store: ``s3://bucket/prefix``.

The bucket holds the layout of a backup directory (see :mod:`bastion.backup`)
under ``prefix``: ``wal/<segment>``, ``base/<stamp>.tar`` (the base backup's
directory as one POSIX tar: one request instead of a thousand, and empty
directories kept) and ``base/<stamp>.json``. Nothing here restores or
verifies by itself: a backup is downloaded into a private temporary directory
and the local code checks or restores it.

- Every object is written create-only (``If-None-Match: *``, conditional
  writes of the S3 API) with its SHA-256 sent as ``x-amz-checksum-sha256``, so
  the store rejects a body that changed in transit, and kept in the object's
  metadata: a same-named object of another size or digest is refused, never
  overwritten. Downloads ask for the stored checksum to be validated
  (``ChecksumMode=ENABLED``) and compare the digest in the metadata.
- A base backup's record (``base/<stamp>.json``) is written last: a backup
  interrupted half-way has no record and is ignored, like a local one left
  under its temporary name.
- The server archives WAL to the local ``BASTION_BACKUP_DIR`` only;
  :func:`sync_wal` (``bastion db backup-sync``, from a timer) uploads the
  segments not yet in the bucket. The RPO of the bucket alone is therefore the
  sync interval plus ``backup_archive_timeout_seconds``.

Credentials come from boto3's standard chain only (environment, shared
credentials file, ``AWS_PROFILE``, instance or task role).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from bastion.backup import (
    BASE_DIR,
    WAL_DIR,
    BackupError,
    BaseBackup,
    backup_for,
)

# Files the server archives: segments, timeline histories, backup labels,
# partial segments; never basic_archive's temporary names.
_ARCHIVED = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$"
)
_UPLOADERS = 8
_SINGLE_PUT_LIMIT = 5 * 1024**3


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without a trailing slash; "" for the bucket's root

    @classmethod
    def parse(cls, url: str) -> S3Location:
        match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", url)
        if match is None:
            raise BackupError("not an S3 location: use s3://bucket or s3://bucket/prefix")
        return cls(match[1], (match[2] or "").strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A client with boto3's standard credential chain (no key from settings)."""
    config = botocore.config.Config(
        connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 3}
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )


@contextlib.contextmanager
def s3_errors(where: S3Location) -> Iterator[None]:
    """Turn the store's refusals into one clear line."""
    try:
        yield
    except botocore.exceptions.NoCredentialsError:
        raise BackupError(
            "no AWS credentials: set them the standard way (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a shared credentials file with AWS_PROFILE, or a role)"
        ) from None
    except botocore.exceptions.EndpointConnectionError:
        raise BackupError(f"cannot reach the S3 endpoint for {where}") from None
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"NoSuchBucket", "404"}:
            raise BackupError(f"the bucket {where.bucket!r} does not exist") from None
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise BackupError(
                f"access denied to {where}: check the AWS credentials and the bucket policy"
            ) from None
        raise BackupError(f"the S3 store refused a request for {where}: {code}") from None


# -- uploading ---------------------------------------------------------------------


def upload_backup(
    client: Any, dest: S3Location, location: Path, backup: BaseBackup, wal: Path | None
) -> int:
    """Upload a local base backup, then the WAL archive ``wal``, then its record.

    Returns the number of objects written. The bucket is checked first, so a
    missing or forbidden one is refused before anything is written.
    """
    with s3_errors(dest):
        client.head_bucket(Bucket=dest.bucket)
        bundle = location / BASE_DIR / f".{backup.name}.tar"
        with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(backup.path(location), arcname=backup.name)
        try:
            written = _put_all(
                client, dest, [(dest.key(BASE_DIR, f"{backup.name}.tar"), bundle)], {}
            )
        finally:
            bundle.unlink()
        if wal is not None:
            written += sync_wal(client, dest, wal)
        record = location / BASE_DIR / f"{backup.name}.json"
        written += _put_all(client, dest, [(dest.key(BASE_DIR, record.name), record)], {})
    return written


def sync_wal(client: Any, dest: S3Location, wal: Path) -> int:
    """Upload the archived WAL files not yet in the bucket; return how many.

    A same-named object of another size or SHA-256 is refused, not replaced.
    """
    with s3_errors(dest):
        existing = {
            item["Key"]: int(item["Size"]) for item in _listing(client, dest, dest.key(WAL_DIR))
        }
        jobs = [
            (dest.key(WAL_DIR, p.name), p)
            for p in sorted(wal.iterdir())
            if _ARCHIVED.match(p.name) and p.is_file()
        ]
        return _put_all(client, dest, jobs, existing)


def _put_all(
    client: Any, dest: S3Location, jobs: list[tuple[str, Path]], existing: dict[str, int]
) -> int:
    with ThreadPoolExecutor(_UPLOADERS) as pool:
        return sum(pool.map(lambda job: _put(client, dest, job[0], job[1], existing), jobs))


def _put(client: Any, dest: S3Location, key: str, path: Path, existing: dict[str, int]) -> int:
    digest = _sha256(path)
    size = path.stat().st_size
    if key in existing:
        _same_or_refuse(client, dest, key, size, digest, existing[key])
        return 0
    if size > _SINGLE_PUT_LIMIT:
        # A single PUT stops at 5 GiB: a multipart upload, the same checksum
        # and metadata, create-only by the check above rather than atomically.
        client.upload_file(
            str(path), dest.bucket, key,
            ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest.hex()}},
        )  # fmt: skip
        return 1
    try:
        with path.open("rb") as body:
            client.put_object(
                Bucket=dest.bucket,
                Key=key,
                Body=body,
                IfNoneMatch="*",  # create-only: never replaces an object
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=base64.b64encode(digest).decode(),
                Metadata={"sha256": digest.hex()},
            )
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"PreconditionFailed", "412"}:
            raise
        # Written meanwhile (another sync): fine if it is the same file.
        head = client.head_object(Bucket=dest.bucket, Key=key)
        _same_or_refuse(client, dest, key, size, digest, int(head["ContentLength"]))
        return 0
    return 1


def _same_or_refuse(
    client: Any, dest: S3Location, key: str, size: int, digest: bytes, stored_size: int
) -> None:
    same = stored_size == size
    if same:
        head = client.head_object(Bucket=dest.bucket, Key=key)
        same = head.get("Metadata", {}).get("sha256") == digest.hex()
    if not same:
        raise BackupError(
            f"s3://{dest.bucket}/{key} already exists with other content: refusing to "
            "overwrite it (another installation writing to the same prefix?)"
        )


# -- downloading -------------------------------------------------------------------


def manifests(client: Any, src: S3Location) -> list[BaseBackup]:
    """The complete base backups in the bucket (those with a record), oldest first."""
    found = []
    with s3_errors(src):
        client.head_bucket(Bucket=src.bucket)
        for item in _listing(client, src, src.key(BASE_DIR)):
            name = item["Key"].rsplit("/", 1)[-1]
            if item["Key"] != src.key(BASE_DIR, name) or not name.endswith(".json"):
                continue
            record = json.loads(_checked(client, src, item["Key"]))
            record["end_time"] = datetime.fromisoformat(record["end_time"])
            found.append(BaseBackup(**record))
    return sorted(found, key=lambda b: b.name)


@contextlib.contextmanager
def downloaded(client: Any, src: S3Location, target_time: datetime | None = None) -> Iterator[Path]:
    """Download the newest base backup (the newest ended by ``target_time``) and
    the WAL after its start into a private temporary backup directory, removed
    on exit."""
    backups = manifests(client, src)
    if target_time is not None:
        backup = backup_for(backups, target_time)
    elif backups:
        backup = backups[-1]
    else:
        raise BackupError(f"no complete base backup in {src}")
    root = Path(tempfile.mkdtemp(prefix="bastion-s3-backup-"))
    try:
        # 0711: a restored server's user reaches wal/ (handed to it), nobody lists.
        root.chmod(0o711)
        with s3_errors(src):
            bundle = root / BASE_DIR / f".{backup.name}.tar"
            jobs = [(src.key(BASE_DIR, f"{backup.name}.tar"), bundle)]
            first = _start_segment(backup, _listing(client, src, src.key(WAL_DIR)))
            wal_key = src.key(WAL_DIR) + "/"
            for item in _listing(client, src, src.key(WAL_DIR)):
                name = item["Key"][len(wal_key) :]
                if _ARCHIVED.match(name) and (first is None or name[:24] >= first):
                    jobs.append((item["Key"], root / WAL_DIR / name))
            (root / WAL_DIR).mkdir(mode=0o700)
            (root / BASE_DIR).mkdir(mode=0o700)
            with ThreadPoolExecutor(_UPLOADERS) as pool:
                list(pool.map(lambda job: _fetch(client, src, *job), jobs))
            with tarfile.open(bundle) as tar:
                for member in tar.getmembers():  # a tampered bundle writes nowhere else
                    if member.name != backup.name and not member.name.startswith(f"{backup.name}/"):
                        raise BackupError(f"{src}: the bundle of {backup.name} holds other paths")
                tar.extractall(root / BASE_DIR, filter="data")
            bundle.unlink()
        (root / BASE_DIR / f"{backup.name}.json").write_text(backup.to_json())
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start_segment(backup: BaseBackup, wal_items: list[dict[str, Any]]) -> str | None:
    """The name of the segment holding the backup's start (every segment is whole)."""
    sizes = [int(i["Size"]) for i in wal_items if re.search(r"/[0-9A-F]{24}$", i["Key"])]
    if not sizes:
        return None
    size = max(sizes)
    high, low = backup.start_lsn.split("/")
    number = ((int(high, 16) << 32) | int(low, 16)) // size
    per_log = 0x1_0000_0000 // size
    return f"{backup.timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def _fetch(client: Any, src: S3Location, key: str, path: Path) -> None:
    """Stream an object to ``path``; refused unless its SHA-256 is the one
    recorded at upload."""
    answer = client.get_object(Bucket=src.bucket, Key=key, ChecksumMode="ENABLED")
    digest = hashlib.sha256()
    with path.open("xb") as fh:
        for chunk in answer["Body"].iter_chunks(1 << 20):
            digest.update(chunk)
            fh.write(chunk)
    _check_digest(src, key, answer, digest.hexdigest())


def _checked(client: Any, src: S3Location, key: str) -> bytes:
    """An object's content, refused unless its SHA-256 is the one recorded at upload."""
    answer = client.get_object(Bucket=src.bucket, Key=key, ChecksumMode="ENABLED")
    data: bytes = answer["Body"].read()
    _check_digest(src, key, answer, hashlib.sha256(data).hexdigest())
    return data


def _check_digest(src: S3Location, key: str, answer: dict[str, Any], digest: str) -> None:
    if answer.get("Metadata", {}).get("sha256") != digest:
        raise BackupError(
            f"s3://{src.bucket}/{key} changed in the bucket (its SHA-256 is not the one "
            "recorded when it was uploaded)"
        )


def _listing(client: Any, where: S3Location, prefix: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=where.bucket, Prefix=prefix + "/"
    ):
        items.extend(page.get("Contents", []))
    return items


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()
