"""What a run carries from step to step, and what it reports: the plan, the chunk totals,
the summary."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import ClassVar

from pyspark.sql import SparkSession

from pipeline.config import Settings, WriteMode
from pipeline.model.spec import ModelSpec
from pipeline.spark.session import default_parallelism
from pipeline.store.delta import TableRef


@dataclass
class RunPlan:
    """What an incremental run will do, by document."""

    documents_read: int = 0
    rejected: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    duplicated: int = 0  # stored more than once: one copy kept, re-embedded if in the source
    delete_missing: bool = True
    waves: int = 0

    @property
    def to_embed(self) -> int:
        return self.new + self.changed

    def to_json(self) -> str:
        return json.dumps({"dry_run": True, **asdict(self)}, sort_keys=True)


@dataclass
class RunSummary:
    run_id: str
    mode: WriteMode
    output: str
    model_id: str
    model_fingerprint: str
    dimension: int
    documents_read: int
    documents_new: int
    documents_changed: int
    documents_unchanged: int
    documents_deleted: int
    documents_embedded: int
    chunks_written: int
    rejected: int
    waves: int
    documents_refused: int
    endpoint_retries: int
    tokens: int
    padded_tokens: int
    padding_efficiency: float
    seconds: float
    tokens_per_second: float
    table_version: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class ChunkTotals:
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    padded: int = 0
    refused: int = 0  # documents an endpoint refused (quarantined)
    retries: int = 0  # an endpoint's retried requests

    NAMES: ClassVar[tuple[str, ...]] = ("documents", "chunks", "tokens", "padded", "refused",
                                        "retries")

    def add(self, other: ChunkTotals) -> None:
        for name in self.NAMES:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Run:
    """The state one run carries from step to step."""

    spark: SparkSession
    settings: Settings
    table: TableRef
    spec: ModelSpec | None = None  # from check_inputs; None when the model folder failed
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    clock: float = field(default_factory=time.perf_counter)
    plan: RunPlan = field(default_factory=RunPlan)
    written: ChunkTotals = field(default_factory=ChunkTotals)
    version: int | None = None  # the last version this run committed
    planned_at: int = -1  # the table version the plan read (-1: a table this run created)
    blind_appends: bool = False  # whether new documents are appended without a MERGE
    writing: bool = False  # past the checks and the plan: rows may have been committed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.clock

    @property
    def partitions(self) -> int:
        return self.settings.spark.partitions or default_parallelism(self.spark)
