"""Benchmark: sentence-transformers vs Spark predict_batch_udf vs our encoder vs our Spark job.

    .venv/bin/python -m benchmarks.embed --limit 2000 --short
    .venv/bin/python -m benchmarks.embed --corpus pipeline/data/sample_corpus.jsonl

All modes embed the same texts (document text = title + " " + text, truncated to the model's max
length) on the same cores. Each mode runs in its own subprocess (`--only MODE`), which prints one
JSON line back, so memory and thread settings do not leak between modes. Prints a table and writes
the results as JSON (`--json`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.harness import (
    DEFAULT_MODEL,
    WARMUP_TEXTS,
    Timed,
    code_version,
    default_corpus,
    jsonl_rows,
    markdown_table,
    module_env,
    parse_list,
    process_tree,
    publish,
    read_documents,
    wait_for_quiet,
)
from pipeline.config import ModelSettings, Settings, load_settings
from pipeline.model.spec import resolve_model_path, resolve_model_spec

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MODES = {
    "st": "sentence-transformers encode",
    "pbudf": "Spark predict_batch_udf -> Delta",
    "encoder": "pipeline Encoder.embed",
    "spark_job": "pipeline run_embedding -> Delta",
}
RESULT_PREFIX = "BENCHMARK_RESULT "


# ---------------------------------------------------------------- process-tree memory


def vm_rss_kb(pid: int) -> int:
    """VmRSS of one process in kB; 0 when it is gone or has none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root: int) -> int:
    return sum(vm_rss_kb(pid) for pid in process_tree(root))


class PeakTreeRss:
    """Peak of the summed VmRSS of this process and its descendants (Spark: driver, JVM and
    Python workers), sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakTreeRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, tree_rss_kb(os.getpid()))
            if self._stop.wait(self.interval):
                return

    @property
    def peak_mb(self) -> float:
        return round(self.peak_kb / 1024, 1)


# ---------------------------------------------------------------- corpus and token accounting


def token_lengths(model: str, texts: Sequence[str]) -> list[int]:
    """Tokens per text with special tokens, truncated to the model's max length, as
    sentence-transformers counts them."""
    from transformers import AutoTokenizer

    spec = resolve_model_spec(model_settings(model))
    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    ids = tokenizer(list(texts), truncation=True, max_length=spec.max_length)["input_ids"]
    return [len(row) for row in ids]


def write_prepared(docs: Sequence[tuple[str, str]], lengths: Sequence[int], path: Path) -> None:
    """The corpus every mode reads: `_id`, the exact `text` to embed, its reference `tokens`."""
    with path.open("w") as handle:
        for (doc_id, text), tokens in zip(docs, lengths, strict=True):
            handle.write(json.dumps({"_id": doc_id, "text": text, "tokens": tokens}) + "\n")


def read_prepared(path: Path) -> tuple[list[str], list[int]]:
    rows = list(jsonl_rows(path))
    return [row["text"] for row in rows], [row["tokens"] for row in rows]


def padded_tokens(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> int:
    """Tokens a forward pass sees when each batch is padded to its longest row."""
    array = np.asarray(lengths)
    return int(sum(len(batch) * array[list(batch)].max() for batch in batches if len(batch)))


def st_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """sentence-transformers `encode` batching: sorted by character length, longest first."""
    order = np.argsort([-len(text) for text in texts]).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


# ---------------------------------------------------------------- settings shared by our modes


def model_settings(model: str) -> ModelSettings:
    return load_settings("local", [], {"model.name": model}).model


def job_settings(prepared: Path, work: Path, model: str, cores: int,
                 extra: Sequence[str] = ()) -> Settings:
    """The local profile on the prepared corpus, truncating as sentence-transformers does;
    `extra` overrides (`section.key=value`) come last."""
    overrides = ["chunking.mode=truncate", "input.title_col=null", *extra]
    flags = {
        "input.path": str(prepared),
        "input.format": "jsonl",
        "input.id_col": "_id",
        "input.text_col": "text",
        "output.path": str(work / "vectors"),
        "model.name": model,
        "spark.master": f"local[{cores}]",
        "spark.conf": {"spark.ui.showConsoleProgress": "false"},
        "run.load_log_dir": str(work / "loads"),
    }
    extra_keys = {item.split("=", 1)[0].strip() for item in extra}
    return load_settings("local", overrides,
                         {key: value for key, value in flags.items() if key not in extra_keys})


def result(texts: int, tokens: int, padded: int, timed: Timed, **extra: Any) -> dict[str, Any]:
    seconds = timed.seconds
    return {
        "texts": texts,
        "tokens": tokens,
        "padded_tokens": padded,
        "padding_efficiency": round(tokens / padded, 4) if padded else 1.0,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "texts_per_s": round(texts / seconds, 2),
        "cpu_s": round(timed.cpu_s, 2),
        "cores_busy": round(timed.cpu_s / seconds, 2),
        "other_cores": round(timed.other_cores, 2),
        **extra,
    }


# ---------------------------------------------------------------- the modes (one per subprocess)


@dataclass(frozen=True)
class ModeArgs:
    """What a mode's subprocess is told."""

    prepared: Path
    work: Path
    model: str
    cores: int
    batch_size: int
    job_set: tuple[str, ...] = ()

    def settings(self) -> Settings:
        return job_settings(self.prepared, self.work, self.model, self.cores, self.job_set)


def run_st(mode: ModeArgs) -> dict:
    """(1) SentenceTransformer.encode in this process, the single-process baseline."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(mode.cores)
    texts, lengths = read_prepared(mode.prepared)
    started = time.perf_counter()
    model = SentenceTransformer(str(resolve_model_path(mode.model)), device="cpu")
    startup = time.perf_counter() - started
    model.encode(texts[:WARMUP_TEXTS], batch_size=mode.batch_size)
    with Timed() as timed:
        model.encode(texts, batch_size=mode.batch_size)
    padded = padded_tokens(lengths, st_batches(texts, mode.batch_size))
    return result(len(texts), sum(lengths), padded, timed, startup_s=round(startup, 3),
                  threads=torch.get_num_threads())


def run_encoder(mode: ModeArgs) -> dict:
    """(3) Our encoder in this process: get_encoder(...).embed(texts)."""
    import torch

    from pipeline.model.encode import plan_batches
    from pipeline.model.load import get_encoder

    torch.set_num_threads(mode.cores)
    texts, _ = read_prepared(mode.prepared)
    settings = mode.settings()
    started = time.perf_counter()
    spec = resolve_model_spec(settings.model)
    batch = settings.batch
    encoder = get_encoder(spec, batch)
    startup = time.perf_counter() - started
    encoder.embed(texts[:WARMUP_TEXTS])
    with Timed() as timed:
        encoder.embed(texts)
    prompt = spec.prompt("document")
    lengths = [len(row) for row in encoder.tokenize([prompt + text for text in texts])]
    plan = plan_batches(lengths, batch.max_batch_tokens, batch.max_batch_rows, batch.min_fill)
    return result(len(texts), sum(lengths), padded_tokens(lengths, plan), timed,
                  startup_s=round(startup, 3), threads=torch.get_num_threads())


def st_predict_fn_factory(model_path: str, batch_size: int, log_dir: str
                          ) -> Callable[[], Callable[[np.ndarray], np.ndarray]]:
    """make_predict_fn for predict_batch_udf, as a Spark user writes it: load a
    SentenceTransformer, encode each numpy batch of strings. It also logs which texts formed
    each batch (8-byte digests), so padding is computed from the real batches."""

    def make_predict_fn() -> Callable[[np.ndarray], np.ndarray]:
        from sentence_transformers import SentenceTransformer

        started = time.perf_counter()
        model = SentenceTransformer(model_path, device="cpu")
        log = Path(log_dir, f"batches-{os.getpid()}.jsonl").open("a")  # noqa: SIM115
        log.write(json.dumps({"load_s": round(time.perf_counter() - started, 3),
                              "threads": _torch_threads()}) + "\n")

        def predict(texts: np.ndarray) -> np.ndarray:
            log.write(json.dumps([text_digest(text) for text in texts]) + "\n")
            log.flush()
            return model.encode(texts.tolist(), batch_size=batch_size)

        return predict

    return make_predict_fn


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def read_batch_logs(log_dir: Path) -> tuple[list[dict], list[list[str]]]:
    """Worker load records and the batches (digests) they ran."""
    loads, batches = [], []
    for path in sorted(log_dir.glob("batches-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            (loads if isinstance(record, dict) else batches).append(record)
    return loads, batches


def logged_batch_tokens(batches: list[list[str]], texts: Sequence[str], lengths: Sequence[int]
                        ) -> tuple[int, int]:
    """(real, padded) tokens of the logged batches (text digests), each padded to its longest."""
    by_digest = {text_digest(text): n for text, n in zip(texts, lengths, strict=True)}
    rows = [[by_digest[digest] for digest in batch] for batch in batches if batch]
    return sum(map(sum, rows)), sum(len(row) * max(row) for row in rows)


def start_spark(settings: Settings) -> tuple[SparkSession, float]:
    from pipeline.spark.session import get_spark

    started = time.perf_counter()
    spark = get_spark(settings.spark)
    return spark, time.perf_counter() - started


def run_pbudf(mode: ModeArgs) -> dict:
    """(2) pyspark.ml.functions.predict_batch_udf with a fixed batch size, written to Delta."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, FloatType

    texts, lengths = read_prepared(mode.prepared)
    spark, startup = start_spark(mode.settings())
    log_dir, output = mode.work / "pbudf-batches", str(mode.work / "pbudf-vectors")
    log_dir.mkdir(parents=True, exist_ok=True)
    make_predict_fn = st_predict_fn_factory(str(resolve_model_path(mode.model)),
                                            mode.batch_size, str(log_dir))
    embed = predict_batch_udf(make_predict_fn, return_type=ArrayType(FloatType()),
                              batch_size=mode.batch_size)
    with Timed() as timed:
        docs = spark.read.json(str(mode.prepared)).select(F.col("_id").alias("doc_id"), "text")
        (docs.repartition(mode.cores).withColumn("embedding", embed("text"))
         .select("doc_id", "embedding").write.format("delta").mode("overwrite").save(output))
    written = spark.read.format("delta").load(output).count()
    spark.stop()
    loads, batches = read_batch_logs(log_dir)
    tokens, padded = logged_batch_tokens(batches, texts, lengths)
    return result(written, tokens, padded, timed, startup_s=round(startup, 3),
                  worker_load_s=[load["load_s"] for load in loads],
                  threads=sorted({load["threads"] for load in loads}))


def run_spark_job(mode: ModeArgs) -> dict:
    """(4) Our end-to-end job: run_embedding(spark, settings) writing Delta."""
    from pipeline.embed import run_embedding

    settings = mode.settings()
    spark, startup = start_spark(settings)
    with Timed() as timed:
        summary = run_embedding(spark, settings)
    spark.stop()
    loads = [json.loads(line) for path in sorted((mode.work / "loads").glob("*.jsonl"))
             for line in path.read_text().splitlines()]
    return result(summary.documents_embedded, summary.tokens, summary.padded_tokens, timed,
                  startup_s=round(startup, 3), worker_load_s=[load["seconds"] for load in loads],
                  job_seconds=summary.seconds, chunks=summary.chunks_written,
                  rejected=summary.rejected, output_mode=settings.output.mode)


RUNNERS = {"st": run_st, "pbudf": run_pbudf, "encoder": run_encoder, "spark_job": run_spark_job}


def run_only(args: argparse.Namespace) -> int:
    """Child side: run one mode, print its result as one JSON line."""
    mode = ModeArgs(Path(args.prepared), Path(args.work_dir), args.model, args.cores,
                    args.batch_size, tuple(args.job_set))
    mode.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with PeakTreeRss() as rss:
        measured = RUNNERS[args.only](mode)
    measured["peak_rss_mb"] = rss.peak_mb
    measured["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(RESULT_PREFIX + json.dumps(measured), flush=True)
    return 0


# ---------------------------------------------------------------- parent: orchestrate and report


def run_child(mode: str, prepared: Path, work: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.embed", "--only", mode,
               "--prepared", str(prepared), "--work-dir", str(work), "--model", args.model,
               "--cores", str(args.cores), "--batch-size", str(args.batch_size),
               *(f"--job-set={item}" for item in args.job_set)]
    done = subprocess.run(command, cwd=work.parent, env=module_env(), capture_output=True,
                          text=True, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"mode {mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def best_run(runs: list[dict]) -> dict:
    """The fastest run (other processes only ever slow a run down), with every run's tokens/s
    and noise beside it."""
    chosen = dict(max(runs, key=lambda run: run["tokens_per_s"]))
    chosen["runs_tokens_per_s"] = [run["tokens_per_s"] for run in runs]
    chosen["runs_other_cores"] = [run["other_cores"] for run in runs]
    return chosen


def measure_mode(mode: str, name: str, prepared: Path, root: Path,
                 args: argparse.Namespace) -> list[dict]:
    """`--repeat` runs, plus up to `--noise-retries` more while every run so far had other
    processes busier than `--max-noise` cores."""
    runs: list[dict] = []
    while len(runs) < args.repeat or (
            len(runs) < args.repeat + args.noise_retries
            and min(run["other_cores"] for run in runs) > args.max_noise):
        waited = wait_for_quiet(args.quiet_wait)
        print(f"[{name}] {mode} run {len(runs) + 1} (waited {waited}s for a quiet machine) ...",
              file=sys.stderr, flush=True)
        run = run_child(mode, prepared, root / f"{name}-{mode}-{len(runs)}", args)
        runs.append({**run, "waited_for_quiet_s": waited})
    return runs


def add_ratios(rows: list[dict]) -> None:
    """tokens/s relative to sentence-transformers on the same corpus."""
    baseline = {row["corpus"]: row["tokens_per_s"] for row in rows if row["mode"] == "st"}
    for row in rows:
        base = baseline.get(row["corpus"])
        row["vs_st"] = round(row["tokens_per_s"] / base, 3) if base else None


def benchmark_corpus(name: str, docs: list[tuple[str, str]], root: Path,
                     args: argparse.Namespace) -> list[dict]:
    lengths = token_lengths(args.model, [text for _, text in docs])
    prepared = root / f"{name}.jsonl"
    write_prepared(docs, lengths, prepared)
    rows = []
    for mode in args.modes:
        runs = measure_mode(mode, name, prepared, root, args)
        rows.append({"corpus": name, "mode": mode, "label": MODES[mode], **best_run(runs)})
    return rows


COLUMNS = [
    ("corpus", "corpus", "{}"), ("mode", "mode", "{}"), ("texts", "texts", "{}"),
    ("tokens", "tokens", "{}"), ("seconds", "s", "{:.1f}"), ("tokens_per_s", "tok/s", "{:.0f}"),
    ("texts_per_s", "texts/s", "{:.1f}"), ("padding_efficiency", "pad eff", "{:.3f}"),
    ("cores_busy", "cores busy", "{:.2f}"), ("other_cores", "others' cores", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("startup_s", "startup s", "{:.1f}"),
    ("worker_load_s", "worker loads s", "{:.1f}"), ("vs_st", "x ST", "{:.2f}"),
]


def corpora(args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    found = {"mixed": read_documents(args.corpus, args.limit)}
    if args.short:
        found["short"] = read_documents(args.corpus, args.limit, short=True)
    return found


def run_all(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="benchmark-embed-") as tmp:
        for name, docs in corpora(args).items():
            rows += benchmark_corpus(name, docs, Path(tmp), args)
    add_ratios(rows)
    report = {
        "code": code_version(), "command": sys.argv,
        "corpus": str(args.corpus), "limit": args.limit, "model": args.model,
        "cores": args.cores, "batch_size": args.batch_size, "repeat": args.repeat,
        "job_set": args.job_set, "results": rows,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    publish("benchmark_embed", report, markdown_table(rows, COLUMNS), args.json)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus(),
                        help="JSONL with _id, title, text (default: shared wiki-en, else sample)")
    parser.add_argument("--limit", type=int, default=None, help="first N non-blank documents")
    parser.add_argument("--short", action="store_true",
                        help="also run a short-text set (first sentence of each paragraph)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--modes", type=parse_list(str, MODES), default=list(MODES),
                        help=f"comma list of {','.join(MODES)}")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh runs per mode; the fastest is reported")
    parser.add_argument("--max-noise", type=float, default=0.2,
                        help="cores other processes may keep busy before a run counts as noisy")
    parser.add_argument("--noise-retries", type=int, default=1,
                        help="extra runs of a mode while all its runs were noisy")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sentence-transformers and predict_batch_udf batch size")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", default="benchmark_embed.json", help="where to write results")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mode run")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="before each run, wait up to this many seconds for an idle machine")
    parser.add_argument("--job-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting of our modes (encoder, spark_job); repeatable")
    parser.add_argument("--only", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_only(args) if args.only else run_all(args)


if __name__ == "__main__":
    sys.exit(main())
