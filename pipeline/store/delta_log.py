"""A small local Delta table's current files and properties, read from its transaction log in
this process, with no Spark.

A local search scores a small table on the driver (pipeline.search). Through Spark, reading a
table of two commits costs a cold JVM seconds of Delta computing its snapshot (several Spark jobs)
before a row is read; the log of such a table is a few JSON lines. This reader replays the log the
Delta protocol's way (the newest classic checkpoint, then each commit after it: `add` and `remove`
keyed by path and deletion vector) and answers only for tables it reads completely: a local
folder, reader features it needs to do nothing for, no commit coordinator, no partition columns,
every commit since the checkpoint present, and no live file with a deletion vector. For anything
else it answers None and the caller reads the table through Spark, as before."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.parquet as pq

log = logging.getLogger("pipeline.store")

LOG_FOLDER = "_delta_log"
COMMIT = re.compile(r"^(\d{20})\.json$")
CLASSIC_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint\.parquet$")
# Reader features that change nothing for a reader of plain Parquet columns, once no live file
# carries a deletion vector (checked per file): other features (column mapping, type widening,
# v2 checkpoints, catalog-managed commits) send the table to Spark.
PLAIN_READER_FEATURES = frozenset({"deletionVectors", "timestampNtz", "vacuumProtocolCheck"})
# Commits that may live outside the numbered JSON files (a commit coordinator, a catalog): the
# log here can be behind the table.
COORDINATED_WRITER_FEATURES = frozenset({"coordinatedCommits-preview", "catalogOwned-preview",
                                         "catalogManaged"})
UNBACKFILLED_FOLDERS = ("_commits", "_staged_commits")
# A log of more bytes to replay than this is a large table's: Spark's snapshot, not this reader,
# is the one to compute it (the caller only wants small tables here).
LOG_BYTES_LIMIT = 16 << 20


@dataclass(frozen=True)
class LogSnapshot:
    """The table at `version`: its live data files (absolute paths), their bytes, and its
    properties (the metadata's configuration: what SHOW TBLPROPERTIES lists, less the protocol's
    delta.minReaderVersion, delta.minWriterVersion and delta.feature.* entries)."""

    version: int
    files: tuple[str, ...]
    size_bytes: int
    properties: dict[str, str]


def local_snapshot(location: str) -> LogSnapshot | None:
    """The snapshot of the table at `location` when this reader reads it completely, else None."""
    folder = _local_folder(location)
    if folder is None or not (folder / LOG_FOLDER).is_dir():
        return None
    try:
        return _replay(folder)
    except Exception:  # a log this reader does not follow (or a file gone meanwhile): Spark's
        log.debug("the log of %s is left to Spark", folder, exc_info=True)
        return None


def _local_folder(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme or "/" not in location:  # another filesystem, or a catalog name
        return None
    return Path(location).expanduser().resolve()


def _replay(folder: Path) -> LogSnapshot | None:
    log_dir = folder / LOG_FOLDER
    if any(_has_entries(log_dir / name) for name in UNBACKFILLED_FOLDERS):
        return None  # commits a coordinator has not copied into the log yet
    names = [entry.name for entry in log_dir.iterdir()]
    commits = sorted(int(m[1]) for m in map(COMMIT.match, names) if m)
    if not commits:
        return None
    newest = commits[-1]
    start, state = _start(folder, names, set(commits), newest)
    if start is None or _bytes_to_replay(log_dir, start, newest) > LOG_BYTES_LIMIT:
        return None
    for version in range(start, newest + 1):
        with (log_dir / f"{version:020d}.json").open() as lines:
            for line in lines:
                if line.strip():
                    state.apply(json.loads(line))
    return state.snapshot(newest)


def _has_entries(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _start(folder: Path, names: list[str], commits: set[int], newest: int
           ) -> tuple[int | None, _State]:
    """The first commit to replay and the state before it: the newest classic checkpoint that
    every later commit follows, else version 0 when the whole log is there."""
    checkpoints = sorted((int(m[1]) for m in map(CLASSIC_CHECKPOINT.match, names) if m),
                         reverse=True)
    state = _State(folder)
    for version in checkpoints:
        if all(v in commits for v in range(version + 1, newest + 1)):
            checkpoint = folder / LOG_FOLDER / f"{version:020d}.checkpoint.parquet"
            if checkpoint.stat().st_size > LOG_BYTES_LIMIT:
                return None, state
            for action in pq.read_table(checkpoint).to_pylist():
                state.apply({key: value for key, value in action.items() if value is not None})
            return version + 1, state
    return (0 if all(v in commits for v in range(newest + 1)) else None), state


def _bytes_to_replay(log_dir: Path, start: int, newest: int) -> int:
    versions = range(start, newest + 1)
    return sum((log_dir / f"{version:020d}.json").stat().st_size for version in versions)


class _State:
    """Actions applied in log order. A file's key is its decoded path and its deletion vector:
    a remove matches the add it names however the path is spelled, and a valid commit's remove
    of a file and add of it with a new vector are distinct entries, in either order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[tuple[str, str], dict] = {}
        self.metadata: dict | None = None
        self.protocol: dict | None = None
        self.unreadable = False

    def apply(self, action: dict) -> None:
        if "add" in action:
            add = action["add"]
            self.files[self._key(add)] = add
        elif "remove" in action:
            self.files.pop(self._key(action["remove"]), None)
        elif "metaData" in action:
            self.metadata = action["metaData"]
        elif "protocol" in action:
            self.protocol = action["protocol"]
        elif {"sidecar", "checkpointMetadata"} & action.keys():
            self.unreadable = True  # a v2 checkpoint's parts live elsewhere

    def _key(self, action: dict) -> tuple[str, str]:
        return _data_path(self.folder, action["path"]), _vector_id(action)

    def snapshot(self, version: int) -> LogSnapshot | None:
        if self.unreadable or not self.metadata or not self.protocol or not self._plain():
            return None
        if any(add.get("deletionVector") for add in self.files.values()):
            return None
        return LogSnapshot(
            version=version, files=tuple(sorted(path for path, _ in self.files)),
            size_bytes=sum(int(add.get("size") or 0) for add in self.files.values()),
            properties=_configuration(self.metadata))

    def _plain(self) -> bool:
        """Plain Parquet columns, all commits in the log: a protocol that needs no more of a
        reader, and no partition columns."""
        reader = int(self.protocol.get("minReaderVersion", 1))
        features = set(self.protocol.get("readerFeatures") or ())
        writer_features = set(self.protocol.get("writerFeatures") or ())
        coordinated = any(key.startswith("delta.coordinatedCommits.")
                          for key in _configuration(self.metadata))
        return ((reader == 1 or (reader == 3 and features <= PLAIN_READER_FEATURES))
                and not writer_features & COORDINATED_WRITER_FEATURES and not coordinated
                and not self.metadata.get("partitionColumns"))


def _configuration(metadata: dict) -> dict[str, str]:
    """The metadata's configuration: a JSON object in a commit, a map (pairs) in a checkpoint."""
    return dict(metadata.get("configuration") or {})


def _vector_id(action: dict) -> str:
    vector = action.get("deletionVector")
    if not vector:
        return ""
    return f"{vector.get('storageType')}{vector.get('pathOrInlineDv')}@{vector.get('offset')}"


def _data_path(folder: Path, path: str) -> str:
    """A file's path from its `add`: relative and URL-encoded, or an absolute file URI."""
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme:
        raise ValueError(f"a data file on another filesystem: {path}")
    return str(folder / unquote(path))
