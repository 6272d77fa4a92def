"""The paired ECG-cine phantom: a measuring instrument with known answers, written in real file formats.

It sits apart from the readers: data preparation sees only the manifest and the files it writes,
exactly as it would see a hospital's export.

- ``v1.py``      version 1 (the ECG's class decides the heart; kept reproducible as history)
- ``v2.py``      version 2, UK Biobank-like (class prevalence, ECG-heart coupling with scatter)
- ``build.py``   subjects, manifest and ECG-only pool on disk; ``python -m ecgflowcmr.phantom``
- ``source.py``  the manifest a config asks for, generated when missing
- ``figure.py``  one subject's figure (``python -m ecgflowcmr.phantom.figure``)
"""
from .build import POOL_DIR, POOL_START, generate, generate_ecg_only, generate_subject, write_manifest

__all__ = ["POOL_DIR", "POOL_START", "generate", "generate_ecg_only", "generate_subject", "write_manifest"]
