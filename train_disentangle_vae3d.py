#!/usr/bin/env python
"""Stage 2: train the 3D-VAE, then cache latents and the template. Same as ``python -m ecgflowcmr.train_disentangle_vae3d``; see ``ecgflowcmr/train_disentangle_vae3d.py``."""
from ecgflowcmr.train_disentangle_vae3d import main
from ecgflowcmr.utils.dist import exit_process  # ends a torchrun worker safely

if __name__ == "__main__":
    exit_process(main() or 0)
