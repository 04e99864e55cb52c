"""Where the downstream jobs put their results: a JSON lines file or a Delta table."""

from __future__ import annotations

import json
from pathlib import Path

from pyspark.sql import DataFrame

from pipeline.store.delta import TableRef


def write_output(frame: DataFrame, output: str) -> str:
    """JSON lines when the path ends in .jsonl (streamed partition by partition through the
    driver: for results, not for corpora), else a Delta table, overwritten. Returns where."""
    if output.endswith(".jsonl"):
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for row in frame.toLocalIterator():
                handle.write(json.dumps(row.asDict(), ensure_ascii=False, default=str) + "\n")
        return str(path.resolve())
    table = TableRef.parse(output)
    table.write(frame, "overwrite")
    return table.location
