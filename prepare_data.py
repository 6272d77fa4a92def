#!/usr/bin/env python
"""Prepare a dataset: ``python prepare_data.py --config configs/demo.yaml [data.workers=4 ...]``.

Turns the manifest (``data.manifest``; default: the phantom, generated when missing) into the
prepared dataset under ``data.root`` (default ``runs/<exp>/data``). Re-running resumes; a complete
dataset is a no-op. See ``ecgflowcmr/data/prepare.py``.
"""
from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    from ecgflowcmr.cli import parse_stage_args
    from ecgflowcmr.config import save_config
    from ecgflowcmr.data.prepare import PrepareError, prepare

    cfg, _ = parse_stage_args(__doc__.splitlines()[0], argv=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        root = prepare(cfg)
    except (PrepareError, FileNotFoundError) as err:
        logging.getLogger("ecgflowcmr.prepare").error("%s", err)
        return 1
    save_config(cfg, root / "config.yaml")
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
