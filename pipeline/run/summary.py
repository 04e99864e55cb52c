"""The summary a run prints and the record it leaves in `<output>_runs`."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from datetime import datetime, timezone

from pipeline.config import Settings
from pipeline.run.state import Run, RunSummary


def summarize(run: Run) -> RunSummary:
    plan, totals, version = run.plan, run.written, run.version
    seconds = time.perf_counter() - run.clock
    return RunSummary(
        run_id=run.run_id,
        mode=run.settings.output.mode,
        output=run.table.location,
        model_id=run.spec.model_id,
        model_fingerprint=run.spec.fingerprint,
        dimension=run.spec.dimension,
        documents_read=plan.documents_read,
        documents_new=plan.new,
        documents_changed=plan.changed,
        documents_unchanged=plan.unchanged,
        documents_deleted=plan.deleted if plan.delete_missing else 0,
        documents_embedded=totals.documents,
        chunks_written=totals.chunks,
        rejected=plan.rejected + totals.refused,
        waves=plan.waves,
        documents_refused=totals.refused,
        endpoint_retries=totals.retries,
        tokens=totals.tokens,
        padded_tokens=totals.padded,
        padding_efficiency=round(totals.tokens / totals.padded, 4) if totals.padded else 1.0,
        seconds=round(seconds, 2),
        tokens_per_second=round(totals.tokens / seconds, 1) if seconds else 0.0,
        table_version=version,
    )


# spark.conf entries recorded as REDACTED: what Spark's own spark.redaction.regex hides, API
# keys, and the executors' copy of the endpoint's key variable.
SECRET_CONF = re.compile(r"(?i)secret|password|token|access.?key|api.?key|credential")
REDACTED = "*********(redacted)"


def recorded_config(settings: Settings) -> dict:
    """The settings as `<output>_runs` records them, secrets in spark.conf redacted."""
    config = settings.to_dict()
    key_env = settings.model.endpoint.api_key_env
    conf = config["spark"]["conf"]
    for name in conf:
        if SECRET_CONF.search(name) or (key_env and name == f"spark.executorEnv.{key_env}"):
            conf[name] = REDACTED
    return config


def run_record(run: Run, status: str, error: str | None) -> dict:
    """The run's row in `<output>_runs`; a failed run still says what it committed."""
    spec = run.spec
    return {
        "run_id": run.run_id,
        "started_at": run.started_at,
        "ended_at": datetime.now(timezone.utc),
        "status": status,
        "mode": run.settings.output.mode,
        "plan": json.dumps(asdict(run.plan), sort_keys=True),
        "chunks_written": run.written.chunks,
        "tokens": run.written.tokens,
        "seconds": round(time.perf_counter() - run.clock, 2),
        "model_fingerprint": spec.fingerprint if spec else None,
        "config": json.dumps(recorded_config(run.settings), sort_keys=True),
        "table_version": run.version,
        "error": error,
    }
