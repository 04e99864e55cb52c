"""Evaluation metrics: retrieval scores with the BEIR / pytrec_eval / MTEB definitions, and
Pearson / Spearman correlation. Pure numpy: no Spark, no scipy.

Retrieval inputs are `qrels` (query id -> doc id -> graded relevance; a relevance <= 0 means not
relevant) and `run` (query id -> doc id -> score). Each query's run is ranked as trec_eval ranks
it: score descending, ties broken by doc id descending (`comp_sim_docno` in trec_eval's
`form_res_rels.c`, which pytrec_eval wraps). A metric is averaged over the queries in `qrels` that
have at least one relevant doc; such a query missing from `run` scores 0 (trec_eval `-c`), and
run queries absent from `qrels` are ignored.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pipeline.errors import InputError, UsageError

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

__all__ = [
    "map_at_k",
    "markdown_table",
    "mrr_at_k",
    "ndcg_at_k",
    "pearson",
    "rank_docs",
    "read_qrels",
    "recall_at_k",
    "retrieval_scores",
    "spearman",
]


# --- Retrieval ------------------------------------------------------------------------------


def rank_docs(scores: Mapping[str, float], k: int | None = None) -> list[str]:
    """Doc ids in trec_eval order (score descending, then doc id descending), the top k if given."""

    def key(doc: str) -> tuple[float, str]:
        return scores[doc], doc

    if k is None:
        return sorted(scores, key=key, reverse=True)
    return heapq.nlargest(k, scores, key=key)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")


# Per-query metrics take the relevances of the ranked top-k docs (0 when unjudged) and the
# query's positive qrels relevances (never empty).
_PerQuery = Callable[[Sequence[int], Sequence[int], int], float]


def _ndcg(ranked: Sequence[int], relevant: Sequence[int], k: int) -> float:
    # Linear gain (rel), discount log2(rank + 1); ideal DCG from all the query's judged relevances.
    dcg = sum(rel / math.log2(rank + 1) for rank, rel in enumerate(ranked[:k], start=1) if rel > 0)
    ideal = sorted(relevant, reverse=True)[:k]
    return dcg / sum(rel / math.log2(rank + 1) for rank, rel in enumerate(ideal, start=1))


def _recall(ranked: Sequence[int], relevant: Sequence[int], k: int) -> float:
    return sum(1 for rel in ranked[:k] if rel > 0) / len(relevant)


def _mrr(ranked: Sequence[int], relevant: Sequence[int], k: int) -> float:
    return next((1.0 / rank for rank, rel in enumerate(ranked[:k], start=1) if rel > 0), 0.0)


def _map(ranked: Sequence[int], relevant: Sequence[int], k: int) -> float:
    hits = 0
    total = 0.0
    for rank, rel in enumerate(ranked[:k], start=1):
        if rel > 0:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def _evaluate(qrels: Qrels, run: Run, metrics: Mapping[str, tuple[_PerQuery, int]]
              ) -> dict[str, float]:
    """Mean of each named (metric, k) over the qrels queries with a relevant doc; each query's
    run is ranked once."""
    for _, k in metrics.values():
        _check_k(k)
    depth = max(k for _, k in metrics.values())
    sums = dict.fromkeys(metrics, 0.0)
    n_queries = 0
    for qid, judged in qrels.items():
        relevant = [rel for rel in judged.values() if rel > 0]
        if not relevant:
            continue
        n_queries += 1
        scores = run.get(qid, {})
        ranked = [judged.get(doc, 0) for doc in rank_docs(scores, depth)]
        for name, (metric, k) in metrics.items():
            sums[name] += metric(ranked, relevant, k)
    if not n_queries:
        raise InputError("qrels have no query with a relevant document (relevance > 0)")
    return {name: total / n_queries for name, total in sums.items()}


def ndcg_at_k(qrels: Qrels, run: Run, k: int = 10) -> float:
    """Mean nDCG@k with linear gain (pytrec_eval `ndcg_cut`)."""
    return _evaluate(qrels, run, {"m": (_ndcg, k)})["m"]


def recall_at_k(qrels: Qrels, run: Run, k: int = 100) -> float:
    """Mean recall@k: relevant docs in the top k / relevant docs in qrels."""
    return _evaluate(qrels, run, {"m": (_recall, k)})["m"]


def mrr_at_k(qrels: Qrels, run: Run, k: int = 10) -> float:
    """Mean reciprocal rank of the first relevant doc in the top k (0 if none)."""
    return _evaluate(qrels, run, {"m": (_mrr, k)})["m"]


def map_at_k(qrels: Qrels, run: Run, k: int = 100) -> float:
    """Mean average precision cut at k, normalised by all relevant docs (pytrec_eval `map_cut`)."""
    return _evaluate(qrels, run, {"m": (_map, k)})["m"]


def retrieval_scores(qrels: Qrels, run: Run, ndcg_k: int = 10, recall_k: int = 100,
                     mrr_k: int = 10, map_k: int = 100) -> dict[str, float]:
    """The four retrieval metrics, keyed `ndcg@{ndcg_k}`, `recall@{recall_k}`, `mrr@{mrr_k}` and
    `map@{map_k}`."""
    return _evaluate(qrels, run, {
        f"ndcg@{ndcg_k}": (_ndcg, ndcg_k),
        f"recall@{recall_k}": (_recall, recall_k),
        f"mrr@{mrr_k}": (_mrr, mrr_k),
        f"map@{map_k}": (_map, map_k),
    })


def read_qrels(path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """Read a BEIR `qrels/<split>.tsv` (`query-id<TAB>corpus-id<TAB>score`, header line) into
    query id -> doc id -> relevance. Blank lines are skipped; a repeated pair keeps the last
    score, as BEIR's loader does."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if lineno == 1 and fields[:1] == ["query-id"]:
                continue
            if len(fields) != 3:
                raise InputError(f"{path}:{lineno}: expected 3 tab-separated fields, "
                                 f"got {len(fields)}")
            qid, doc, score = fields
            try:
                relevance = int(score)
            except ValueError:
                msg = f"{path}:{lineno}: relevance {score!r} is not an integer"
                raise InputError(msg) from None
            qrels.setdefault(qid, {})[doc] = relevance
    return qrels


def markdown_table(rows: Mapping[str, Mapping[str, float]], label_header: str = "") -> str:
    """Render row label -> metric -> value as a GitHub Markdown table, values to 4 decimals.
    Columns are the metrics in first-seen order; a metric missing from a row is left blank."""
    if not rows:
        raise ValueError("no rows to render")
    metrics = list(dict.fromkeys(metric for row in rows.values() for metric in row))

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| " + " | ".join([cell(label_header), *map(cell, metrics)]) + " |",
        "|" + "---|" + "---:|" * len(metrics),
    ]
    for label, row in rows.items():
        values = [f"{row[m]:.4f}" if m in row else "" for m in metrics]
        lines.append("| " + " | ".join([cell(label), *values]) + " |")
    return "\n".join(lines) + "\n"


# --- Correlation ----------------------------------------------------------------------------


def _pairs(a: Sequence[float] | np.ndarray,
           b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError("inputs must be one-dimensional")
    if x.shape != y.shape:
        raise ValueError(f"inputs differ in length: {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"need at least 2 pairs, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("inputs contain NaN or infinite values")
    for name, v in (("a", x), ("b", y)):
        if (v == v[0]).all():
            raise ValueError(f"input {name} is constant: correlation is undefined")
    return x, y


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx = x - x.mean()
    dy = y - y.mean()
    r = float(np.dot(dx, dy) / math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy))))
    return max(-1.0, min(1.0, r))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_group = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], x.size)
    # Positions start..end-1 hold ranks start+1..end, whose mean is (start + 1 + end) / 2.
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = group_rank[np.cumsum(starts_group) - 1]
    return ranks


def pearson(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation coefficient of paired samples."""
    return _pearson(*_pairs(a, b))


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: Pearson of average ranks (ties share their mean rank), as
    scipy.stats.spearmanr."""
    x, y = _pairs(a, b)
    return _pearson(_average_ranks(x), _average_ranks(y))
