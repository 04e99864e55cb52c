"""Evaluate retrieval on a BEIR-layout dataset through the pipeline: nDCG@10, Recall@100,
MRR@10, MAP@100.

    spark-submit jobs/evaluate_retrieval.py --dataset ../shared/data/scifact --split test
    spark-submit jobs/evaluate_retrieval.py --dataset DIR --config conf/qwen3-embedding-4b.yaml \\
        --model /models/Qwen3-Embedding-4B --compare-sentence-transformers

The corpus is embedded (title + " " + text, truncated at the model's max length as MTEB does,
unless --chunking window) by an incremental run into a Delta table, so a second evaluation of the
same model re-embeds nothing. Prints a Markdown table; the last stdout line is a JSON object with
`ndcg@10`, `recall@100`, `mrr@10` and `map@100`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import job_entry
from pipeline.config import CHUNK_MODES, add_profile_arguments, load_settings
from pipeline.evaluate import evaluate_retrieval
from pipeline.metrics import markdown_table
from pipeline.spark.session import get_spark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True,
                        help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    parser.add_argument("--split", default="test")
    parser.add_argument("--vectors", help="the corpus vectors table (default: data/eval/...)")
    parser.add_argument("--chunking", choices=CHUNK_MODES, default="truncate",
                        help="truncate at max length as MTEB does (default), or window chunks "
                             "ranked by their best chunk")
    parser.add_argument("--compare-sentence-transformers", action="store_true",
                        help="also score plain sentence-transformers encode + NumPy search")
    parser.add_argument("--json", metavar="PATH", help="write the report here too")
    add_profile_arguments(parser, "sets model.name")
    return parser.parse_args(argv)


@job_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = load_settings(args.config, args.overrides, {
        "model.name": args.model, "chunking.mode": args.chunking}, require_io=False)
    spark = get_spark(settings.spark)
    report = evaluate_retrieval(spark, settings, args.dataset, args.split, args.vectors,
                                compare_reference=args.compare_sentence_transformers)
    rows = {"pipeline (Spark -> Delta -> exact search)": report.scores}
    if report.reference is not None:
        rows["sentence-transformers + NumPy"] = report.reference
    print(f"{report.dataset} ({report.split}, {report.queries} queries), {report.model_id}")
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    return {**report.scores, "report": report.to_dict()}


if __name__ == "__main__":
    sys.exit(main())
