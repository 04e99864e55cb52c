"""Retrieval evaluation on a BEIR-layout dataset through the real pipeline: the corpus is
embedded by an (incremental) embedding run into Delta, the queries on the executors with the query
prompt, retrieval is the exact distributed search, and the scores are the standard definitions
(pipeline.metrics). A reference path (sentence-transformers `encode` + NumPy exact search) scores
the same texts in-process, to show the pipeline changes nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline.config import Settings
from pipeline.embed import RunSummary, run_embedding
from pipeline.errors import InputError, MissingDependencyError
from pipeline.metrics import pearson, read_qrels, retrieval_scores, spearman
from pipeline.model.spec import ModelSpec
from pipeline.search import search_table
from pipeline.text import document_text

BEIR_FILES = ("corpus.jsonl", "queries.jsonl")


@dataclass
class EvaluationReport:
    dataset: str
    split: str
    model_id: str
    vectors: str
    queries: int
    documents_embedded: int
    scores: dict[str, float]
    seconds: float
    reference: dict[str, float] | None = None
    max_abs_difference: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def beir_files(folder: str, split: str) -> tuple[Path, Path, Path]:
    """corpus.jsonl, queries.jsonl and qrels/<split>.tsv, or an error naming what is missing."""
    root = Path(folder)
    paths = [root / name for name in BEIR_FILES] + [root / "qrels" / f"{split}.tsv"]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise InputError(f"not a BEIR dataset folder for split {split!r}: missing {missing}; "
                         f"{root} holds {present}")
    return paths[0], paths[1], paths[2]


def evaluation_settings(settings: Settings, corpus: Path, vectors: str | None, dataset: str
                        ) -> Settings:
    """The embedding run's settings: BEIR columns (title + " " + text, as MTEB embeds them) and
    a vectors table per dataset, model and chunking, so a rerun re-embeds nothing."""
    source = dataclasses.replace(settings.input, path=str(corpus), format="jsonl", id_col="_id",
                                 text_col="text", title_col="title", snapshot="full")
    if vectors is None:
        key = json.dumps([settings.model.__dict__, settings.chunking.__dict__,
                          settings.output.vector_format], sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        vectors = str(Path("data") / "eval" / f"{dataset}_{digest}")
    output = dataclasses.replace(settings.output, path=vectors, mode="incremental")
    return dataclasses.replace(settings, input=source, output=output)


def evaluate_retrieval(spark: SparkSession, settings: Settings, folder: str, split: str = "test",
                       vectors: str | None = None, depth: int = 100,
                       compare_reference: bool = False) -> EvaluationReport:
    started = time.perf_counter()
    corpus, queries_path, qrels_path = beir_files(folder, split)
    qrels = read_qrels(qrels_path)
    dataset = Path(folder).resolve().name
    run_settings = evaluation_settings(settings, corpus, vectors, dataset)
    summary = run_embedding(spark, run_settings)
    assert isinstance(summary, RunSummary)
    embedded_at = time.perf_counter()
    queries = (spark.read.json(str(queries_path))
               .select(F.col("_id").cast("string").alias("query_id"), "text")
               .where(F.col("query_id").isin(list(qrels))))
    results, spec = search_table(spark, run_settings, run_settings.output.path, queries, depth,
                                 by_document=True, metric="cosine", explicit_model=True)
    run: dict[str, dict[str, float]] = {}
    for row in results.select("query_id", "doc_id", "score").collect():
        run.setdefault(row.query_id, {})[row.doc_id] = float(row.score)
    report = EvaluationReport(
        dataset=dataset, split=split, model_id=spec.model_id, vectors=summary.output,
        queries=len(run), documents_embedded=summary.documents_embedded,
        scores=retrieval_scores(qrels, run), seconds=0.0,
        timings={"embed_corpus": round(embedded_at - started, 2),
                 "queries_and_search": round(time.perf_counter() - embedded_at, 2)})
    if compare_reference:
        reference_started = time.perf_counter()
        reference_run = reference_retrieval(spec, corpus, queries_path, set(qrels), depth)
        report.reference = retrieval_scores(qrels, reference_run)
        report.max_abs_difference = round(max(abs(report.scores[k] - report.reference[k])
                                              for k in report.scores), 6)
        report.timings["reference"] = round(time.perf_counter() - reference_started, 2)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


# --- the reference: plain sentence-transformers and NumPy ----------------------------------


def _sentence_transformer(spec: ModelSpec):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise MissingDependencyError("the reference needs sentence-transformers (pip install "
                                     "sentence-transformers)") from error
    model = SentenceTransformer(spec.path, device="cpu")
    model.max_seq_length = spec.max_length
    return model


def _st_encode(model, texts: list[str], prompt: str) -> np.ndarray:
    return model.encode(texts, prompt=prompt or None, batch_size=32, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)


def reference_retrieval(spec: ModelSpec, corpus: Path, queries: Path, query_ids: set[str],
                        depth: int) -> dict[str, dict[str, float]]:
    """Top `depth` documents per query from sentence-transformers vectors and a NumPy product."""
    docs = [json.loads(line) for line in corpus.open(encoding="utf-8") if line.strip()]
    asked = [q for q in (json.loads(line) for line in queries.open(encoding="utf-8")
                         if line.strip()) if str(q["_id"]) in query_ids]
    model = _sentence_transformer(spec)
    doc_matrix = _st_encode(model, [document_text(d.get("text") or "", d.get("title"))
                                    for d in docs], spec.document_prompt)
    query_matrix = _st_encode(model, [q["text"] for q in asked], spec.query_prompt)
    doc_ids = [str(d["_id"]) for d in docs]
    run = {}
    for query, scores in zip(asked, query_matrix @ doc_matrix.T, strict=True):
        top = np.argsort(-scores)[:depth]
        run[str(query["_id"])] = {doc_ids[i]: float(scores[i]) for i in top}
    return run


def reference_similarity(spec: ModelSpec, left: list[str], right: list[str], gold: list[float]
                         ) -> dict[str, float]:
    """Pearson and Spearman of sentence-transformers cosines against the gold scores."""
    model = _sentence_transformer(spec)
    a = _st_encode(model, left, spec.document_prompt)
    b = _st_encode(model, right, spec.document_prompt)
    cosines = np.einsum("ij,ij->i", a, b)
    return {"pearson": round(pearson(cosines, gold), 6),
            "spearman": round(spearman(cosines, gold), 6)}

