"""One writer at a time: an advisory file lock that the kernel drops when the process dies.

Readers never take it; they read a pinned snapshot. A writer that is killed (even with
kill -9) releases the lock with its process, so the next writer never waits on a stale file.
On an object store, :func:`object_lock` plays that part with an expiring object.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LockLostError, StorageError, WarehouseLockedError

LOCK_NAME = ".ew-write.lock"


class Hold:
    """The write lock as its holder sees it: :meth:`check` before every commit.

    A file lock cannot be lost while its process lives; an object lock can: when its heartbeat
    fails to renew it for longer than its time to live, another writer may take it over, and a
    commit then could interleave with that writer's.
    """

    def __init__(self, where: str):
        self.where = where
        self.lost = False

    def check(self) -> None:
        if self.lost:
            raise LockLostError(self.where)


@contextmanager
def write_lock(root: Path, *, wait: float = 0.0) -> Iterator[Hold]:
    """Hold the warehouse's write lock for the duration of the block, or raise WarehouseLockedError.

    ``wait``: seconds to wait for another writer to finish first (0: fail at once). A short
    commit at the end of a long job (a head after minutes of training) waits rather than
    losing its work to a writer that holds the lock for a moment.
    """
    path = root / LOCK_NAME
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise StorageError(
            f"cannot write to the warehouse {root} ({error.strerror}: {path}); commands that write need "
            "write access to it: check its permissions and free space, or read it with `ew query`"
        ) from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown process"
                    raise WarehouseLockedError(root, holder) from None
                time.sleep(0.05)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield Hold(str(root))
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


@contextmanager
def object_lock(bucket: str, key: str, *, where: str, ttl: float, wait: float = 0.0) -> Iterator[Hold]:
    """The write lock of a warehouse on S3: an object created only if absent (``If-None-Match: *``).

    An object store has no process to drop a lock when its holder dies, so the object holds an
    expiry instead, pushed forward by a heartbeat thread every ``ttl / 3`` seconds while the block
    runs. A writer killed with kill -9 stops the heartbeat; once its expiry has passed the next
    writer replaces the object (``If-Match`` on the stale object's ETag, so of two writers taking
    over at once only one wins) and settles what the dead one left, as after a local crash. A
    holder whose lock was taken over, or not renewed for ``ttl`` seconds, is told at its next
    commit (:meth:`Hold.check`) and commits nothing more.
    """
    client, errors = _s3_client()
    owner = {"owner": f"pid {os.getpid()} on {socket.gethostname()}", "pid": os.getpid(),
             "host": socket.gethostname(), "token": os.urandom(8).hex()}

    def body() -> bytes:
        return json.dumps({**owner, "expires": time.time() + ttl}).encode()

    def refused(error) -> bool:
        code = error.response.get("Error", {}).get("Code", "")
        return code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}

    deadline = time.monotonic() + wait
    etag = None
    while etag is None:
        try:
            etag = client.put_object(Bucket=bucket, Key=key, Body=body(), IfNoneMatch="*")["ETag"]
            break
        except errors.ClientError as error:
            if not refused(error):
                raise _lock_storage_error(where, error) from None
        holder, held_etag = _read_holder(client, errors, bucket, key)
        if held_etag is not None and holder.get("expires", 0) < time.time():
            try:  # the holder stopped its heartbeat: take the lock over
                etag = client.put_object(Bucket=bucket, Key=key, Body=body(), IfMatch=held_etag)["ETag"]
                break
            except errors.ClientError as error:
                if not refused(error):
                    raise _lock_storage_error(where, error) from None
        if time.monotonic() >= deadline:
            raise WarehouseLockedError(where, holder.get("owner") or "unknown process")
        time.sleep(0.2)

    hold = _ObjectHold(where, etag=etag, ttl=ttl)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl / 3):
            try:
                hold.etag = client.put_object(Bucket=bucket, Key=key, Body=body(), IfMatch=hold.etag)["ETag"]
                hold.renewed = time.monotonic()
            except errors.ClientError:
                hold.lost = True  # taken over: this writer was too slow to renew
                return
            except Exception:  # a network hiccup: try again at the next beat, the expiry leaves room for two
                continue

    beating = threading.Thread(target=heartbeat, name="ew-lock-heartbeat", daemon=True)
    beating.start()
    try:
        yield hold
    finally:
        stop.set()
        beating.join()
        if not hold.lost:
            try:
                client.delete_object(Bucket=bucket, Key=key, IfMatch=hold.etag)
            except errors.ClientError:
                pass  # taken over meanwhile: the object is someone else's now
            except Exception:
                pass  # unreachable: the lock expires by itself


class _ObjectHold(Hold):
    """An object lock's :class:`Hold`: lost when taken over, or when not renewed for ``ttl`` seconds
    (then its expiry has passed and another writer may have taken it)."""

    def __init__(self, where: str, *, etag: str, ttl: float):
        super().__init__(where)
        self.etag = etag
        self.ttl = ttl
        self.renewed = time.monotonic()

    def check(self) -> None:
        if time.monotonic() - self.renewed > self.ttl:
            self.lost = True
        super().check()


def _s3_client():
    """A boto3 S3 client configured from the AWS environment variables, and botocore's exceptions."""
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise StorageError("writing to a warehouse on S3 needs the Python package 'boto3', which is not installed; "
                           "install it with: pip install 'ew[s3]'") from None
    return boto3.client("s3"), botocore.exceptions


def _read_holder(client, errors, bucket: str, key: str) -> tuple[dict, str | None]:
    """(the lock object's JSON, its ETag); ({}, None) when it vanished meanwhile."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        data = response["Body"].read()
    except errors.ClientError:
        return {}, None
    try:
        holder = json.loads(data)
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), response["ETag"]


def _lock_storage_error(where: str, error) -> StorageError:
    return StorageError(
        f"cannot take the write lock of the warehouse {where} ({error}); commands that write need write access "
        "to it: check AWS_ENDPOINT_URL, the credentials and that the bucket exists"
    )
