#!/usr/bin/env python
"""Stage 4: generate cines from ECGs alone.
Same as ``python -m ecgflowcmr.infer_flow``; see ``ecgflowcmr/infer_flow.py``."""
import sys

from ecgflowcmr.infer_flow import main

if __name__ == "__main__":
    sys.exit(main())
