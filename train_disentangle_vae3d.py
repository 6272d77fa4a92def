#!/usr/bin/env python
"""Stage 2: train the 3D-VAE, then cache latents and the template.
Same as ``python -m ecgflowcmr.train_disentangle_vae3d``; see ``ecgflowcmr/train_disentangle_vae3d.py``."""
from ecgflowcmr.train_disentangle_vae3d import entry, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    entry()
