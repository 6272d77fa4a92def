"""Shared command-line handling: ``script.py --config configs/x.yaml [section.key=value ...]``."""
from __future__ import annotations

import argparse

from .config import Config, ConfigError, load_config


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. flow.lr=2e-4 device=cpu")
    return parser


def parse_stage_args(description: str, parser: argparse.ArgumentParser | None = None,
                     argv=None) -> tuple[Config, argparse.Namespace]:
    """Parse ``--config`` plus dotted overrides; config errors exit with the message, no traceback."""
    parser = parser or stage_parser(description)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")
    return cfg, args
