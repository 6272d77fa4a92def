"""Long annotated WFDB records (MIT-BIH style) -> 10 s, 500 Hz windows in the 12-lead layout, with
the reference R-peaks of each window: real ECGs with known answers for the R-peak labels and for
stage 1.

``annotated_windows(record)``: the record is read with the project's reader
(``ecg_io.read_ecg_leads``: physical units to mV), resampled to 500 Hz (``ecg_io.resample_ecg``)
and cut into consecutive, non-overlapping 10 s windows (a shorter tail is dropped). Leads go to
the slot of their name; the modified limb leads of ambulatory records (MLI, MLII, MLIII) to I, II,
III, since they stand in for them. Leads the record lacks are zero: missing (stage 1's
augmentation trains for missing leads; ``detect_rpeaks`` skips them as flat). The reference
R-peaks are the beat annotations (``BEAT_SYMBOLS``; rhythm and signal-quality marks are not beats)
at the new rate, rounded to the nearest sample.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .ecg_io import LEADS, TARGET_FS, TARGET_LENGTH, ECGReadError, canonical_lead, read_ecg_leads, resample_ecg

# MIT-BIH / WFDB beat annotation codes (https://archive.physionet.org/physiobank/annotations.shtml)
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")
AMBULATORY_LEADS = {"MLI": "I", "MLII": "II", "MLIII": "III"}


def annotated_windows(record: str | Path, annotator: str = "atr",
                      seconds: float = TARGET_LENGTH / TARGET_FS) -> tuple[np.ndarray, list[np.ndarray]]:
    """WFDB ``record`` (path without extension, or its ``.hea``) -> float32 ``(N, 12, 5000)`` mV
    windows and, per window, the int64 reference R-peak indices ``(K,)`` at 500 Hz.

    Raises ``ECGReadError`` when the record or its annotation file is missing or unreadable, has
    no lead of the 12-lead layout, or is shorter than one window.
    """
    import wfdb

    record = Path(record)
    record = record.with_suffix("") if record.suffix.lower() in (".hea", ".dat") else record
    leads, fs = read_ecg_leads(Path(str(record) + ".hea"))
    slots = {}
    for name, signal in leads.items():
        slot = AMBULATORY_LEADS.get(str(name).strip().upper()) or canonical_lead(name)
        if slot is not None and slot not in slots:
            slots[slot] = signal
    if not slots:
        raise ECGReadError(f"{record}: no lead maps to the 12-lead layout (leads {list(leads)})")
    try:
        ann = wfdb.rdann(str(record), annotator)
    except Exception as err:  # wfdb raises many types for a missing or corrupt annotation file
        raise ECGReadError(f"{record}: annotations '{record}.{annotator}' unreadable "
                           f"({type(err).__name__}: {err})") from None
    length = len(next(iter(slots.values())))
    signals = np.zeros((len(LEADS), length), dtype=np.float64)
    for slot, signal in slots.items():
        signals[LEADS.index(slot)] = signal
    signals = resample_ecg(signals, fs)
    beats = np.asarray([s for s, sym in zip(ann.sample, ann.symbol) if sym in BEAT_SYMBOLS], dtype=np.float64)
    beats = np.round(beats * TARGET_FS / fs).astype(np.int64)
    width = int(round(seconds * TARGET_FS))
    count = signals.shape[1] // width
    if count == 0:
        raise ECGReadError(f"{record}: {length / fs:.1f} s is shorter than one {seconds:g} s window")
    windows = signals[:, :count * width].reshape(len(LEADS), count, width).transpose(1, 0, 2)
    peaks = [beats[(beats >= k * width) & (beats < (k + 1) * width)] - k * width for k in range(count)]
    return np.ascontiguousarray(windows, dtype=np.float32), peaks
