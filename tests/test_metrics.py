"""pipeline.metrics: retrieval metrics on tiny hand-computed qrels, and correlations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import (
    _average_ranks,
    map_at_k,
    markdown_table,
    mrr_at_k,
    ndcg_at_k,
    pearson,
    rank_docs,
    read_qrels,
    recall_at_k,
    retrieval_scores,
    spearman,
)

# q1: graded rels a=2, b=1; c judged not relevant. The run ranks a, x (unjudged), b, c.
Q1_QRELS = {"a": 2, "b": 1, "c": 0}
Q1_RUN = {"a": 0.9, "x": 0.8, "b": 0.7, "c": 0.6}
# Ideal order a(2), b(1): IDCG = 2/log2(2) + 1/log2(3) = 2 + 0.63093 = 2.63093
IDCG_Q1 = 2 + 1 / math.log2(3)


def test_ndcg_graded_relevance_at_ranks_1_and_3():
    # DCG@10 = 2/log2(1+1) + 1/log2(3+1) = 2 + 0.5 = 2.5; nDCG = 2.5 / 2.63093 = 0.95024
    assert ndcg_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 10) == pytest.approx(2.5 / IDCG_Q1)
    assert ndcg_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 10) == pytest.approx(0.950235, abs=1e-6)


def test_ndcg_cutoff_keeps_ideal_from_qrels():
    # @2: DCG = 2 (b at rank 3 is cut), IDCG@2 still 2 + 1/log2(3): 2 / 2.63093 = 0.76019
    assert ndcg_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 2) == pytest.approx(2 / IDCG_Q1)
    # @1: DCG = 2, IDCG@1 = 2 (only the top ideal grade) -> 1.0
    assert ndcg_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 1) == pytest.approx(1.0)


def test_ndcg_ideal_counts_relevant_docs_never_retrieved():
    # Run retrieves only b (rel 1) at rank 1: DCG = 1. IDCG = 2 + 1/log2(3) from qrels a=2, b=1.
    assert ndcg_at_k({"q": {"a": 2, "b": 1}}, {"q": {"b": 1.0}}) == pytest.approx(1 / IDCG_Q1)


def test_recall_cutoffs():
    # Relevant: a (rank 1), b (rank 3) out of 2 relevant in qrels.
    qrels, run = {"q1": Q1_QRELS}, {"q1": Q1_RUN}
    assert recall_at_k(qrels, run, 1) == pytest.approx(1 / 2)
    assert recall_at_k(qrels, run, 2) == pytest.approx(1 / 2)
    assert recall_at_k(qrels, run, 3) == pytest.approx(2 / 2)
    # Denominator is relevant docs in qrels, not k: 1 retrieved of 3 relevant -> 1/3 at any k.
    assert recall_at_k({"q": {"a": 1, "b": 1, "c": 1}}, {"q": {"a": 1.0}}, 100) == pytest.approx(
        1 / 3)


def test_mrr_cutoff():
    # First relevant doc (r) is at rank 3.
    qrels = {"q": {"r": 1, "n": 0}}
    run = {"q": {"n": 0.9, "x": 0.8, "r": 0.7}}
    assert mrr_at_k(qrels, run, 2) == 0.0
    assert mrr_at_k(qrels, run, 3) == pytest.approx(1 / 3)
    assert mrr_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 10) == pytest.approx(1.0)


def test_map_cutoff_and_normalisation():
    # q1 relevant at ranks 1 and 3: AP@10 = (P@1 + P@3) / 2 = (1 + 2/3) / 2 = 5/6
    assert map_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 10) == pytest.approx(5 / 6)
    # @2 only a counts, still divided by 2 relevant: (1) / 2 = 0.5
    assert map_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 2) == pytest.approx(0.5)
    # 3 relevant, only a retrieved at rank 2: (1/2) / 3 = 1/6
    qrels = {"q": {"a": 1, "b": 1, "c": 1}}
    assert map_at_k(qrels, {"q": {"z": 0.9, "a": 0.5}}, 100) == pytest.approx(1 / 6)


def test_tie_break_is_score_desc_then_doc_id_desc():
    assert rank_docs({"a": 1.0, "b": 1.0, "c": 1.0}) == ["c", "b", "a"]
    assert rank_docs({"a": 2.0, "z": 1.0}) == ["a", "z"]
    # Doc ids compare as strings (strcmp), not numbers: "9" > "100" > "10".
    assert rank_docs({"10": 0.5, "9": 0.5, "100": 0.5}) == ["9", "100", "10"]
    assert rank_docs({"a": 1.0, "b": 1.0, "c": 0.5}, k=1) == ["b"]
    # All tied: order c, b, a, so relevant b is at rank 2 -> MRR 1/2, and out of the top 1.
    qrels, run = {"q": {"b": 1}}, {"q": {"a": 0.3, "b": 0.3, "c": 0.3}}
    assert mrr_at_k(qrels, run, 10) == pytest.approx(0.5)
    assert recall_at_k(qrels, run, 1) == 0.0
    assert recall_at_k(qrels, run, 2) == 1.0


def test_query_without_run_entries_counts_as_zero():
    qrels = {"q1": Q1_QRELS, "q2": {"d": 1}}
    run = {"q1": Q1_RUN}
    # mean over q1 and q2 (= 0)
    assert ndcg_at_k(qrels, run, 10) == pytest.approx((2.5 / IDCG_Q1) / 2)
    assert recall_at_k(qrels, run, 3) == pytest.approx(0.5)
    assert mrr_at_k(qrels, run, 10) == pytest.approx(0.5)
    assert map_at_k(qrels, run, 10) == pytest.approx((5 / 6) / 2)
    # An empty run dict for the query is the same as no entry.
    assert ndcg_at_k(qrels, {**run, "q2": {}}, 10) == ndcg_at_k(qrels, run, 10)


def test_queries_without_relevant_docs_and_unjudged_run_queries_are_ignored():
    base = retrieval_scores({"q1": Q1_QRELS}, {"q1": Q1_RUN})
    qrels = {"q1": Q1_QRELS, "q3": {"e": 0, "f": -1}, "q4": {}}
    run = {"q1": Q1_RUN, "q3": {"e": 1.0}, "q_not_in_qrels": {"a": 1.0}}
    assert retrieval_scores(qrels, run) == base


def test_negative_relevance_is_not_relevant():
    # d at rank 1 has rel -1: no gain, not a hit. r (rel 1) at rank 2.
    qrels, run = {"q": {"d": -1, "r": 1}}, {"q": {"d": 0.9, "r": 0.5}}
    assert mrr_at_k(qrels, run) == pytest.approx(0.5)
    assert ndcg_at_k(qrels, run) == pytest.approx(1 / math.log2(3))  # DCG 1/log2(3), IDCG 1


def test_retrieval_scores_keys_and_values():
    qrels, run = {"q1": Q1_QRELS}, {"q1": Q1_RUN}
    scores = retrieval_scores(qrels, run)
    assert list(scores) == ["ndcg@10", "recall@100", "mrr@10", "map@100"]
    assert scores == pytest.approx(
        {"ndcg@10": 2.5 / IDCG_Q1, "recall@100": 1.0, "mrr@10": 1.0, "map@100": 5 / 6})
    cut = retrieval_scores(qrels, run, ndcg_k=1, recall_k=2, mrr_k=3, map_k=2)
    assert cut == pytest.approx({"ndcg@1": 1.0, "recall@2": 0.5, "mrr@3": 1.0, "map@2": 0.5})


def test_retrieval_errors():
    with pytest.raises(ValueError, match="no query with a relevant"):
        retrieval_scores({"q": {"a": 0}}, {"q": {"a": 1.0}})
    with pytest.raises(ValueError, match="positive integer"):
        ndcg_at_k({"q1": Q1_QRELS}, {"q1": Q1_RUN}, 0)


def test_read_qrels(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\n\nq2\td1\t0\n",
                    encoding="utf-8")
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 2}, "q2": {"d1": 0}}
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":2: expected 3"):
        read_qrels(path)
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not an integer"):
        read_qrels(str(path))


def test_markdown_table():
    table = markdown_table({
        "bm25": {"ndcg@10": 0.5, "recall@100": 0.123456},
        "e5|small": {"ndcg@10": 2 / 3},
    })
    assert table == (
        "|  | ndcg@10 | recall@100 |\n"
        "|---|---:|---:|\n"
        "| bm25 | 0.5000 | 0.1235 |\n"
        "| e5\\|small | 0.6667 |  |\n"
    )
    assert markdown_table({"m": {"x": 1.0}}, label_header="model").startswith("| model | x |")
    with pytest.raises(ValueError):
        markdown_table({})


# --- Correlation ----------------------------------------------------------------------------


def test_pearson_hand_computed():
    # x = 1,2,3 (mean 2, dx = -1,0,1); y = 2,4,7 (mean 13/3, dy = -7/3,-1/3,8/3)
    # sum dx*dy = 7/3 + 8/3 = 5; sum dx^2 = 2; sum dy^2 = 114/9
    # r = 5 / sqrt(2 * 114/9) = 0.993399
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert pearson(np.array([1.0, 2.0, 3.0]), [3, 2, 1]) == pytest.approx(-1.0)


def test_average_ranks_ties():
    # sorted: 10 (rank 1), three 20s (ranks 2,3,4 -> 3), 30 (rank 5)
    assert _average_ranks(np.array([10.0, 20, 20, 30, 20])).tolist() == [1, 3, 3, 5, 3]


def test_spearman_hand_computed_with_ties():
    # ranks a = 1, 2.5, 2.5, 4; ranks b = 1, 3, 2, 4 (both mean 2.5)
    # da = -1.5,0,0,1.5; db = -1.5,.5,-.5,1.5: sum da*db = 4.5, sum da^2 = 4.5, sum db^2 = 5
    # r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9) = 0.948683
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # Monotone but not linear: rank correlation is exactly 1, Pearson is not.
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9


@pytest.mark.parametrize("fn", [pearson, spearman])
def test_correlation_errors(fn):
    with pytest.raises(ValueError, match="at least 2 pairs"):
        fn([1.0], [2.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        fn([], [])
    with pytest.raises(ValueError, match="input a is constant"):
        fn([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="input b is constant"):
        fn([1.0, 2.0, 3.0], [5, 5, 5])
    with pytest.raises(ValueError, match="differ in length"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        fn([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])


def test_correlation_matches_scipy_on_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(2, 200))
        a = rng.normal(size=n)
        b = 0.5 * a + rng.normal(size=n)
        if trial % 2:  # coarse values: many ties
            a, b = np.round(a * 2) / 2, np.round(b)
        if (a == a[0]).all() or (b == b[0]).all():
            continue
        assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
