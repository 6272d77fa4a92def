"""Prepare a dataset: ``python -m ecgflowcmr.prepare_data --config configs/demo.yaml [data.workers=4 ...]``
(or ``python prepare_data.py ...``).

Turns the manifest (``data.manifest``; when empty, the phantom's, generated when missing) into the
prepared dataset under ``data.root`` (default ``runs/<exp>/data``). Re-running resumes; a complete
dataset is a no-op. See ``ecgflowcmr/data/prepare.py``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def prepare_dataset(cfg, max_records: int | None = None, progress: bool = True) -> Path:
    """The stage: the phantom's manifest when ``data.manifest`` is empty, then ``prepare``."""
    from ecgflowcmr.data.prepare import prepare

    if cfg.data.manifest:
        return prepare(cfg, cfg.manifest_path, max_records=max_records, progress=progress)
    from ecgflowcmr.phantom.source import ensure_manifest

    manifest, version = ensure_manifest(cfg)
    return prepare(cfg, manifest, max_records=max_records, progress=progress,
                   source_meta={"phantom_version": version})


def main(argv=None) -> int:
    from ecgflowcmr.cli import parse_stage_args
    from ecgflowcmr.config import save_config
    from ecgflowcmr.data.prepare import PrepareError

    cfg, _ = parse_stage_args(__doc__.splitlines()[0], argv=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        root = prepare_dataset(cfg)
    except (PrepareError, FileNotFoundError) as err:
        logging.getLogger("ecgflowcmr.prepare").error("%s", err)
        return 1
    save_config(cfg, root / "config.yaml")
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
