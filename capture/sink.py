"""Where the store writer puts its bytes: a local directory, or any fsspec URL (``s3://``...).

:class:`capture.writer.StoreWriter` writes a local path with plain file calls (temporary file +
atomic rename, in-place row writes, ``fcntl`` lock; ``capture/writer.py``). For a URL it asks
:func:`open_sink` for a :class:`RemoteSink` and writes whole objects through it instead:

* every put replaces an object whole (an object store has no partial writes, no renames and
  no directories; a PUT that returns is visible to every reader, S3's read-after-write
  consistency), so a put is its own atomic replace;
* the commit protocol is the local one, in whole objects: the rows' chunk objects and the
  per-step blocks they changed (each block of per-step scalars is re-put whole at every
  commit, its crc32c over the whole block), put in one concurrent batch, and once all have
  landed the root ``zarr.json`` with ``gradtrace.n_steps``. A row's chunks stay staged
  (:meth:`RemoteSink.stage`) until its commit or the next row, so a step the writer commits
  at once costs two round trips. A run killed at any moment is readable up to its last
  committed step; objects of uncommitted rows are ignored by readers (rows >= n_steps);
* a new store is created with its arrays' metadata first and the root ``zarr.json`` carrying
  the gradtrace header last: a creation killed half-way leaves objects that no reader takes for
  a run (``analysis.open_run`` says "not a gradtrace run store").

What stays local-only: the writer lock (an object store has no ``flock``: one writer per URL is
the caller's job), the creation in a hidden directory renamed into place, ``resume`` and
``overwrite`` (both need the lock to be safe: the writer refuses them on a URL), and
``durable`` (a returned PUT is already durable in S3; nothing to fsync).

A sharded recording (``capture/sharded.py``) gives every rank its own sink: each rank stages
and puts only its own columns' chunk objects before the per-step all-reduce, and rank 0's
:class:`capture.writer.StoreWriter` puts the per-step blocks and the marker after it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def split_location(path) -> tuple[Path | None, str | None]:
    """``(local path, None)`` for a path or ``file://`` URL, ``(None, url)`` for another URL."""
    s = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if s.startswith("file://"):
        return Path(s[len("file://"):]), None
    if "://" in s:
        return None, s.rstrip("/")
    return Path(s), None


def store_name(path) -> str:
    """The last component of a path or URL (for thread names and messages)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


class RemoteSink:
    """Whole-object puts under one store prefix of an fsspec filesystem.

    Args:
        url: the store's URL, e.g. ``s3://bucket/runs/cnn.zarr``.
        storage_options: passed to fsspec (``endpoint_url``, ``key``, ``secret``, ``anon``...).

    Keys are relative to the store root with ``/`` separators (``"zarr.json"``,
    ``"grad/c/3/0"``).
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.url = url
        self.storage_options = dict(storage_options or {})
        protocol = url.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as err:
            raise ImportError(
                f"cannot write to {url}: fsspec's backend for '{protocol}://' is not installed ({err}); "
                "install it (s3fs for s3://, gcsfs for gs://, adlfs for az://) or record to a local path"
            ) from None
        except ValueError:
            raise ValueError(
                f"cannot write to {url}: fsspec knows no protocol '{protocol}://'; use a local path or a URL such "
                "as s3://bucket/run.zarr"
            ) from None
        self._staged: dict = {}  # objects to put with the next put_staged (a row's chunks)
        self._lock = threading.Lock()  # stage() is called from the writer's chunk threads
        self.fs, self.root = fsspec.url_to_fs(url, **self.storage_options)
        self.root = self.root.rstrip("/")
        if getattr(self.fs, "root_marker", "") == "" and "/" not in self.root:
            raise ValueError(
                f"cannot write to {url}: the store needs a key inside the bucket, e.g. {url}/run.zarr"
            )

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self) -> bool:
        """True when any object lies under the store's prefix."""
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self.root))

    def put(self, rel: str, data) -> None:
        """Put one object whole (atomic: readers see the old object or the new one)."""
        self.fs.pipe_file(self.key(rel), bytes(data))

    def put_many(self, items: dict) -> None:
        """Put several objects (concurrently where the filesystem is asynchronous, as s3fs is);
        all have landed when this returns."""
        if len(items) == 1:
            (rel, data), = items.items()
            self.put(rel, data)
        elif items:
            self.fs.pipe({self.key(rel): bytes(data) for rel, data in items.items()})

    def stage(self, items: dict) -> None:
        """Hold objects for the next :meth:`put_staged` (thread-safe)."""
        with self._lock:
            self._staged.update(items)

    def put_staged(self, extra: dict | None = None) -> None:
        """Put the staged objects and ``extra`` in one concurrent batch; all have landed when
        this returns (the staged ones are dropped from the stage first: a failed put is the
        writer's error, and it re-puts nothing)."""
        with self._lock:
            items, self._staged = self._staged, {}
        if extra:
            items.update(extra)
        if items:
            self.put_many(items)

    def discard_staged(self) -> None:
        """Forget the staged objects (a rewound row)."""
        with self._lock:
            self._staged = {}

    def delete(self, rels) -> None:
        """Remove objects; absent ones are fine."""
        for rel in rels:
            try:
                self.fs.rm_file(self.key(rel))
            except FileNotFoundError:
                pass

    def open_group(self, mode: str):
        """The store's root Zarr group through zarr's fsspec store."""
        import zarr

        kw = {"storage_options": self.storage_options} if self.storage_options else {}
        return zarr.open_group(self.url, mode=mode, use_consolidated=False, **kw)


def open_sink(path, storage_options: dict | None = None) -> RemoteSink | None:
    """A :class:`RemoteSink` for a URL other than ``file://``; None for a local path."""
    local, url = split_location(path)
    if url is None:
        if storage_options:
            raise ValueError(f"storage_options are for URLs such as s3://bucket/run.zarr; {path} is a local path")
        return None
    return RemoteSink(url, storage_options)
