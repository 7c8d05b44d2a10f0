"""The dataset registry's command line (data.py's DATASETS).

    python -m support.datasets list                       # the registry
    python -m support.datasets bm25 --dataset scifact     # build/cache the BM25 index, report times
"""

from __future__ import annotations

import argparse
import sys

from data import DATASETS, DataError, load_dataset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the datasets")
    b = sub.add_parser("bm25", help="run (and cache) BM25 for a dataset, report times")
    b.add_argument("--dataset", default="scifact", help="dataset name")
    b.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA or ./data)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            for name in DATASETS:
                print(name)
        elif args.cmd == "bm25":
            ds = load_dataset(args.dataset, args.data_dir)
            print(f"{ds.name}: {len(ds.rankings)} queries, {sum(len(r.candidates) for r in ds.rankings)} candidates")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
