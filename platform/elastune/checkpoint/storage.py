"""Storage seam for checkpoints: str URIs through pyarrow.fs (local, file://, s3://, gs://, hdfs://).

URIs stay strings end to end (a Path would mangle `s3://`). Credentials come from the
environment or pyarrow's usual providers, never from specs or manifests.

On local disks nothing here follows a symlink out of the root: folders that are symlinks are not
listed, reads check that the file's real path is the path it names under the root's real path, and
deletions remove only plain files and empty folders they were asked for by name.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import stat
import threading
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from elastune.errors import CheckpointError, StorageError
from elastune.spec.base import URI_SCHEMES, check_uri

# Object stores replace an object in one PUT, so a whole-file write there is already atomic.
ATOMIC_PUT = ("S3FileSystem", "GcsFileSystem", "AzureFileSystem")


@dataclass
class Storage:
    """A root folder on some filesystem; every method takes paths relative to the root."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def from_uri(cls, uri: str) -> Storage:
        """StorageError (exit 2) naming the URI and the fix for a scheme pyarrow cannot serve, a
        malformed URI, or a store that cannot be reached to be set up (e.g. HDFS without Java)."""
        problem = check_uri(uri) if "://" in uri else None
        if problem:
            raise StorageError(f"checkpoint location {uri!r}: {problem}")
        target = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        try:
            fs, root = pafs.FileSystem.from_uri(target)
        except (pa.ArrowException, ValueError, OSError) as exc:
            raise StorageError(
                f"checkpoint location {uri!r} cannot be opened ({_first_line(exc)}); give a local path or a "
                f"{', '.join(f'{s}://' for s in URI_SCHEMES)} URI whose store is reachable from here"
            ) from None
        return cls(fs=fs, root=root.rstrip("/"), uri=uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        """Path of `rel` inside the filesystem (not a URI).

        normpath resolves a clone's "../step-N/file" references, which object stores would not.
        """
        return posixpath.normpath(f"{self.root}/{rel}") if rel else self.root

    def write_bytes(self, rel: str, data) -> None:
        """Write a whole file (bytes or any buffer); on local disks, durable once this returns."""
        full = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            write_local(full, memoryview(data).cast("B"))
            return
        self.fs.create_dir(os.path.dirname(full), recursive=True)
        with self.fs.open_output_stream(full) as f:
            f.write(data)

    def commit_bytes(self, rel: str, data: bytes) -> None:
        """Write so that readers see the old state or the whole new file, never a torn one, and
        (on local disks) so that the new file survives a machine crash once this returns."""
        if type(self.fs).__name__ in ATOMIC_PUT:
            self.write_bytes(rel, data)
            return
        tmp = rel + ".tmp"
        self.write_bytes(tmp, data)
        if self.is_local:
            os.replace(self.path(tmp), self.path(rel))
            # The rename lives in the folder's entries: without this a crash could lose it.
            self.sync_dir(posixpath.dirname(rel))
        else:  # HDFS and the like: a rename within a folder is atomic there
            self.fs.move(self.path(tmp), self.path(rel))

    def sync_dir(self, rel: str) -> None:
        """fsync a local folder, so the entries made in it (new files, renames) are durable."""
        if not self.is_local:
            return
        fd = os.open(self.path(rel), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_bytes(self, rel: str) -> bytes:
        return self.read_range(rel, 0, self.fs.get_file_info(self.path(rel)).size or 0)

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        try:
            with self.fs.open_input_file(self.checked(rel)) as f:
                data = f.read_at(length, offset)
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri}/{rel}: the file is missing") from None
        except OSError:
            if self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File:
                raise  # the store failed: not something the checkpoint did
            raise CheckpointError(f"{self.uri}/{rel}: is not a file") from None
        if len(data) != length:
            raise CheckpointError(f"{self.uri}/{rel}: wanted {length} bytes at offset {offset}, file holds fewer")
        return data

    def checked(self, rel: str) -> str:
        """The path of `rel`, refused if on a local disk a symlink takes it anywhere else than the
        same path under the root's real location."""
        full = self.path(rel)
        if self.is_local and os.path.realpath(full) != posixpath.normpath(
            posixpath.join(os.path.realpath(self.root), posixpath.relpath(full, self.root))
        ):
            raise CheckpointError(
                f"{self.uri}/{rel}: a symlink leads out of place ({os.path.realpath(full)}); refusing to read through it"
            )
        return full

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def probe(self) -> None:
        """StorageError naming the URI and the fix when the store does not answer (a host that does
        not resolve, a refused connection, credentials it rejects)."""
        try:
            self.fs.get_file_info(self.root)
        except OSError as exc:
            raise StorageError(
                f"checkpoint location {self.uri!r} does not answer ({_first_line(exc)}); check the address (for S3-compatible "
                f"stores AWS_ENDPOINT_URL_S3), the network and the credentials in the environment"
            ) from None

    def root_exists(self) -> bool:
        """Whether the root is a folder (an object store's prefix counts once anything is under it)."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.Directory:
            return True
        if info.type == pafs.FileType.NotFound and not self.is_local:
            return bool(self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)))
        return False

    def is_link(self, rel: str) -> bool:
        return self.is_local and os.path.islink(self.path(rel))

    def list_dirs(self) -> list[str]:
        """Names of folders directly under the root (on local disks, not symlinks to folders)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.Directory and not self.is_link(i.base_name))

    def list_files(self, rel: str) -> list[str]:
        """Names of plain files directly under a folder (none if it does not exist)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.File and not self.is_link(f"{rel}/{i.base_name}"))

    def entries(self, rel: str) -> list[str]:
        """Names of everything directly under a folder, of whatever kind."""
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True)))

    def delete_file(self, rel: str) -> None:
        """Delete a plain file if it is there (a symlink is never followed: on local disks the
        file must not be one)."""
        full = self.path(rel)
        if self.is_local:
            try:
                if stat.S_ISREG(os.lstat(full).st_mode):
                    os.unlink(full)
            except FileNotFoundError:
                pass
            return
        if self.fs.get_file_info(full).type == pafs.FileType.File:
            self.fs.delete_file(full)

    def remove_empty_dir(self, rel: str) -> bool:
        """Remove a folder that holds nothing (never a symlink); whether it is gone."""
        full = self.path(rel)
        if self.is_local:
            try:
                if os.path.islink(full):
                    return False
                os.rmdir(full)
            except FileNotFoundError:
                pass
            except OSError:  # not empty
                return False
            return True
        if self.entries(rel):
            return False
        if self.fs.get_file_info(full).type == pafs.FileType.Directory:
            self.fs.delete_dir(full)
        return True


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


DIRECT_CHUNK = 8 * 2**20
_ALIGN = 4096


def write_local(path: str, data: memoryview) -> None:
    """Write and fsync a local file, bypassing the page cache (O_DIRECT) where the filesystem allows.

    Buffered writes of large payloads ran at a fifth of the disk's direct-I/O bandwidth here: the
    page cache's writeback throttles the writer. O_DIRECT needs aligned memory, offsets and
    lengths, so the aligned body goes through a page-aligned bounce buffer and the last partial
    page is written through an ordinary descriptor (padding and truncating measured slower).
    Filesystems without O_DIRECT (tmpfs) and small files take the buffered path.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    body = len(data) // _ALIGN * _ALIGN
    if len(data) >= DIRECT_CHUNK and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:
            fd = None
        if fd is not None:
            try:
                _write_direct(fd, data[:body])
                tail = os.open(path, os.O_WRONLY)
                try:
                    _write_all(tail, data[body:], body)
                    os.fsync(tail)
                finally:
                    os.close(tail)
                os.fsync(fd)
                return
            except OSError:
                pass  # EINVAL from a filesystem that accepted the flag but not the I/O: go buffered
            finally:
                os.close(fd)
    fd = os.open(path, flags, 0o644)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)  # so a committed checkpoint also survives a machine crash, not only a kill
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


_BOUNCE = threading.local()  # one page-aligned buffer per writing thread, kept: mapping it is not free


def _write_direct(fd: int, body: memoryview) -> None:
    if getattr(_BOUNCE, "buffer", None) is None:
        _BOUNCE.buffer = mmap.mmap(-1, DIRECT_CHUNK)  # anonymous mappings are page-aligned
    view = memoryview(_BOUNCE.buffer)
    try:
        for start in range(0, len(body), DIRECT_CHUNK):
            chunk = body[start : start + DIRECT_CHUNK]  # a multiple of the alignment
            view[: len(chunk)] = chunk
            _write_all(fd, view[: len(chunk)], start)
    finally:
        view.release()
