"""Synthetic pretraining: MAE on real + synthetic cines at mixing ratios, k-fold fine-tuning on
labelled real subjects (classification ACC/AUC, phenotype MAE/R^2), one table.

    python downstream.py --config configs/downstream_phantom.yaml [--only real,oracle_100] [--jobs 2]
        [downstream.ratios=[0,100] downstream.sources=[oracle] ...]

Needs the prepared dataset (prepare_data.py), an ECG-only pool (downstream.pool, or the phantom's
with downstream.pool_n > 0) and, for the generator / nearest / template sources, a flow checkpoint
(train_flow.py). Writes runs/<exp>/downstream/: pretraining checkpoints per row (done rows are
skipped), per-fold scores, downstream.{md,json} and downstream.png. See docs/downstream.md and
ecgflowcmr/downstream/.
"""
from __future__ import annotations

import sys

from ecgflowcmr.cli import parse_stage_args, stage_parser


def main(argv=None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated rows to (re)run, e.g. scratch,real,oracle_100; the table "
                                       "keeps the other rows it already has")
    parser.add_argument("--jobs", type=int, default=1,
                        help="pretrain this many rows side by side, each in its own process with cores / jobs "
                             "threads (on a few CPU cores, processes scale better than threads)")
    cfg, args = parse_stage_args(__doc__, parser, argv)
    from ecgflowcmr.downstream.data import DownstreamDataError
    from ecgflowcmr.downstream.run import run, run_parallel

    only = [r.strip() for r in args.only.split(",") if r.strip()] if args.only else None
    try:
        if args.jobs > 1:
            run_parallel(cfg, args.config, args.overrides, args.jobs, only)
        run(cfg, only=only)
    except (FileNotFoundError, DownstreamDataError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
