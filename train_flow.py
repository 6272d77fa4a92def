#!/usr/bin/env python
"""Stage 3: train the flow (DiT flow matching from the template anchor).
Same as ``python -m ecgflowcmr.train_flow``; see ``ecgflowcmr/train_flow.py``."""
from ecgflowcmr.train_flow import entry, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    entry()
