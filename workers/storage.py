"""Local paths and s3:// URIs behind one small interface.

Objects are written and read through one cached boto3 client per process on S3; pyarrow
filesystems stream the input files. Used by the driver and the actors alike."""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from workers.errors import StorageError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint() -> str | None:
    """A custom S3 endpoint (MinIO, a local test server), as boto3 reads it from the environment."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem() -> pafs.S3FileSystem:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = s3_endpoint()
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_ATTEMPTS)
    if not endpoint:
        return pafs.S3FileSystem(region=region, retry_strategy=retry)
    # pyarrow does not read the endpoint variables itself: pass them on explicitly.
    scheme, _, host = endpoint.partition("://")
    return pafs.S3FileSystem(
        region=region, endpoint_override=host or scheme, scheme=scheme if host else "https", retry_strategy=retry
    )


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). S3 honours AWS_ENDPOINT_URL_S3 and the usual AWS credentials."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; expected a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Locally through a temporary name and a rename, so a reader never
    sees a half-written file; on S3 one PUT (atomic already) through the process's client."""
    if is_s3(uri):
        bucket, key = bucket_key(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    with local_output(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def temp_name(path: str) -> str:
    """A temporary sibling of `path`: hidden (a leading dot) and not ending in the real suffix, so
    no reader's glob or directory scan (`*.parquet`, pyarrow's and Ray's hidden-file rules) sees it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")


TEMP_TRIES = 1000


def new_temp(path: str) -> str:
    """Create `path`'s folder and an empty temporary file in it, and return the file's name. A
    racing `delete` removes a folder the moment it is empty, so it can take the folder between the
    two steps: then both are made again. Once the temporary exists the folder is not empty."""
    tmp = temp_name(path)
    for attempt in range(TEMP_TRIES):
        try:
            # makedirs raises FileExistsError too when the folder goes between its mkdir and its check
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "xb"):
                return tmp
        except (FileNotFoundError, FileExistsError):
            time.sleep(0.0001 * min(attempt, 100))  # let the delete that is removing it finish
    raise StorageError(
        f"{path}: its folder was removed {TEMP_TRIES} times while a file was being created in it; expected "
        f"one writer's clean-up at a time. Fix: check that nothing else deletes folders under the output."
    )


@contextlib.contextmanager
def local_output(uri: str):
    """A local file path to write an object into; on success it becomes the object whole.
    Locally a hidden temporary beside the target, fsynced and renamed over it; on S3 a temporary
    file uploaded on exit, in parts when big (multipart), so objects of any size stream."""
    if is_s3(uri):
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix="ifrender-upload-")
        os.close(fd)
        try:
            yield tmp
            upload_file(tmp, uri)
        finally:
            os.unlink(tmp)
        return
    path = resolve(uri)[1]
    tmp = new_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(os.path.dirname(path))


MULTIPART_BYTES = 64 * 2**20  # objects past this go up in parts, 64 MiB each


def upload_file(path: str, uri: str) -> None:
    """A local file to S3, in parts past MULTIPART_BYTES: one PUT holds at most 5 GB, and a part
    that fails is retried alone."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = bucket_key(uri)
    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
    s3_client().upload_file(path, bucket, key, Config=config)


def copy_object(src: str, dst: str) -> None:
    """Copy one object to another key of the same store, whole (no reader sees a partial copy).
    Raises FileNotFoundError when `src` is gone."""
    if is_s3(src):
        from boto3.s3.transfer import TransferConfig

        client = s3_client()
        (sb, sk), (db, dk) = bucket_key(src), bucket_key(dst)
        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        try:
            client.copy({"Bucket": sb, "Key": sk}, db, dk, Config=config)  # in parts past 5 GB
        except client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(src) from err
            raise
        return
    import shutil

    with local_output(dst) as tmp:
        shutil.copyfile(resolve(src)[1], tmp)


def versions(root: str, prefix: str) -> dict[str, str]:
    """{key relative to root: version tag} for objects under `prefix`, from one listing: the ETag
    on S3, mtime and size locally. A rewritten object gets a new tag."""
    if is_s3(root):
        bucket, base = bucket_key(root.rstrip("/") + "/")
        found = {}
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + prefix):
            found.update({o["Key"][len(base) :]: o["ETag"].strip('"') for o in page.get("Contents", [])})
        return found
    top = resolve(root)[1]
    found = {}
    for key in list_prefix(root, prefix):
        with contextlib.suppress(FileNotFoundError):
            found[key] = _local_tag(os.stat(os.path.join(top, key)))
    return found


def version(uri: str) -> str | None:
    """One object's version tag (see `versions`), None when there is none."""
    head = _head(uri)
    if head is None:
        return None
    return head["ETag"].strip('"') if is_s3(uri) else _local_tag(head)


def _local_tag(info: os.stat_result) -> str:
    return f"{info.st_mtime_ns}-{info.st_size}"


def _head(uri: str):
    """An object's S3 HEAD answer, or a local file's os.stat; None when there is none."""
    if is_s3(uri):
        bucket, key = bucket_key(uri)
        client = s3_client()
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except client.exceptions.ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
    try:
        return os.stat(resolve(uri)[1])
    except FileNotFoundError:
        return None


def _fsync_dir(path: str) -> None:
    """Make a rename or link in `path` survive a crash of the machine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another writer already deleted what was renamed there, and the folder
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- objects: read, list, delete, create-once ----------------------------------------------

_S3_ATTEMPTS = 10  # transient errors (503 SlowDown, resets, timeouts) retried with backoff


def s3_client():
    """One client per process and endpoint: building one costs more than a small GET."""
    return _new_s3_client(s3_endpoint())


@functools.cache
def _new_s3_client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": _S3_ATTEMPTS}, max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def read_bytes(uri: str) -> bytes | None:
    """The whole object, or None when there is none. On S3 through boto3: pyarrow can report a
    throttled HEAD as a missing object, and a commit marker taken for missing is a lost commit."""
    if is_s3(uri):
        bucket, key = bucket_key(uri)
        client = s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def object_size(uri: str) -> int | None:
    """An object's size in bytes, None when there is none; a local path that is not a regular
    file (a directory, FIFO, device) is refused before anything reads it, as reading could block."""
    info = _head(uri)
    if info is None:
        return None
    if is_s3(uri):
        return info["ContentLength"]
    if not stat.S_ISREG(info.st_mode):
        raise StorageError(f"{uri}: not a regular file; expected an image file")
    return info.st_size


def inside(top: Path, key: str) -> Path:
    """top/key, refusing a key whose folders below `top` include a link: ifrender never lists,
    writes or deletes through a link inside an output (the output itself may be one)."""
    path = top
    for part in key.split("/")[:-1]:
        path = path / part
        if path.is_symlink():
            raise StorageError(
                f"{path}: a link inside the output (to {os.readlink(path)}); expected a folder. ifrender never "
                f"lists, writes or deletes through a link in its output, so that no file it did not write is "
                f"touched. Fix: remove the link (or replace it with a folder of its own), or point output.path "
                f"at a folder that holds no link."
            )
    return path / key.split("/")[-1]


def list_prefix(root: str, prefix: str = "") -> list[str]:
    """Keys relative to `root` (a directory or s3:// prefix) of every object under it whose key
    starts with `prefix` (a folder like "commits/" or a name start like "images/000001-"), sorted.
    Locally a link is listed as a key of its own and never followed; a link among the prefix's
    folders is refused (`inside`)."""
    if is_s3(root):
        bucket, base = bucket_key(root.rstrip("/") + "/")
        found = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + prefix):
            found += [o["Key"][len(base) :] for o in page.get("Contents", [])]
        return sorted(found)
    top = Path(resolve(root)[1])
    folder, _, start = prefix.rpartition("/")
    parent = inside(top, folder + "/") if folder else top  # refuses a link among the folders
    # Another writer may delete files and folders while this lists them (a loser cleaning up):
    # what vanishes is simply not listed. os.walk skips folders that vanish under it.
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if not entry.name.startswith(start) or ".tmp-" in entry.name:
            continue
        if entry.is_dir(follow_symlinks=False):
            # os.walk follows no link below its top; a link to a folder comes back among the folders.
            for folder_path, folders, names in os.walk(entry.path):
                links = [d for d in folders if os.path.islink(os.path.join(folder_path, d))]
                found += [os.path.join(folder_path, n) for n in names + links if ".tmp-" not in n]
        else:  # a file, or a link (to anything): listed as itself
            found.append(entry.path)
    return sorted(Path(f).relative_to(top).as_posix() for f in found)


def delete(root: str, keys: list[str]) -> None:
    """Delete objects of `root` by their keys. Locally a link is removed as a link, a key whose
    folders include a link is refused (`inside`), and a folder emptied is removed, never `root`."""
    if not keys:
        return
    if is_s3(root):
        client = s3_client()
        bucket, base = bucket_key(root.rstrip("/") + "/")
        for i in range(0, len(keys), 1000):
            objects = [{"Key": base + k} for k in keys[i : i + 1000]]
            answer = client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            failed = answer.get("Errors", [])  # one call, but each key succeeds or fails alone
            if failed:
                shown = "; ".join(f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".strip() for e in failed[:5])
                raise StorageError(
                    f"s3://{bucket}: {len(failed)} of {len(objects)} deletes failed ({shown}). Fix: check the "
                    f"role's s3:DeleteObject permission on the prefix, then run again."
                )
        return
    top = Path(resolve(root)[1])
    for key in keys:
        path = inside(top, key)
        path.unlink(missing_ok=True)  # a link goes as a link: its target is never touched
        if path.parent != top:
            with contextlib.suppress(OSError):  # remove the folder once it is empty
                path.parent.rmdir()


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create an object only if none exists: True if this call created it, False if it existed.
    S3: a conditional PUT (If-None-Match: *); 412 means another writer won, 409 means a racing
    conditional write is in flight, so retry until it resolves. Locally: link() of a complete
    temporary file, which fails if the name exists, so the object appears whole or not at all."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = bucket_key(uri)
        client = s3_client()
        for attempt in range(8):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412:
                    # A retried PUT whose first try landed but whose answer was lost also gets
                    # 412: the object then holds exactly our bytes, and this call did create it.
                    return client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
                if status != 409:
                    raise
                time.sleep(0.1 * 2**attempt)
        raise StorageError(f"{uri}: conditional writes kept conflicting (409) after 8 tries")
    path = Path(resolve(uri)[1])
    tmp = Path(new_temp(str(path)))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # a marker on disk names data already on disk
    try:
        os.link(tmp, path)
        _fsync_dir(str(path.parent))
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
