"""Evaluation metrics: Frechet distances (FID / FVD), LPIPS, PSNR, SSIM, LV functional metrics.

Entry points: ``evaluate(real, fake, ...) -> dict`` (``ecgflowcmr.metrics.pipeline``) and
``write_outputs(result, out_dir)`` (``ecgflowcmr.metrics.report``); ``python evaluation.py`` wraps both.
Pretrained networks are only ever read from the weights folder (``ecgflowcmr.metrics.weights``).
"""
from .frechet import fd, fd_from_features, mean_cov

__all__ = ["fd", "fd_from_features", "mean_cov", "evaluate", "write_outputs"]


def __getattr__(name):  # keep ``import ecgflowcmr.metrics`` light (no torchvision / lpips)
    if name == "evaluate":
        from .pipeline import evaluate

        return evaluate
    if name == "write_outputs":
        from .report import write_outputs

        return write_outputs
    raise AttributeError(name)
