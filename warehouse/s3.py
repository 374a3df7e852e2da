"""A warehouse on S3-compatible object storage: ``ew -w s3://bucket/prefix ...``.

The endpoint, region and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...),
read the same way by the three clients involved: delta-rs writes and opens the tables,
pyarrow's S3 file system reads their Parquet files (and so DuckDB, which scans pyarrow
datasets), and boto3 takes the write lock (a conditional put; see :func:`warehouse.lock.object_lock`).

delta-rs 1.x commits every log entry with a put-if-absent (S3's ``If-None-Match: *``), so two
table writers can never both write version N; ew's own lock keeps the multi-table commit to
one writer at a time on top of that.

Artifacts (models, heads) are directories of files the encoder and the heads read from local
disk (onnxruntime and tokenizers need paths): each is uploaded file by file with a
``manifest.json`` of their SHA-256 digests last, the manifest being the mark of a complete
upload, and read back through a local cache keyed by the manifest's own digest, every file
checked against it as it is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
from deltalake import DeltaTable

from .errors import EwError, StorageError, first_line
from .lock import LOCK_NAME, Hold, object_lock
from .loopback import free_port, listening

SCHEME = "s3://"
MANIFEST = "manifest.json"
CACHE_ENV = "EW_CACHE_DIR"
#: Seconds an object lock lives without a heartbeat; a writer killed with kill -9 blocks others this long.
LOCK_TTL_ENV = "EW_S3_LOCK_TTL"
DEFAULT_LOCK_TTL = 60.0


def is_s3(location: str | os.PathLike) -> bool:
    return str(location).startswith(SCHEME)


def cache_root() -> Path:
    """Where downloaded artifacts are kept: $EW_CACHE_DIR, else $XDG_CACHE_HOME/ew or ~/.cache/ew."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ew"


def _endpoint() -> tuple[str | None, str | None]:
    """(host[:port], scheme) of $AWS_ENDPOINT_URL (or $AWS_ENDPOINT_URL_S3), (None, None) for AWS itself."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None, None
    parsed = urlparse(url)
    return parsed.netloc or parsed.path, parsed.scheme or "https"


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _lock_ttl() -> float:
    text = os.environ.get(LOCK_TTL_ENV) or str(DEFAULT_LOCK_TTL)
    try:
        ttl = float(text)
    except ValueError:
        ttl = 0.0
    if not ttl > 0:
        raise EwError(f"{LOCK_TTL_ENV}={text!r} is not a number of seconds above 0; unset it for {DEFAULT_LOCK_TTL:g}")
    return ttl


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class S3Storage:
    """A warehouse below ``s3://bucket/prefix``; the same interface as :class:`warehouse.storage.LocalStorage`."""

    def __init__(self, uri: str):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise EwError(f"{uri} is not an S3 location; write it as s3://BUCKET/PREFIX")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"
        endpoint, scheme = _endpoint()
        options = {"region": _region()} if _region() else {}
        if endpoint:
            options.update(endpoint_override=endpoint, scheme=scheme)
        self.fs: pafs.FileSystem = pafs.S3FileSystem(**options)
        #: delta-rs reads credentials, region and endpoint from the environment itself; a plain-HTTP
        #: endpoint (a local test server) must be allowed explicitly.
        self.storage_options: dict[str, str] | None = {"allow_http": "true"} if scheme == "http" else {}
        self.lock_ttl = _lock_ttl()

    # -- locations -----------------------------------------------------------------
    def _path(self, relative: str = "") -> str:
        """``relative`` as a path of :attr:`fs` (``bucket/prefix/relative``)."""
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return f"{base}/{relative}".rstrip("/") if relative else base

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def location(self, relative: str) -> str:
        """What a user is shown for ``relative``: its s3:// URI."""
        return f"{self.uri}/{relative}"

    def table_uri(self, table: str) -> str:
        return self.location(table)

    def is_table(self, table: str) -> bool:
        """Whether ``table`` has a Delta log."""
        return DeltaTable.is_deltatable(self.table_uri(table), storage_options=self.storage_options)

    def fs_path(self, uri: str) -> str:
        return uri[len(SCHEME):] if uri.startswith(SCHEME) else uri

    def _info(self, relative: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self._path(relative))
        except OSError as error:
            raise StorageError(f"cannot reach the warehouse {self.uri} ({first_line(error)}); check AWS_ENDPOINT_URL, "
                               "AWS_REGION, the credentials and that the bucket exists") from None

    # -- the warehouse marker --------------------------------------------------------
    def exists(self, relative: str) -> bool:
        return self._info(relative).type == pafs.FileType.File

    def create(self, marker: str, text: str) -> None:
        """Write the warehouse marker into an empty prefix, or fail saying the prefix holds something else."""
        if self.children(""):
            raise EwError(f"{self.uri} holds objects and is not an ew warehouse (no {marker}); "
                          "choose an empty or new prefix for --warehouse")
        self.write_bytes(marker, text.encode())

    def write_bytes(self, relative: str, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(self._path(relative)) as out:
                out.write(data)
        except OSError as error:
            raise StorageError(f"cannot write {self.location(relative)} ({first_line(error)}); check the "
                               "credentials' write access and that the bucket exists") from None

    # -- the write lock --------------------------------------------------------------
    def lock(self, *, wait: float = 0.0) -> AbstractContextManager[Hold]:
        return object_lock(self.bucket, self._key(LOCK_NAME), where=self.uri, ttl=self.lock_ttl, wait=wait)

    # -- listing and deleting ----------------------------------------------------------
    def _files_below(self, relative: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._path(relative), recursive=True, allow_not_found=True)
        return [info for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]

    def _relative(self, path: str) -> str:
        return path[len(self._path()) + 1:]

    def iter_files(self, relative: str) -> Iterator[tuple[str, int]]:
        for info in sorted(self._files_below(relative), key=lambda info: info.path):
            yield self._relative(info.path), info.size

    def children(self, relative: str) -> list[str]:
        selector = pafs.FileSelector(self._path(relative), recursive=False, allow_not_found=True)
        return sorted(self._relative(info.path) for info in self.fs.get_file_info(selector))

    def modified_at(self, relative: str) -> float:
        """The newest modification time below ``relative`` (an object store has no directory times)."""
        times = [info.mtime.timestamp() for info in self._files_below(relative) if info.mtime is not None]
        info = self._info(relative)
        if info.type == pafs.FileType.File and info.mtime is not None:
            times.append(info.mtime.timestamp())
        return max(times, default=0.0)

    def delete(self, relative: str) -> None:
        info = self._info(relative)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def remove_empty_dir(self, relative: str) -> bool:
        """Prefixes vanish with their last object: true when nothing is left below ``relative``."""
        return not self._files_below(relative)

    # -- artifacts -------------------------------------------------------------------
    def artifact_path(self, relative: str) -> Path:
        """A local directory with the files of the artifact ``relative``, downloaded once into the cache
        and checked against its manifest; a path that does not exist when there is no complete artifact."""
        try:
            with self.fs.open_input_stream(self._path(f"{relative}/{MANIFEST}")) as stream:
                manifest = stream.read()
        except FileNotFoundError:
            return cache_root() / "missing" / relative
        except OSError as error:
            raise StorageError(f"cannot read {self.location(relative)} ({first_line(error)})") from None
        cached = _cached(relative, manifest)
        if cached.is_dir():
            return cached
        files = self._manifest_files(relative, manifest)
        build = Path(tempfile.mkdtemp(prefix=".download.", dir=_made(cached.parent.parent)))
        try:
            for name, digest in files.items():
                target = build / name
                target.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(self._path(f"{relative}/{name}"), str(target), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                if file_sha256(target) != digest:
                    raise StorageError(f"{self.location(relative)}/{name} does not match the digest in its {MANIFEST}; "
                                       "the artifact was changed or damaged: run `ew verify`")
            (build / MANIFEST).write_bytes(manifest)
            cached.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(build, cached)
            except OSError:  # another process cached the same content first
                pass
        except OSError as error:
            raise StorageError(f"cannot download {self.location(relative)} ({first_line(error)})") from None
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return cached

    def _manifest_files(self, relative: str, manifest: bytes) -> dict[str, str]:
        try:
            files = json.loads(manifest)["files"]
            if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
                raise ValueError("'files' is not an object of digests")
        except (ValueError, KeyError, TypeError) as error:
            raise StorageError(f"{self.location(relative)}/{MANIFEST} is damaged ({error}); run `ew verify`") from None
        for name in files:
            if name.startswith("/") or ".." in Path(name).parts:
                raise StorageError(f"{self.location(relative)}/{MANIFEST} names a file outside the artifact: {name!r}")
        return files

    @contextmanager
    def new_artifact(self, relative: str) -> Iterator[Path]:
        """A local directory path (not yet existing) to build the artifact in; uploaded when the block ends.

        The files go first and the manifest last, so a reader never takes a half upload for an
        artifact; the catalog row the caller writes afterwards is what makes it part of the warehouse.
        """
        staging = Path(tempfile.mkdtemp(prefix=".upload.", dir=_made(cache_root() / "artifacts")))
        directory = staging / Path(relative).name
        try:
            yield directory
            try:
                self._publish(relative, directory, uploaded={})
            except BaseException:
                self.delete(relative)  # a half upload has no manifest, but need not wait for `ew vacuum`
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def extended_artifact(self, relative: str) -> Iterator[Path]:
        """A local copy of the stored artifact ``relative`` to add files to (as a token-state graph
        is added to a model); the files added or replaced are uploaded when the block ends, then
        the new manifest. Files are replaced by rename in the copy (hard links to the cached one).

        A reader that read the old manifest keeps a complete artifact: only files it does not list
        are new, except small cards replaced in place, whose digest it then finds changed
        (an error asking to run again, never a wrong file used).
        """
        current = self.artifact_path(relative)
        if not (current / MANIFEST).is_file():
            raise StorageError(f"{self.location(relative)} holds no complete artifact; run `ew verify`")
        uploaded = self._manifest_files(relative, (current / MANIFEST).read_bytes())
        staging = Path(tempfile.mkdtemp(prefix=".upload.", dir=_made(cache_root() / "artifacts")))
        directory = staging / current.name
        try:
            shutil.copytree(current, directory, copy_function=_link_or_copy)
            yield directory
            self._publish(relative, directory, uploaded=uploaded)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, relative: str, directory: Path, *, uploaded: dict[str, str]) -> None:
        """Upload the files of ``directory`` that ``uploaded`` (name -> digest) lacks or lists with another
        digest, then the manifest of them all; keep ``directory`` as the cached copy of that manifest."""
        files = {str(path.relative_to(directory)): file_sha256(path)
                 for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST}
        manifest = json.dumps({"files": files}, indent=1).encode()
        for name, digest in files.items():
            if uploaded.get(name) != digest:
                self._upload(directory / name, f"{relative}/{name}")
        self.write_bytes(f"{relative}/{MANIFEST}", manifest)
        # What was uploaded is what a download would cache: keep it, rather than fetch it back.
        (directory / MANIFEST).unlink(missing_ok=True)  # a hard link to the previous manifest
        (directory / MANIFEST).write_bytes(manifest)
        cached = _cached(relative, manifest)
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(directory, cached)
        except OSError:  # cached already
            pass

    def _upload(self, local: Path, relative: str) -> None:
        try:
            pafs.copy_files(str(local), self._path(relative), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        except OSError as error:
            raise StorageError(f"cannot upload {local} to {self.location(relative)} ({first_line(error)})") from None


@contextmanager
def moto_server(*, startup: float = 30.0) -> Iterator[str]:
    """A moto S3 server (``moto[server]``) on a free 127.0.0.1 port, stopped on exit; yields its
    endpoint URL. For tests and benchmarks. In a process of its own: delta-rs holds the GIL in some
    calls (``DeltaTable.is_deltatable``, ``history``), so a server thread beside them never answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not listening(port, server, seconds=startup):
            raise EwError("the moto S3 server did not start: pip install 'moto[server]'")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _cached(relative: str, manifest: bytes) -> Path:
    """The cache directory of the artifact ``relative`` whose manifest is ``manifest``."""
    return cache_root() / "artifacts" / hashlib.sha256(manifest).hexdigest()[:32] / Path(relative).name


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
