#!/usr/bin/env python
"""Stage 1: train the Phase-Aware Masked Autoencoder. Same as ``python -m ecgflowcmr.train_ecg``; see ``ecgflowcmr/train_ecg.py``."""
from ecgflowcmr.train_ecg import main
from ecgflowcmr.utils.dist import exit_process  # ends a torchrun worker safely

if __name__ == "__main__":
    exit_process(main() or 0)
