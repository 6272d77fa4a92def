"""Prepare a dataset: ``python -m ecgflowcmr.prepare_data --config configs/demo.yaml [data.workers=4 ...]``
(or ``python prepare_data.py ...``).

Turns the manifest (``data.manifest``; with ``data.ukb_bulk``, the one written from a folder of UK
Biobank bulk files; when both are empty, the phantom's, generated when missing) into the prepared
dataset under ``data.root`` (default ``runs/<exp>/data``). Re-running resumes; a complete dataset is
a no-op. See ``ecgflowcmr/data/prepare.py`` and, for UK Biobank, ``ecgflowcmr/data/ukb_bulk.py``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def prepare_dataset(cfg, max_records: int | None = None, progress: bool = True) -> Path:
    """The stage: ``data.manifest``; or the manifest of a UK Biobank bulk folder (``data.ukb_bulk``,
    then ``<data root>/ukb_qc.csv`` once complete); or the phantom's. Then ``prepare``."""
    from ecgflowcmr.data.prepare import prepare

    if cfg.data.manifest:
        return prepare(cfg, cfg.manifest_path, max_records=max_records, progress=progress)
    if cfg.data.ukb_bulk:
        import json

        from ecgflowcmr.data.ukb_bulk import build_manifest, write_qc_report

        manifest, facts = build_manifest(cfg, progress=progress)
        root = prepare(cfg, manifest, max_records=max_records, progress=progress, source_meta=facts)
        meta = root / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("complete"):
            write_qc_report(cfg, root)
        return root
    from ecgflowcmr.phantom.source import ensure_manifest

    manifest, version = ensure_manifest(cfg)
    return prepare(cfg, manifest, max_records=max_records, progress=progress,
                   source_meta={"phantom_version": version})


def main(argv=None) -> int:
    from ecgflowcmr.cli import parse_stage_args
    from ecgflowcmr.config import save_config
    from ecgflowcmr.data.prepare import PrepareError
    from ecgflowcmr.data.ukb_bulk import BulkError

    cfg, _ = parse_stage_args(__doc__.splitlines()[0], argv=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        root = prepare_dataset(cfg)
    except (PrepareError, BulkError, FileNotFoundError) as err:
        logging.getLogger("ecgflowcmr.prepare").error("%s", err)
        return 1
    save_config(cfg, root / "config.yaml")
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
