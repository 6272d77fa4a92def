"""Stage 3: train the Anatomy-Motion Disentangled Flow (DiT flow matching from the template anchor).

    python train_flow.py --config configs/demo.yaml [--resume | --fresh] [flow.epochs=5 ...]
    torchrun --nproc_per_node 4 train_flow.py --config configs/ukb.yaml

Re-running continues an unfinished run of the same configuration (or does nothing when it is
complete); --fresh starts over. Needs runs/<exp>/ecg/best.pt (train_ecg.py), runs/<exp>/vae/best.pt and
runs/<exp>/latents/ (train_disentangle_vae3d.py). Writes runs/<exp>/flow/{best,last}.pt; see ecgflowcmr/flow/trainer.py.
"""
from __future__ import annotations

import os
import sys

from ecgflowcmr.cli import parse_stage_args, stage_parser
from ecgflowcmr.utils.dist import exit_process  # ends a torchrun worker safely


def main(argv=None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from runs/<exp>/flow/last.pt (must exist)")
    group.add_argument("--fresh", action="store_true", help="start over even if runs/<exp>/flow/last.pt exists")
    cfg, args = parse_stage_args(__doc__, parser, argv)
    from ecgflowcmr.config import ConfigError
    from ecgflowcmr.flow.trainer import train

    try:
        summary = train(cfg, resume=args.resume, fresh=args.fresh)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = summary["best_val_loss"]
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"flow: {summary['steps']} steps in {summary['seconds']:.0f} s; best val loss "
              f"{best if best is None else f'{best:.5f}'} -> {summary['best']}")
    return 0


def entry() -> None:
    """Console-script entry: ends a torchrun worker safely."""
    exit_process(main())


if __name__ == "__main__":
    entry()
