"""The command that writes training sets to a JSONL file (data.augment: REARANK's initial state expansion;
data.augment_setwise: Rank-R1's one-relevant sets). grpo.py draws the same sets itself from --dataset; a file is for
reusing, inspecting or filtering them (--train-file).

    python -m support.augment --dataset dl21 --samples 50 --size 20 --out train.jsonl  # --seed 0 --min-ndcg 0.1
    python -m support.augment --dataset dl21 --method setwise --samples 50 --out setwise.jsonl  # Rank-R1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data import DATASETS, TEST_SETS, DataError, TrainInstance, augment, augment_setwise, load_dataset, write_instances
from support.cli import nonneg_float, nonneg_int, positive_int


# ----------------------------------------------------------------------------------------------------------------------
# command line


def check_augment_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse types cannot check alone; exits with argparse's usage error, before any data loads."""
    if args.dataset not in DATASETS:
        p.error(f"--dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    if args.dataset in TEST_SETS and not args.allow_test_set:
        p.error(f"--dataset {args.dataset} is a test set: training on it makes its evaluation meaningless; use dl21 or "
                "scifact-train (or --allow-test-set, for an experiment that knows it)")
    if args.size < 2:
        p.error(f"--size {args.size}: a candidate set needs at least 2 passages to have an order")
    if args.min_ndcg > 1:
        p.error(f"--min-ndcg {args.min_ndcg}: nDCG@10 is at most 1, so every set would be dropped")
    out = Path(args.out)
    if out.is_dir():
        p.error(f"--out {out} is a directory; give a file name, e.g. {out / 'train.jsonl'}")
    if out.exists() and not args.overwrite:
        p.error(f"--out {out} exists; give a new file name, or --overwrite to replace it")


def check_kept(instances: list[TrainInstance], out: str, name: str) -> None:
    if not instances:
        raise DataError(f"{name}: no candidate set survived the filters; nothing written to {out} "
                        "(lower --min-ndcg / --min-grade, or raise --samples)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dl21", help="dataset whose judged queries seed the sets (dl21, scifact-train)")
    p.add_argument("--method", choices=("listwise", "setwise"), default="listwise",
                   help="listwise: REARANK's sampled sets; setwise: Rank-R1's one relevant + size-1 non-relevant")
    p.add_argument("--min-grade", type=positive_int, default=2,
                   help="setwise: the grade that makes a passage the relevant one")
    p.add_argument("--samples", type=positive_int, default=50, help="candidate sets drawn per query")
    p.add_argument("--size", type=positive_int, default=20, help="passages per candidate set (>= 2)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed: the same seed writes the same file")
    p.add_argument("--min-ndcg", type=nonneg_float, default=0.1, help="drop sets whose nDCG@10 is below this (<= 1)")
    p.add_argument("--filter-on", choices=("best", "init"), default="best", help="filter on r* (best) or r_init")
    p.add_argument("--out", default="train.jsonl", help="output JSONL (an existing file is kept unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--allow-test-set", action="store_true",
                   help=f"build training sets from a test set ({', '.join(TEST_SETS)}): refused without this")
    p.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA or ./data)")
    args = p.parse_args(argv)
    check_augment_args(p, args)
    try:
        ds = load_dataset(args.dataset, args.data_dir)
        if args.method == "setwise":
            instances, st = augment_setwise(ds, args.samples, args.size, args.seed, args.min_grade)
            why = (f"{st.no_relevant} for queries with no passage of grade >= {args.min_grade}, "
                   f"{st.below} for too few non-relevant ones")
        else:
            instances, st = augment(ds, args.samples, args.size, args.seed, args.min_ndcg, args.filter_on)
            why = (f"{st.no_relevant} with no relevant passage, {st.below} with nDCG@10 ({args.filter_on}) < "
                   f"{args.min_ndcg}")
        check_kept(instances, args.out, ds.name)
        write_instances(args.out, instances)
        kind = " setwise sets" if args.method == "setwise" else ""
        print(f"{ds.name}: kept {st.kept}{kind}, dropped {st.no_relevant + st.below} ({why}); wrote {args.out}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
