"""The SQLite catalog: every lookup that is not a file.

Tables: cached image refs (registry incl. port, repository, tag) -> manifest digest; cached
images by digest; the chunk index (uncompressed chunk digest -> compressed descriptor); where
blobs are known to live (for cross-repository mounts); file states for fast unchanged-disk
checks; and leases that protect in-flight work from garbage collection.

References are columns, never file paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from barge.errors import NoSpaceError
from barge.store.space import Reserve, is_no_space

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY,
    dirname TEXT NOT NULL,
    format TEXT NOT NULL,
    size_on_disk INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,            -- '' for a pull by digest
    digest TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag, digest)
);
CREATE INDEX IF NOT EXISTS refs_digest ON refs(digest);
CREATE TABLE IF NOT EXISTS chunks (
    udigest TEXT NOT NULL,
    codec TEXT NOT NULL,
    frame_size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    cdigest TEXT NOT NULL,
    csize INTEGER NOT NULL,
    frames TEXT NOT NULL,          -- JSON list of frame records, as the format module writes them
    last_used REAL NOT NULL,
    PRIMARY KEY (udigest, codec, frame_size, media_type)
);
CREATE INDEX IF NOT EXISTS chunks_cdigest ON chunks(cdigest);
CREATE TABLE IF NOT EXISTS blob_locations (
    digest TEXT NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (digest, registry, repository)
);
CREATE TABLE IF NOT EXISTS file_states (
    path TEXT NOT NULL,
    key TEXT NOT NULL,             -- what the cached value is about (e.g. chunking parameters)
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (path, key)
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    proc_start TEXT NOT NULL,
    created REAL NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lease_items (
    lease_id TEXT NOT NULL REFERENCES leases(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,            -- 'image' (manifest digest), 'blob', 'path'
    value TEXT NOT NULL,
    PRIMARY KEY (lease_id, kind, value)
);
"""


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields start after the last ')'
    rest = stat[stat.rfind(")") + 2 :].split()
    return rest[19] if len(rest) > 19 else None


@dataclass(frozen=True)
class ImageRow:
    digest: str
    dirname: str
    format: str
    size_on_disk: int
    created: float
    last_used: float


@dataclass(frozen=True)
class RefRow:
    registry: str
    repository: str
    tag: str
    digest: str
    updated: float


@dataclass(frozen=True)
class ChunkRow:
    udigest: str
    codec: str
    frame_size: int
    media_type: str
    cdigest: str
    csize: int
    frames: list[Any]


class Catalog:
    """Thread-safe access to the catalog database (one connection per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        # room for SQLite on a full disk (barge.store.space)
        self.reserve = Reserve(path.with_suffix(".reserve"))
        self.reserve.ensure()
        conn = self._conn()
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        except sqlite3.OperationalError as e:
            self._failed(e)
        with self.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )

    # -- connection handling -------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # opening creates the shared-memory file, which needs room
            self.reserve.make_room()
            # the busy timeout first, so that nothing below meets a lock without waiting;
            # WAL mode is a property of the database file, set once by __init__
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.OperationalError as e:
                conn.close()
                self._failed(e)
            self._local.conn = conn
        return conn

    def _failed(self, e: sqlite3.Error) -> NoReturn:
        """Re-raise an SQLite error; a full disk becomes a :class:`NoSpaceError` (exit 9)."""
        if is_no_space(e, self.path.parent):
            self.reserve.release()  # whatever is left of it: the next attempt gets the room
            raise NoSpaceError(
                f"no space left on the filesystem of {self.path.parent} to update the catalog",
                hint="free some space there (`barge prune` removes abandoned work in tmp/ and "
                "cached images nothing refers to) and run the command again",
            ) from e
        raise e

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE), committed on success.

        SQLite answers "database is locked" at once, without its busy handler, in a few WAL
        corner cases (another connection recovering or checkpointing the WAL): those are retried
        here, bounded, before giving up."""
        conn = self._conn()
        self.reserve.make_room()
        for attempt in range(50):
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or attempt == 49:
                    self._failed(e)
                time.sleep(0.01 * (attempt + 1))
        try:
            yield conn
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")  # SQLite may have rolled back already (SQLITE_FULL)
            if isinstance(e, sqlite3.OperationalError):
                self._failed(e)
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                self._failed(e)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self._conn().execute(sql, args).fetchall())
        except sqlite3.OperationalError as e:
            self._failed(e)

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- images and refs -------------------------------------------------------------------
    def add_image(self, digest: str, dirname: str, fmt: str, size_on_disk: int) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT INTO images(digest, dirname, format, size_on_disk, created, last_used)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE SET"
                " dirname=excluded.dirname, format=excluded.format,"
                " size_on_disk=excluded.size_on_disk, last_used=excluded.last_used",
                (digest, dirname, fmt, size_on_disk, now, now),
            )

    def get_image(self, digest: str) -> ImageRow | None:
        rows = self.query("SELECT * FROM images WHERE digest = ?", (digest,))
        return ImageRow(*rows[0]) if rows else None

    def images(self) -> list[ImageRow]:
        return [ImageRow(*r) for r in self.query("SELECT * FROM images ORDER BY last_used")]

    def touch_image(self, digest: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE images SET last_used = ? WHERE digest = ?", (time.time(), digest))

    def remove_image(self, digest: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM images WHERE digest = ?", (digest,))
            db.execute("DELETE FROM refs WHERE digest = ?", (digest,))

    def set_ref(self, registry: str, repository: str, tag: str, digest: str) -> None:
        """Point (registry, repository, tag) at digest; a tag moves, a digest ref is added.
        An OCI layout location (registry "oci"/"oci-archive") has no digest form, so its
        untagged reference moves like a tag."""
        with self.tx() as db:
            if tag or registry in ("oci", "oci-archive"):
                db.execute(
                    "DELETE FROM refs WHERE registry = ? AND repository = ? AND tag = ?",
                    (registry, repository, tag),
                )
            db.execute(
                "INSERT OR REPLACE INTO refs(registry, repository, tag, digest, updated)"
                " VALUES (?, ?, ?, ?, ?)",
                (registry, repository, tag, digest, time.time()),
            )

    def lookup_ref(self, registry: str, repository: str, tag: str) -> str | None:
        rows = self.query(
            "SELECT digest FROM refs WHERE registry = ? AND repository = ? AND tag = ?",
            (registry, repository, tag),
        )
        return str(rows[0][0]) if rows else None

    def refs(self, digest: str | None = None) -> list[RefRow]:
        if digest is None:
            rows = self.query("SELECT * FROM refs ORDER BY registry, repository, tag")
        else:
            rows = self.query("SELECT * FROM refs WHERE digest = ? ORDER BY updated", (digest,))
        return [RefRow(*r) for r in rows]

    def remove_ref(self, registry: str, repository: str, tag: str, digest: str) -> None:
        with self.tx() as db:
            db.execute(
                "DELETE FROM refs WHERE registry = ? AND repository = ? AND tag = ? AND digest = ?",
                (registry, repository, tag, digest),
            )

    # -- chunk index and blob locations ----------------------------------------------------
    def put_chunk(self, row: ChunkRow) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO chunks(udigest, codec, frame_size, media_type, cdigest,"
                " csize, frames, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.udigest,
                    row.codec,
                    row.frame_size,
                    row.media_type,
                    row.cdigest,
                    row.csize,
                    json.dumps(row.frames, separators=(",", ":")),
                    time.time(),
                ),
            )

    def find_chunk(
        self, udigest: str, codec: str, frame_size: int, media_type: str
    ) -> ChunkRow | None:
        rows = self.query(
            "SELECT udigest, codec, frame_size, media_type, cdigest, csize, frames FROM chunks"
            " WHERE udigest = ? AND codec = ? AND frame_size = ? AND media_type = ?",
            (udigest, codec, frame_size, media_type),
        )
        if not rows:
            return None
        r = rows[0]
        return ChunkRow(r[0], r[1], int(r[2]), r[3], r[4], int(r[5]), json.loads(r[6]))

    def chunk_by_cdigest(self, cdigest: str) -> ChunkRow | None:
        rows = self.query(
            "SELECT udigest, codec, frame_size, media_type, cdigest, csize, frames FROM chunks"
            " WHERE cdigest = ? LIMIT 1",
            (cdigest,),
        )
        if not rows:
            return None
        r = rows[0]
        return ChunkRow(r[0], r[1], int(r[2]), r[3], r[4], int(r[5]), json.loads(r[6]))

    def add_blob_location(self, digest: str, registry: str, repository: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO blob_locations(digest, registry, repository, seen)"
                " VALUES (?, ?, ?, ?)",
                (digest, registry, repository, time.time()),
            )

    def add_blob_locations(self, digests: list[str], registry: str, repository: str) -> None:
        now = time.time()
        with self.tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO blob_locations(digest, registry, repository, seen)"
                " VALUES (?, ?, ?, ?)",
                [(d, registry, repository, now) for d in digests],
            )

    def blob_repositories(self, digest: str, registry: str) -> list[str]:
        rows = self.query(
            "SELECT repository FROM blob_locations WHERE digest = ? AND registry = ?"
            " ORDER BY seen DESC LIMIT 8",
            (digest, registry),
        )
        return [str(r[0]) for r in rows]

    # -- file states (git-index-like "unchanged since last time") ----------------------------
    def get_file_state(self, path: str, key: str) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        rows = self.query(
            "SELECT dev, ino, size, mtime_ns, ctime_ns, value FROM file_states"
            " WHERE path = ? AND key = ?",
            (path, key),
        )
        if not rows:
            return None
        dev, ino, size, mtime_ns, ctime_ns, value = rows[0]
        if (dev, ino, size, mtime_ns, ctime_ns) != (
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ):
            return None
        return str(value)

    def put_file_state(self, path: str, key: str, value: str, st: os.stat_result) -> None:
        """Remember ``value`` for the file as it was when ``st`` was taken (before reading it).

        A write landing in the same timestamp tick as ``st`` could go unseen (git's "racy
        clean" problem), so a file modified less than two seconds before now is not recorded.
        """
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < 2_000_000_000:
            return
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO file_states(path, key, dev, ino, size, mtime_ns, ctime_ns,"
                " value) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    path,
                    key,
                    st.st_dev,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    value,
                ),
            )

    def forget_file_states(self, path_prefix: str) -> None:
        with self.tx() as db:
            db.execute(
                "DELETE FROM file_states WHERE path = ? OR substr(path, 1, ?) = ?",
                (path_prefix, len(path_prefix) + 1, path_prefix.rstrip("/") + "/"),
            )

    # -- leases ----------------------------------------------------------------------------
    def create_lease(self, purpose: str) -> str:
        lease_id = uuid.uuid4().hex
        pid = os.getpid()
        with self.tx() as db:
            db.execute(
                "INSERT INTO leases(id, pid, proc_start, created, purpose) VALUES (?, ?, ?, ?, ?)",
                (lease_id, pid, process_start_time(pid) or "", time.time(), purpose),
            )
        return lease_id

    def lease_add(self, lease_id: str, kind: str, values: list[str]) -> None:
        with self.tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO lease_items(lease_id, kind, value) VALUES (?, ?, ?)",
                [(lease_id, kind, v) for v in values],
            )

    def release_lease(self, lease_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM lease_items WHERE lease_id = ?", (lease_id,))
            db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))

    def dead_leases(self) -> set[str]:
        """Leases whose process is gone (or whose PID was reused by another process). Reads
        only, so it works on a full disk."""
        dead = set()
        for lease_id, pid, proc_start in self.query("SELECT id, pid, proc_start FROM leases"):
            alive = process_start_time(int(pid))
            if alive is None or (proc_start and alive != proc_start):
                dead.add(str(lease_id))
        return dead

    def expire_dead_leases(self) -> int:
        """Drop leases whose process is gone (or whose PID was reused by another process)."""
        dead = self.dead_leases()
        for lease_id in dead:
            self.release_lease(lease_id)
        return len(dead)

    def live_leased(self, kind: str) -> set[str]:
        """What leases of living processes hold (reads only)."""
        dead = self.dead_leases()
        rows = self.query("SELECT lease_id, value FROM lease_items WHERE kind = ?", (kind,))
        return {str(v) for lease_id, v in rows if str(lease_id) not in dead}

    def leased(self, kind: str) -> set[str]:
        rows = self.query(
            "SELECT value FROM lease_items JOIN leases ON leases.id = lease_items.lease_id"
            " WHERE kind = ?",
            (kind,),
        )
        return {str(r[0]) for r in rows}
