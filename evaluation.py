#!/usr/bin/env python
"""Evaluate generated cines against real ones.
Same as ``python -m ecgflowcmr.evaluation``; see ``ecgflowcmr/evaluation.py``."""
import sys

from ecgflowcmr.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
