"""Stage 4: generate cine CMR from ECGs alone with a trained flow checkpoint.

    python infer_flow.py --config configs/demo.yaml [--checkpoint runs/demo/flow/best.pt]
        [--ecg FILE | DIR | MANIFEST.csv | split:test] [--num-samples K] [--shard i/n] [--out DIR]
        [infer.steps=4 infer.guidance=2 device=cpu ...]

The flow checkpoint embeds the ECG encoder, VAE and template it was trained with, so nothing else
is needed (no CMR anywhere). Writes <out>/<subject>[_k].nii.gz + .npy, <out>/previews/<subject>.gif
and <out>/index.csv (default <out> = runs/<exp>/samples); re-running skips finished subjects.
See ecgflowcmr/flow/infer.py.
"""
from __future__ import annotations

import sys

from ecgflowcmr.cli import parse_stage_args, stage_parser


def main(argv=None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="flow checkpoint (default: infer.checkpoint or runs/<exp>/flow/best.pt)")
    parser.add_argument("--ecg", default="split:test",
                        help="an ECG file, a folder of them, a manifest CSV (ecg_path column) or split:NAME "
                             "(default split:test of the prepared dataset)")
    parser.add_argument("--num-samples", type=int, help="variations per ECG (default infer.num_samples)")
    parser.add_argument("--shard", help="i/n: this process takes every n-th subject starting at i (0-based)")
    parser.add_argument("--out", help="output folder (default: infer.out_dir or runs/<exp>/samples)")
    cfg, args = parse_stage_args(__doc__, parser, argv)
    from ecgflowcmr.flow import infer

    try:
        settings = infer.settings_from(cfg, args.checkpoint, args.out, args.num_samples, args.shard)
        report = infer.run(cfg, args.ecg, settings)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(infer.summary_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
