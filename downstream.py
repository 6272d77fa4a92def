#!/usr/bin/env python
"""Synthetic pretraining and its table. Same as ``python -m ecgflowcmr.downstream``; see
``ecgflowcmr/downstream/cli.py``."""
import sys

from ecgflowcmr.downstream.cli import main

if __name__ == "__main__":
    sys.exit(main())
