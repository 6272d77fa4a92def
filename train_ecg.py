#!/usr/bin/env python
"""Stage 1: train the Phase-Aware Masked Autoencoder.
Same as ``python -m ecgflowcmr.train_ecg``; see ``ecgflowcmr/train_ecg.py``."""
from ecgflowcmr.train_ecg import entry, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    entry()
