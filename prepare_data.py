#!/usr/bin/env python
"""Prepare a dataset (the phantom when data.manifest is empty).
Same as ``python -m ecgflowcmr.prepare_data``; see ``ecgflowcmr/prepare_data.py``."""
import sys

from ecgflowcmr.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
