"""A small local Delta table's current files and properties, read from its transaction log in
this process, with no Spark.

A local search scores a small table on the driver (pipeline.search). Through Spark, reading a
table of two commits costs a cold JVM seconds of Delta computing its snapshot (several Spark jobs)
before a row is read; the log of such a table is a few JSON lines. This reader replays the log the
Delta protocol's way (the newest classic checkpoint, then each commit after it: `add` and `remove`
keyed by path and deletion vector) and answers only for tables it reads completely: a local folder,
reader features it needs to do nothing for, no partition columns, every commit since the checkpoint
present, and no live file with a deletion vector. For anything else it answers None and the caller
reads the table through Spark, as before."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.parquet as pq

LOG_FOLDER = "_delta_log"
COMMIT = re.compile(r"^(\d{20})\.json$")
CLASSIC_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint\.parquet$")
# Reader features that change nothing for a reader of plain Parquet columns, once no live file
# carries a deletion vector (checked per file): other features (column mapping, type widening,
# v2 checkpoints, catalog-managed commits) send the table to Spark.
PLAIN_READER_FEATURES = frozenset({"deletionVectors", "timestampNtz", "vacuumProtocolCheck"})
# A log of more bytes to replay than this is a large table's: Spark's snapshot, not this reader,
# is the one to compute it (the caller only wants small tables here).
LOG_BYTES_LIMIT = 16 << 20


@dataclass(frozen=True)
class LogSnapshot:
    """The table at `version`: its live data files (absolute paths), their bytes, its columns
    and its properties (the metadata's configuration, as SHOW TBLPROPERTIES lists them)."""

    version: int
    files: tuple[str, ...]
    size_bytes: int
    columns: tuple[str, ...]
    properties: dict[str, str]


def local_snapshot(location: str) -> LogSnapshot | None:
    """The snapshot of the table at `location` when this reader reads it completely, else None."""
    folder = _local_folder(location)
    if folder is None or not (folder / LOG_FOLDER).is_dir():
        return None
    try:
        return _replay(folder)
    except (OSError, ValueError, KeyError, TypeError):  # a log this reader does not follow
        return None


def _local_folder(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme or "/" not in location:  # another filesystem, or a catalog name
        return None
    return Path(location).expanduser().resolve()


def _replay(folder: Path) -> LogSnapshot | None:
    log = folder / LOG_FOLDER
    names = [entry.name for entry in log.iterdir()]
    commits = sorted(int(m[1]) for m in map(COMMIT.match, names) if m)
    if not commits:
        return None
    newest = commits[-1]
    start, state = _start(log, names, set(commits), newest)
    if start is None or _bytes_to_replay(log, start, newest) > LOG_BYTES_LIMIT:
        return None
    for version in range(start, newest + 1):
        with (log / f"{version:020d}.json").open() as lines:
            for line in lines:
                if line.strip():
                    state.apply(json.loads(line))
    return state.snapshot(folder, newest)


def _start(log: Path, names: list[str], commits: set[int], newest: int
           ) -> tuple[int | None, _State]:
    """The first commit to replay and the state before it: the newest classic checkpoint that
    every later commit follows, else version 0 when the whole log is there."""
    checkpoints = sorted((int(m[1]) for m in map(CLASSIC_CHECKPOINT.match, names) if m),
                         reverse=True)
    for version in checkpoints:
        if all(v in commits for v in range(version + 1, newest + 1)):
            if (log / f"{version:020d}.checkpoint.parquet").stat().st_size > LOG_BYTES_LIMIT:
                return None, _State()
            state = _State()
            for action in pq.read_table(log / f"{version:020d}.checkpoint.parquet").to_pylist():
                state.apply({key: value for key, value in action.items() if value is not None})
            return version + 1, state
    if all(v in commits for v in range(newest + 1)):
        return 0, _State()
    return None, _State()


def _bytes_to_replay(log: Path, start: int, newest: int) -> int:
    versions = range(start, newest + 1)
    return sum((log / f"{version:020d}.json").stat().st_size for version in versions)


class _State:
    """Actions applied in log order; within a commit, order does not matter (a file's key is its
    path and its deletion vector, so a remove and an add of the same file with a new vector are
    distinct entries)."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], dict] = {}
        self.metadata: dict | None = None
        self.protocol: dict | None = None
        self.unreadable = False

    def apply(self, action: dict) -> None:
        if "add" in action:
            add = action["add"]
            self.files[(add["path"], _vector_id(add))] = add
        elif "remove" in action:
            self.files.pop((action["remove"]["path"], _vector_id(action["remove"])), None)
        elif "metaData" in action:
            self.metadata = action["metaData"]
        elif "protocol" in action:
            self.protocol = action["protocol"]
        elif {"sidecar", "checkpointMetadata"} & action.keys():
            self.unreadable = True  # a v2 checkpoint's parts live elsewhere

    def snapshot(self, folder: Path, version: int) -> LogSnapshot | None:
        if self.unreadable or not self.metadata or not self.protocol or not self._plain():
            return None
        if any(add.get("deletionVector") for add in self.files.values()):
            return None
        paths = [_data_path(folder, add["path"]) for add in self.files.values()]
        schema = json.loads(self.metadata["schemaString"])
        return LogSnapshot(
            version=version, files=tuple(sorted(paths)),
            size_bytes=sum(int(add.get("size") or 0) for add in self.files.values()),
            columns=tuple(field["name"] for field in schema["fields"]),
            properties=_configuration(self.metadata))

    def _plain(self) -> bool:
        """Plain Parquet columns: a reader protocol and metadata that need no more of a reader."""
        reader = int(self.protocol.get("minReaderVersion", 1))
        features = set(self.protocol.get("readerFeatures") or ())
        configuration = _configuration(self.metadata)
        return ((reader == 1 or (reader == 3 and features <= PLAIN_READER_FEATURES))
                and configuration.get("delta.columnMapping.mode", "none") == "none"
                and not self.metadata.get("partitionColumns")
                and (self.metadata.get("format") or {}).get("provider", "parquet") == "parquet")


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
