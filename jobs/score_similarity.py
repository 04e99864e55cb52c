"""Score text pairs by the cosine of their vectors; with a gold column, report correlations.

    spark-submit jobs/score_similarity.py --input pairs.jsonl --text-a-col a --text-b-col b \\
        --output ./data/pair_scores
    spark-submit jobs/score_similarity.py --input ../shared/data/stsbenchmark/sts-test.csv \\
        --set 'input.csv_options={sep: "\\t", header: "false", quote: ""}' \\
        --text-a-col _c5 --text-b-col _c6 --gold-col _c4

The input is any format the embed job reads. Pairs with an empty text (or a gold value that is
not a number) are kept with a null score and their reason, and counted. The last stdout line is
a JSON report, with `pearson` and `spearman` when --gold-col is given."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import job_entry
from pipeline.config import add_profile_arguments, load_settings
from pipeline.similarity import score_pairs
from pipeline.spark.session import get_spark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the pairs: a file, folder or table")
    parser.add_argument("--format", help="sets input.format (default: from the path)")
    parser.add_argument("--text-a-col", required=True)
    parser.add_argument("--text-b-col", required=True)
    parser.add_argument("--gold-col", help="a human score column: report Pearson and Spearman")
    parser.add_argument("--output", help="the scored pairs: a .jsonl file or a Delta table")
    parser.add_argument("--kind", choices=("document", "query"), default="document",
                        help="which prompt of the model both texts get (default: document)")
    parser.add_argument("--compare-sentence-transformers", action="store_true",
                        help="with --gold-col: also correlate plain sentence-transformers cosines")
    add_profile_arguments(parser, "sets model.name")
    return parser.parse_args(argv)


@job_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = load_settings(args.config, args.overrides, {
        "input.path": args.input, "input.format": args.format, "model.name": args.model},
        require_io=False)
    spark = get_spark(settings.spark)
    scored, report = score_pairs(spark, settings, args.text_a_col, args.text_b_col,
                                 args.gold_col, args.kind, args.output)
    reference = (compare_reference(scored, settings, args)
                 if args.compare_sentence_transformers and args.gold_col else None)
    if report.pearson is not None:
        print(f"{report.scored} pairs: pearson {report.pearson:.4f}, "
              f"spearman {report.spearman:.4f}")
    if reference is not None:
        print(f"sentence-transformers: pearson {reference['pearson']:.4f}, "
              f"spearman {reference['spearman']:.4f}")
    return {**report.to_dict(), "reference": reference}


def compare_reference(scored, settings, args: argparse.Namespace) -> dict[str, float]:
    """The same valid pairs through plain sentence-transformers (they are small: pairs of short
    texts, not a corpus)."""
    from pipeline.evaluate import reference_similarity
    from pipeline.model.spec import resolve_model_spec

    pairs = scored.where("score IS NOT NULL").select(
        args.text_a_col, args.text_b_col, args.gold_col).toPandas()
    return reference_similarity(resolve_model_spec(settings.model),
                                pairs[args.text_a_col].astype(str).tolist(),
                                pairs[args.text_b_col].astype(str).tolist(),
                                pairs[args.gold_col].astype(float).tolist())


if __name__ == "__main__":
    sys.exit(main())
