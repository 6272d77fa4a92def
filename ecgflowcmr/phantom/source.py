"""The phantom as a data source: the manifest a config asks for (``data.manifest: ""``), generated
when missing or of another size, and the phantom version it was written by."""
from __future__ import annotations

import logging
from pathlib import Path

from ..data.prepare import PrepareError, read_manifest
from .build import generate

log = logging.getLogger("ecgflowcmr.prepare")


def manifest_phantom_version(table) -> int:
    """The phantom version that wrote a manifest: its ``phantom_version`` column; version 1 wrote
    none, so a phantom manifest without the column is version 1."""
    if "phantom_version" not in table.columns:
        return 1
    values = set(table["phantom_version"].dropna().astype(int))
    if len(values) != 1:
        raise PrepareError(f"manifest column phantom_version holds {sorted(values)}: one phantom version per manifest")
    return values.pop()


def check_phantom_version(table, manifest_path: Path, cfg) -> int:
    """The manifest's phantom version; a version other than ``data.phantom_version`` is an error."""
    version = manifest_phantom_version(table)
    if version != cfg.data.phantom_version:
        raise PrepareError(
            f"manifest '{manifest_path}' was written by phantom version {version}, but data.phantom_version is "
            f"{cfg.data.phantom_version}. Set data.phantom_version={version} to use it, or point data.phantom_dir "
            f"(and data.root) at another folder to generate and prepare version {cfg.data.phantom_version}.")
    return version


def ensure_manifest(cfg) -> tuple[Path, int]:
    """``cfg.manifest_path`` of the phantom (``<phantom_dir>/manifest.csv``) with ``data.phantom_n``
    subjects of ``data.phantom_version``, generating (or extending) it first; returns it and its
    version. A manifest of another version is refused before anything is regenerated."""
    manifest = cfg.manifest_path
    if manifest.is_file():
        table = read_manifest(manifest)
        check_phantom_version(table, manifest, cfg)
        if len(table) == cfg.data.phantom_n:
            return manifest, cfg.data.phantom_version
        log.info("phantom manifest '%s' has %d subjects, data.phantom_n is %d: updating the phantom",
                 manifest, len(table), cfg.data.phantom_n)
    else:
        log.info("phantom manifest '%s' missing: generating %d phantom subjects in '%s'",
                 manifest, cfg.data.phantom_n, cfg.phantom_path)
    generate(cfg.phantom_path, cfg.data.phantom_n, cfg.data.phantom_seed, workers=cfg.data.workers,
             version=cfg.data.phantom_version, prevalence=cfg.data.phantom_prevalence)
    if not manifest.is_file():
        raise PrepareError(f"phantom generation did not write '{manifest}'")
    return manifest, cfg.data.phantom_version
