"""Stage 1: train the Phase-Aware Masked Autoencoder on the prepared dataset.

    python train_ecg.py --config configs/demo.yaml [ecg.epochs=5 ...] [--resume | --fresh]
    torchrun --nproc_per_node 2 train_ecg.py --config configs/ukb.yaml

Writes runs/<exp>/ecg/{best.pt,last.pt,config.yaml,train.log,log.jsonl,figures/}. Re-running
continues an unfinished run (or does nothing if it is finished); --fresh starts over.
"""
from ecgflowcmr.cli import parse_stage_args, stage_parser
from ecgflowcmr.utils.dist import exit_process  # ends a torchrun worker safely


def main(argv=None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from runs/<exp>/ecg/last.pt (must exist)")
    group.add_argument("--fresh", action="store_true", help="ignore an existing last.pt and start over")
    cfg, args = parse_stage_args("stage 1 (PA-MAE)", parser, argv)
    from ecgflowcmr.config import ConfigError
    from ecgflowcmr.ecg.train import train

    try:
        train(cfg, resume=args.resume, fresh=args.fresh)
    except (FileNotFoundError, ConfigError) as err:
        parser.exit(1, f"train_ecg.py: error: {err}\n")


def entry() -> None:
    """Console-script entry: ends a torchrun worker safely."""
    exit_process(main() or 0)


if __name__ == "__main__":
    entry()
