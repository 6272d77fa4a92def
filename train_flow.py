#!/usr/bin/env python
"""Stage 3: train the flow (DiT flow matching from the template anchor). Same as ``python -m ecgflowcmr.train_flow``; see ``ecgflowcmr/train_flow.py``."""
from ecgflowcmr.train_flow import main
from ecgflowcmr.utils.dist import exit_process  # ends a torchrun worker safely

if __name__ == "__main__":
    exit_process(main())
