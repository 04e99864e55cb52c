"""CPU speed beyond the fp32 baseline: bf16, dynamic int8 linear layers, and tokenization
overlapped with the forward pass, each with its quality against fp32.

    .venv/bin/python -m benchmarks.cpu --limit 400 --json /tmp/bench_cpu.json
    .venv/bin/python -m benchmarks.cpu --threads 1,2 --variants fp32,bf16
    .venv/bin/python -m benchmarks.cpu --variants fp32,bf16 --scifact-queries 100

Every variant embeds the same texts in one process, as a Spark worker does: the corpus is cut into
slices of `--slice-rows` documents (sub-batches of an Arrow batch); each slice is prepared as
`pipeline.spark.udf.embed_record_batch` prepares it (`Encoder.chunk`, then `Encoder.tokenize` of
the chunks; that is the "tokenization") and then embedded by `Encoder.embed_ids` (token-budget
batches of the `local` profile). Variants:

- `fp32`: the pipeline today on CPU (`model.dtype: auto`).
- `bf16`: the model loaded by `get_encoder` with `model.dtype: bfloat16` (already a setting).
  Fast only where the CPU has bf16 instructions (`avx512_bf16`, `amx_bf16`); the report lists them.
- `int8`: `quantize_dynamic(model, {nn.Linear}, dtype=qint8)`: int8 weights (per tensor) and
  activations quantized per batch; every Linear layer.
- `int8_selective`: the same with per-channel weight scales, and the MLP down projections
  (in_features == intermediate_size, BERT's `output.dense`) left in fp32: their post-GELU inputs
  have outliers that per-tensor activation scales cannot hold.
- `+overlap` (`fp32+overlap`, `bf16+overlap`): the next slice is tokenized in a background thread
  while the current slice's batches run. The fast tokenizer and torch both release the GIL, so
  the two run on two cores: a gain in wall time, never in CPU time (see the tokens per CPU second
  column: with two Spark workers on two cores there is no idle core to borrow).

Each variant runs `--repeat` times, interleaved (the order rotates every round), and the median
tokens/s (real tokens, special tokens included) is reported, with process CPU seconds and the
cores other processes kept busy meanwhile. torch runs `--threads` threads (1: as a Spark worker
with OMP_NUM_THREADS=1) and the tokenizer one thread (TOKENIZERS_PARALLELISM=false).

Quality against fp32: STS Benchmark test Spearman (cosine of the two sentence vectors against the
gold score), the largest 1 - cosine between a text's variant and fp32 vectors (throughput texts
and STS sentences), and the largest change of an STS pair's cosine. `--scifact-queries N` adds
nDCG@10 on a SciFact subset (the test queries' relevant documents plus `--scifact-docs`
distractors); it is labelled as a subset and is not comparable with the full-corpus score.
Missing data (`../shared` is absent on CI) is skipped with a note; the throughput corpus then falls
back to the shipped sample corpus."""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    DEFAULT_MODEL,
    SAMPLE_CORPUS,
    SHARED_DATA,
    WARMUP_TEXTS,
    Timed,
    code_version,
    default_corpus,
    jsonl_rows,
    machine,
    markdown_table,
    parse_list,
    publish,
    read_documents,
)
from pipeline.config import BatchSettings, load_settings
from pipeline.metrics import ndcg_at_k, read_qrels, spearman
from pipeline.model.encode import Encoder
from pipeline.model.load import get_encoder
from pipeline.model.spec import ModelSpec, resolve_model_spec
from pipeline.text import document_text
from pipeline.vectors import row_cosines

STS_TEST = SHARED_DATA / "stsbenchmark" / "sts-test.csv"
SCIFACT = SHARED_DATA / "scifact"
PRECISIONS = ("fp32", "bf16", "int8", "int8_selective")
VARIANTS = {
    "fp32": ("fp32", False),
    "fp32+overlap": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16+overlap": ("bf16", True),
    "int8": ("int8", False),
    "int8_selective": ("int8_selective", False),
}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "amx_int8")


# ---------------------------------------------------------------- the machine


def cpu_flags() -> dict[str, Any]:
    """The CPU's bf16 / int8 instructions (from /proc/cpuinfo) and what torch makes of them."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = {flag: flag in flags for flag in CPU_FLAGS}
    bf16_native = found["avx512_bf16"] or found["amx_bf16"]
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {
        "flags": found,
        "bf16_native": bf16_native,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bool(mkldnn_bf16()) if mkldnn_bf16 is not None else None,
        "quantized_engine": torch.backends.quantized.engine,
    }


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch on `count` threads and the fast tokenizer on one, restored afterwards."""
    before_torch, before_env = torch.get_num_threads(), os.environ.get("TOKENIZERS_PARALLELISM")
    torch.set_num_threads(count)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        torch.set_num_threads(before_torch)
        if before_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before_env


# ---------------------------------------------------------------- the variants' models


def quantize_linear(model: torch.nn.Module, selective: bool) -> torch.nn.Module:
    """A dynamically quantized copy: int8 weights, activations quantized per batch at run time.
    `selective`: per-channel weight scales, and the MLP down projections stay fp32.

    torch.ao.quantization is deprecated (its successor is torchao's `quantize_`, not installed
    here) but still ships and runs in this torch; its warnings are silenced here."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    copied = copy.deepcopy(model)
    if selective:
        down = getattr(getattr(model, "config", None), "intermediate_size", None)
        spec: Any = {name: per_channel_dynamic_qconfig for name, module in copied.named_modules()
                     if isinstance(module, torch.nn.Linear) and module.in_features != down}
    else:
        spec = {torch.nn.Linear}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(copied, spec, dtype=torch.qint8)


def build_encoders(spec: ModelSpec, precisions: Sequence[str], batch: BatchSettings
                   ) -> dict[str, Encoder]:
    """One CPU encoder per precision. fp32 and bf16 load through `get_encoder` (bf16 is exactly
    `model.dtype: bfloat16`); the int8 variants quantize a copy of the fp32 model."""
    def load(dtype: str) -> Encoder:
        on_cpu = dataclasses.replace(spec, dtype=dtype, device="cpu")
        return get_encoder(on_cpu, batch)

    fp32 = load("float32")
    encoders = {"fp32": fp32}
    if "bf16" in precisions:
        encoders["bf16"] = load("bfloat16")
    for name in ("int8", "int8_selective"):
        if name in precisions:
            encoders[name] = Encoder(fp32.spec, quantize_linear(fp32.model, name != "int8"),
                                     fp32.tokenizer, fp32.device, batch, fp32.tokens)
    return encoders


# ---------------------------------------------------------------- one throughput run


@dataclass(frozen=True)
class Prepare:
    """The worker's tokenization of a slice of documents: chunk, then token ids per chunk."""

    window: int | None
    overlap: int
    truncate: bool

    def __call__(self, encoder: Encoder, texts: Sequence[str]) -> list[list[int]]:
        window = self.window or encoder.content_capacity
        per_doc = encoder.chunk(texts, window, self.overlap, self.truncate)
        prompt = encoder.spec.document_prompt
        return encoder.tokenize([prompt + chunk.text for doc in per_doc for chunk in doc])


@dataclass
class Run:
    vectors: np.ndarray
    tokens: int
    seconds: float
    cpu_s: float
    other_cores: float
    tokenize_s: float  # plain: time spent tokenizing; overlapped: time waiting for it
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {"tokens_per_s": round(self.tokens / self.seconds, 1),
                "tokens_per_cpu_s": round(self.tokens / max(self.cpu_s, 1e-9), 1),
                "seconds": round(self.seconds, 3), "cpu_s": round(self.cpu_s, 2),
                "other_cores": round(self.other_cores, 2),
                "tokenize_s": round(self.tokenize_s, 3),
                "tokenize_share": round(self.tokenize_s / self.seconds, 4)}


def slices(texts: Sequence[str], rows: int) -> list[Sequence[str]]:
    return [texts[i:i + rows] for i in range(0, len(texts), rows)]


def run_plain(encoder: Encoder, parts: Sequence[Sequence[str]], prepare: Prepare) -> Run:
    """Tokenize a slice, embed it, next slice."""
    vectors, tokens, tokenize_s = [], 0, 0.0
    with Timed() as timed:
        for part in parts:
            started = time.perf_counter()
            ids = prepare(encoder, part)
            tokenize_s += time.perf_counter() - started
            vectors.append(encoder.embed_ids(ids)[0])
            tokens += sum(map(len, ids))
    return Run(np.concatenate(vectors), tokens, timed.seconds, timed.cpu_s, timed.other_cores,
               tokenize_s)


def run_overlapped(encoder: Encoder, parts: Sequence[Sequence[str]], prepare: Prepare) -> Run:
    """Tokenize slice i + 1 in a background thread while slice i is embedded. Only the first
    slice's tokenization cannot be hidden."""
    vectors, tokens, waited = [], 0, 0.0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool, \
            Timed() as timed:
        pending = pool.submit(prepare, encoder, parts[0]) if parts else None
        for index in range(len(parts)):
            started = time.perf_counter()
            ids = pending.result()
            waited += time.perf_counter() - started
            if index + 1 < len(parts):
                pending = pool.submit(prepare, encoder, parts[index + 1])
            vectors.append(encoder.embed_ids(ids)[0])
            tokens += sum(map(len, ids))
    return Run(np.concatenate(vectors), tokens, timed.seconds, timed.cpu_s, timed.other_cores,
               waited)


def run_variant(encoders: dict[str, Encoder], variant: str, parts: Sequence[Sequence[str]],
                prepare: Prepare) -> Run:
    precision, overlap = VARIANTS[variant]
    return (run_overlapped if overlap else run_plain)(encoders[precision], parts, prepare)


# ---------------------------------------------------------------- quality


def read_sts(path: Path, limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """STS Benchmark: tab-separated, no quoting (sentences hold bare quotes); column 4 the gold
    score, 5 and 6 the sentences; some lines carry extra columns (sources), ignored."""
    left, right, gold = [], [], []
    with path.open(encoding="utf-8", newline="") as handle:
        for fields in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(fields) < 7:
                continue
            gold.append(float(fields[4]))
            left.append(fields[5])
            right.append(fields[6])
            if limit is not None and len(gold) >= limit:
                break
    return left, right, gold


def pair_cosines(vectors: np.ndarray, pairs: int) -> np.ndarray:
    """Cosines of rows i and pairs + i: the STS pairs, embedded as left + right."""
    return row_cosines(vectors[:pairs], vectors[pairs:])


def sts_quality(encoders: dict[str, Encoder], sts: tuple[list[str], list[str], list[float]]
                ) -> dict[str, dict[str, Any]]:
    """Per precision: Spearman, its change from fp32, and the largest pair-cosine change."""
    left, right, gold = sts
    vectors = {name: encoder.embed(left + right) for name, encoder in encoders.items()}
    reference = pair_cosines(vectors["fp32"], len(gold))
    out = {}
    for name, matrix in vectors.items():
        cosines = pair_cosines(matrix, len(gold))
        out[name] = {"vectors": matrix, "sts_spearman": round(spearman(cosines, gold), 5),
                     "sts_max_pair_cos_change": round(float(np.abs(cosines - reference).max()),
                                                      5)}
    base = out["fp32"]["sts_spearman"]
    for row in out.values():
        row["sts_delta"] = round(row["sts_spearman"] - base, 5)
    return out


def scifact_subset(folder: Path, queries: int, distractors: int
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    """The first `queries` test queries with judgements, their relevant documents, and the
    first `distractors` corpus documents: (doc id, text), (query id, text), qrels."""
    qrels_all = read_qrels(folder / "qrels" / "test.tsv")
    asked = [(str(row["_id"]), row["text"]) for row in jsonl_rows(folder / "queries.jsonl")
             if str(row["_id"]) in qrels_all][:queries]
    qrels = {qid: qrels_all[qid] for qid, _ in asked}
    wanted = {doc for judged in qrels.values() for doc in judged}
    docs = [(str(row["_id"]), document_text(row.get("text") or "", row.get("title")))
            for index, row in enumerate(jsonl_rows(folder / "corpus.jsonl"))
            if str(row["_id"]) in wanted or index < distractors]
    return docs, asked, qrels


def scifact_quality(encoders: dict[str, Encoder], subset: tuple) -> dict[str, float]:
    """nDCG@10 per precision on the subset (exact search)."""
    docs, asked, qrels = subset
    doc_ids = [doc_id for doc_id, _ in docs]
    scores = {}
    for name, encoder in encoders.items():
        doc_matrix = encoder.embed([text for _, text in docs], "document")
        query_matrix = encoder.embed([text for _, text in asked], "query")
        run = {}
        for (qid, _), row in zip(asked, query_matrix @ doc_matrix.T, strict=True):
            top = np.argsort(-row)[:10]
            run[qid] = {doc_ids[i]: float(row[i]) for i in top}
        scores[name] = round(ndcg_at_k(qrels, run, 10), 5)
    return scores


# ---------------------------------------------------------------- the benchmark


def measure(encoders: dict[str, Encoder], variants: Sequence[str], texts: Sequence[str],
            args: argparse.Namespace, prepare: Prepare, thread_count: int, started: float
            ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Interleaved rounds of every variant at `thread_count` torch threads; rows with the median
    run, and each variant's vectors from its first run."""
    parts = slices(texts, args.slice_rows)
    warm = slices(texts[:WARMUP_TEXTS], args.slice_rows)
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    vectors: dict[str, np.ndarray] = {}
    tokens = 0
    with threads(thread_count):
        for variant in variants:
            run_variant(encoders, variant, warm, prepare)
        for round_index in range(args.repeat):
            if round_index and args.time_limit_s and \
                    time.perf_counter() - started > args.time_limit_s:
                print(f"time limit: stopping after {round_index} round(s)", file=sys.stderr)
                break
            shift = round_index % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                run = run_variant(encoders, variant, parts, prepare)
                vectors.setdefault(variant, run.vectors)
                tokens = run.tokens
                runs[variant].append(run.summary())
                print(f"[{thread_count} thread(s)] round {round_index + 1} {variant}: "
                      f"{runs[variant][-1]['tokens_per_s']:.0f} tok/s", file=sys.stderr,
                      flush=True)
    rows = []
    for variant in variants:
        median = statistics.median(run["tokens_per_s"] for run in runs[variant])
        precision, overlap = VARIANTS[variant]
        rows.append({
            "variant": variant, "precision": precision, "overlap": overlap,
            "threads": thread_count, "texts": len(texts), "tokens": tokens,
            "tokens_per_s": round(median, 1),
            "tokens_per_cpu_s": round(statistics.median(r["tokens_per_cpu_s"]
                                                        for r in runs[variant]), 1),
            "tokenize_share": round(statistics.median(r["tokenize_share"]
                                                      for r in runs[variant]), 4),
            "other_cores": round(statistics.median(r["other_cores"] for r in runs[variant]), 2),
            "runs": runs[variant],
        })
    base = next((row["tokens_per_s"] for row in rows if row["variant"] == "fp32"), None)
    for row in rows:
        row["vs_fp32"] = round(row["tokens_per_s"] / base, 3) if base else None
    return rows, vectors


def add_quality(rows: list[dict], vectors: dict[str, np.ndarray], sts: dict | None,
                scifact: dict[str, float] | None) -> None:
    """Closeness to fp32 (throughput texts and STS sentences), STS / SciFact scores, and
    whether an overlapped variant gave the same vectors as its plain twin."""
    for row in rows:
        variant, precision = row["variant"], row["precision"]
        cosines = [row_cosines(vectors[variant], vectors["fp32"])]
        if sts is not None:
            cosines.append(row_cosines(sts[precision]["vectors"], sts["fp32"]["vectors"]))
            row.update({key: value for key, value in sts[precision].items() if key != "vectors"})
        joined = np.concatenate(cosines)
        row["min_cos_vs_fp32"] = round(float(joined.min()), 6)
        row["median_cos_vs_fp32"] = round(float(np.median(joined)), 6)
        row["max_cos_distance_vs_fp32"] = round(float(1 - joined.min()), 6)
        if row["overlap"] and precision in vectors:
            row["identical_to_plain"] = bool(np.array_equal(vectors[variant], vectors[precision]))
        if scifact is not None and precision in scifact:
            row["scifact_subset_ndcg10"] = scifact[precision]


COLUMNS = [
    ("threads", "threads", "{}"), ("variant", "variant", "{}"),
    ("tokens_per_s_runs", "tok/s", "{}"), ("vs_fp32", "x fp32", "{:.2f}"),
    ("tokens_per_cpu_s", "tok/CPU-s", "{:.0f}"),
    ("tokenize_share", "tokenize %", "{:.1%}"), ("other_cores", "others' cores", "{:.2f}"),
    ("sts_spearman", "STS-B Spearman", "{:.4f}"), ("sts_delta", "Δ vs fp32", "{:+.4f}"),
    ("min_cos_vs_fp32", "min cos vs fp32", "{:.4f}"),
    ("sts_max_pair_cos_change", "max Δ pair cos", "{:.4f}"),
    ("scifact_subset_ndcg10", "SciFact subset nDCG@10", "{:.4f}"),
]


def results_table(rows: list[dict]) -> str:
    """The rows as Markdown, in the columns some row has; tok/s with every run's beside it."""
    shown = [{**row, "tokens_per_s_runs": f"{row['tokens_per_s']:.0f} ("
              + "/".join(f"{run['tokens_per_s']:.0f}" for run in row["runs"]) + ")"}
             for row in rows]
    return markdown_table(shown, [column for column in COLUMNS
                                  if any(column[0] in row for row in shown)])


def summary(report: dict[str, Any]) -> str:
    """The CPU and its bf16 / int8 instructions, the texts, the table, and the notes."""
    flags = report["cpu"]
    return "\n".join([
        f"CPU: {report['machine']['cpu']}; bf16 native: {flags['bf16_native']}; "
        + ", ".join(f"{flag}={'yes' if on else 'no'}" for flag, on in flags["flags"].items()),
        f"{report['texts']} texts, {report['results'][0]['tokens']} tokens; "
        f"STS pairs: {report['sts_pairs']}",
        results_table(report["results"]),
        *(f"note: {note}" for note in report["notes"]),
    ])


def pick_corpus(args: argparse.Namespace, notes: list[str]) -> Path:
    corpus = args.corpus or default_corpus()
    if not corpus.exists():
        notes.append(f"corpus {corpus} is missing: using the shipped sample {SAMPLE_CORPUS}")
        corpus = SAMPLE_CORPUS
    elif args.corpus is None and corpus == SAMPLE_CORPUS:
        notes.append("../shared/data/wiki-en is missing: throughput on the shipped sample corpus")
    return corpus


def sts_scores(encoders: dict[str, Encoder], args: argparse.Namespace, notes: list[str]
               ) -> dict[str, dict[str, Any]] | None:
    """`sts_quality` on `--sts`; None, with a note, where it is off or missing."""
    if args.sts_limit == 0:
        return None
    if not args.sts.exists():
        notes.append(f"STS Benchmark {args.sts} is missing: STS-B quality skipped")
        return None
    with threads(args.threads[0]):
        return sts_quality(encoders, read_sts(args.sts, args.sts_limit or None))


def scifact_scores(encoders: dict[str, Encoder], args: argparse.Namespace, notes: list[str]
                   ) -> dict[str, float] | None:
    """`scifact_quality` on the subset `--scifact-queries` asks for; None where it is off or
    missing. Notes say which."""
    if not args.scifact_queries:
        return None
    if not (args.scifact / "qrels" / "test.tsv").exists():
        notes.append(f"SciFact {args.scifact} is missing: skipped")
        return None
    subset = scifact_subset(args.scifact, args.scifact_queries, args.scifact_docs)
    with threads(args.threads[0]):
        scores = scifact_quality(encoders, subset)
    notes.append(f"SciFact SUBSET: {len(subset[1])} test queries, {len(subset[0])} docs "
                 "(their relevant docs + the first distractors); not the full-corpus score")
    return scores


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    notes: list[str] = []
    corpus = pick_corpus(args, notes)
    texts = [text for _, text in read_documents(corpus, args.limit)]
    settings = load_settings("local", [], {"model.name": args.model})
    spec = resolve_model_spec(settings.model)
    precisions = [p for p in PRECISIONS if p == "fp32" or any(
        VARIANTS[v][0] == p for v in args.variants)]
    encoders = build_encoders(spec, precisions, settings.batch)
    chunking = settings.chunking
    prepare = Prepare(chunking.chunk_tokens, chunking.chunk_overlap, chunking.mode == "truncate")
    flags = cpu_flags()
    if not flags["bf16_native"]:
        notes.append("this CPU has no avx512_bf16 / amx_bf16: torch emulates bf16 matmuls")

    sts = sts_scores(encoders, args, notes)
    scifact = scifact_scores(encoders, args, notes)
    rows: list[dict] = []
    for thread_count in args.threads:
        measured, vectors = measure(encoders, args.variants, texts, args, prepare, thread_count,
                                    started)
        add_quality(measured, vectors, sts, scifact)
        rows += measured
    return {
        "machine": machine(), "cpu": flags, "code": code_version(), "command": sys.argv,
        "torch": torch.__version__, "transformers": _version("transformers"),
        "corpus": str(corpus), "limit": args.limit, "texts": len(texts), "model": args.model,
        "slice_rows": args.slice_rows, "repeat": args.repeat,
        "batch": dataclasses.asdict(settings.batch), "chunking": dataclasses.asdict(chunking),
        "sts": str(args.sts) if sts is not None else None,
        "sts_pairs": len(next(iter(sts.values()))["vectors"]) // 2 if sts else 0,
        "notes": notes, "results": rows, "total_seconds": round(time.perf_counter() - started, 1),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None,
                        help="JSONL with _id, title, text (default: shared wiki-en, else sample)")
    parser.add_argument("--limit", type=int, default=400, help="first N non-blank documents")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--variants", type=parse_list(str, list(VARIANTS)),
                        default=list(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=parse_list(int), default=[1],
                        help="torch thread counts, comma list (default 1, as a Spark worker)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; median kept")
    parser.add_argument("--slice-rows", type=int, default=50,
                        help="documents tokenized at once (the unit the overlap works on)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no new round after this many seconds (one round always runs)")
    parser.add_argument("--sts", type=Path, default=STS_TEST, help="STS Benchmark sts-test.csv")
    parser.add_argument("--sts-limit", type=int, default=None,
                        help="first N STS pairs (0: skip STS)")
    parser.add_argument("--scifact", type=Path, default=SCIFACT, help="BEIR SciFact folder")
    parser.add_argument("--scifact-queries", type=int, default=0,
                        help="add nDCG@10 on a SciFact subset of this many test queries (0: off)")
    parser.add_argument("--scifact-docs", type=int, default=500,
                        help="distractor documents in the SciFact subset")
    parser.add_argument("--json", default="benchmark_cpu.json", help="where to write results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "fp32" not in args.variants:
        args.variants = ["fp32", *args.variants]  # the baseline every ratio is against
    report = run_benchmark(args)
    publish("benchmark_cpu", report, summary(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
