"""Stage 2: train the anisotropic 3D-VAE, then cache the latents of every split and the template.

    python train_disentangle_vae3d.py --config configs/demo.yaml [vae.epochs=5 ...] [--resume | --fresh]
    python train_disentangle_vae3d.py --config configs/demo.yaml --extract-only
    torchrun --nproc_per_node 2 train_disentangle_vae3d.py --config configs/ukb.yaml

Writes runs/<exp>/vae/{best.pt,last.pt,config.yaml,train.log,log.jsonl,figures/} and
runs/<exp>/latents/{train,val,test}.npy, {split}_index.csv, template.pt. Re-running continues an
unfinished run (or skips finished training and finished latent files); --fresh starts training over.
"""
from ecgflowcmr.cli import parse_stage_args, stage_parser
from ecgflowcmr.utils.dist import exit_process  # ends a torchrun worker safely


def main(argv=None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from runs/<exp>/vae/last.pt (must exist)")
    group.add_argument("--fresh", action="store_true", help="ignore an existing last.pt and start over")
    group.add_argument("--extract-only", action="store_true",
                       help="only cache latents + template from runs/<exp>/vae/best.pt")
    cfg, args = parse_stage_args("stage 2 (3D-VAE)", parser, argv)
    from ecgflowcmr.config import ConfigError
    from ecgflowcmr.vae.losses import MissingWeightsError
    from ecgflowcmr.vae.trainer import extract_latents, train

    try:
        if args.extract_only:
            extract_latents(cfg)
        else:
            train(cfg, resume=args.resume, fresh=args.fresh)
    except (FileNotFoundError, ConfigError, MissingWeightsError) as err:
        parser.exit(1, f"train_disentangle_vae3d.py: error: {err}\n")


def entry() -> None:
    """Console-script entry: ends a torchrun worker safely."""
    exit_process(main() or 0)


if __name__ == "__main__":
    entry()
