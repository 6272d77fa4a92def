"""Training-loop foundation shared by every stage: devices, seeds, checkpoints, DDP, logging."""
