"""ECG readers: one call, any supported format -> float32 ``(12, 5000)`` in mV at 500 Hz.

``read_ecg(path)`` dispatches on the file:

- ``.xml``: UK Biobank resting ECG (field 20205, GE CardioSoft export). Root ``CardiologyXML``; the
  10 s rhythm strip is ``StripData`` with ``SampleRate`` (Hz), ``Resolution`` (uV per LSB) and one
  ``WaveformData lead="..."`` per lead holding comma-separated integers. The median beats under
  ``RestingECGMeasurements/MedianSamples`` are not read.
- WFDB records (PTB-XL, PhysioNet) through the ``wfdb`` package: ``rec.hea``, ``rec.mat``,
  ``rec.dat`` or ``rec`` (the header must sit beside the signal file). Physical units from the
  header (uV, mV, V) are converted to mV.
- ``.npy``: a 2-D array ``(12, L)`` or ``(L, 12)`` in lead order I II III aVR aVL aVF V1-V6, mV.
- ``.csv``: a header row of lead names (any order; an optional time/sample column and a pandas
  index column are ignored), one row per sample, mV.

``.npy`` and ``.csv`` carry no sampling rate: pass ``fs`` (default 500 Hz).

What comes out is always the same: lead order ``LEADS``, mV, resampled to 500 Hz with a polyphase
filter (``scipy.signal.resample_poly``), then cropped or padded (edge value, at the end) to exactly
10 s, but only when the record is within ``tolerance_s`` of 10 s; otherwise it is refused. No
filtering or baseline removal is applied: the signal is the recording, resampled.

Lead names are matched case-insensitively, ignoring spaces, ``_``/``-`` and a ``lead`` prefix
(``AVR``, ``avr``, ``Lead aVR`` -> aVR). When limb leads III, aVR, aVL or aVF are missing they are
derived from I and II (Einthoven: III = II - I; Goldberger: aVR = -(I + II) / 2,
aVL = I - II / 2, aVF = II - I / 2) and an ``ECGReadWarning`` says which. Missing I, II or any
precordial lead is an error.

Every refusal is an ``ECGReadError`` (a ``ValueError``) whose message names the file and the
reason: unreadable file, unsupported format, unknown / duplicate / missing leads, NaN or inf,
flat line, too short or too long, wrong dimensions, implausible sampling rate, implausible
amplitude (values that cannot be mV, e.g. microvolts or raw ADC counts).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..contract import ECG_FS as TARGET_FS
from ..contract import ECG_SAMPLES as TARGET_LENGTH
from ..contract import ECG_SECONDS as TARGET_SECONDS
from ..contract import LEADS

DEFAULT_FS = 500.0          # rate assumed for .npy / .csv when fs is not given
MIN_FS = 100.0              # below this a QRS complex is not resolved
FLAT_STD_MV = 0.005         # a lead whose standard deviation is below 5 uV is a flat line
MAX_AMPLITUDE_MV = 20.0     # 99th percentile of |lead - median| above this: not mV (uV? counts?)
LIMB_DERIVED = ("III", "aVR", "aVL", "aVF")
_IGNORED_CSV_COLUMNS = {"time", "t", "sample", "samples", "index", "timestamp", "seconds", "s", "ms"}
_CANONICAL = {name.lower(): name for name in LEADS}


class ECGReadError(ValueError):
    """An ECG file could not be turned into a (12, 5000) mV array; the message says which and why."""


class ECGReadWarning(UserWarning):
    """Something was repaired while reading (derived limb leads, units guessed)."""


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def read_ecg(path: str | Path, fs: float | None = None, tolerance_s: float = 0.5) -> np.ndarray:
    """Read a 12-lead ECG file -> float32 ``(12, 5000)``: mV, 500 Hz, 10 s, lead order ``LEADS``.

    ``fs``: sampling rate of ``.npy`` / ``.csv`` input (default 500 Hz); for XML and WFDB the file's
    own rate is used and a different ``fs`` is an error. ``tolerance_s``: records whose duration is
    within this many seconds of 10 s are cropped / padded to 10 s; others are refused.
    Raises ``ECGReadError`` naming the file and the reason.
    """
    leads, rate = read_ecg_leads(path, fs=fs)
    return standardise(leads, rate, name=str(path), tolerance_s=tolerance_s)


def read_ecg_leads(path: str | Path, fs: float | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Read a file as it is: ``({lead name as in the file: samples in mV}, sampling rate in Hz)``."""
    path = Path(path)
    kind = _format_of(path)
    if kind == "xml":
        leads, rate = _read_ukb_xml(path)
    elif kind == "wfdb":
        leads, rate = _read_wfdb(path)
    elif kind == "npy":
        leads, rate = _read_npy(path), None
    else:
        leads, rate = _read_csv(path), None
    if rate is None:
        rate = DEFAULT_FS if fs is None else float(fs)
    elif fs is not None and abs(float(fs) - rate) > 1e-6:
        raise ECGReadError(f"{path}: the file says {rate:g} Hz but fs={fs:g} was given; "
                           f"leave fs unset for {kind.upper()} files")
    return leads, float(rate)


def standardise(leads: Mapping[str, np.ndarray], fs: float, name: str = "<array>",
                tolerance_s: float = 0.5) -> np.ndarray:
    """Named leads (mV) at ``fs`` -> float32 ``(12, 5000)``: map names, derive missing limb leads,
    check values, resample to 500 Hz, crop/pad to 10 s within ``tolerance_s``."""
    if not np.isfinite(fs) or fs < MIN_FS:
        raise ECGReadError(f"{name}: implausible sampling rate {fs:g} Hz (need >= {MIN_FS:g} Hz)")
    signals = _map_leads(leads, name)
    lengths = {len(v) for v in signals.values()}
    if len(lengths) != 1:
        raise ECGReadError(f"{name}: leads have different lengths {sorted(lengths)}")
    length = lengths.pop()
    duration = length / fs
    if duration < TARGET_SECONDS - tolerance_s:
        raise ECGReadError(f"{name}: too short: {duration:.2f} s ({length} samples at {fs:g} Hz); "
                           f"need {TARGET_SECONDS:g} s (tolerance {tolerance_s:g} s)")
    if duration > TARGET_SECONDS + tolerance_s:
        raise ECGReadError(f"{name}: too long: {duration:.2f} s; need {TARGET_SECONDS:g} s "
                           f"(tolerance {tolerance_s:g} s): cut a 10 s window first")
    for lead, values in signals.items():
        if not np.all(np.isfinite(values)):
            bad = int(np.sum(~np.isfinite(values)))
            raise ECGReadError(f"{name}: lead {lead} has {bad} NaN/inf samples")
    missing = [lead for lead in LEADS if lead not in signals]
    fatal = [lead for lead in missing if lead not in LIMB_DERIVED]
    if fatal:
        raise ECGReadError(f"{name}: missing leads {', '.join(fatal)} (found: {', '.join(signals)}); "
                           f"I, II and V1-V6 are required")
    if missing:
        lead_i, lead_ii = signals["I"], signals["II"]
        derived = {"III": lead_ii - lead_i, "aVR": -(lead_i + lead_ii) / 2,
                   "aVL": lead_i - lead_ii / 2, "aVF": lead_ii - lead_i / 2}
        for lead in missing:
            signals[lead] = derived[lead]
        warnings.warn(f"{name}: derived limb leads {', '.join(missing)} from I and II "
                      f"(Einthoven / Goldberger)", ECGReadWarning, stacklevel=2)
    ecg = np.stack([signals[lead] for lead in LEADS]).astype(np.float64)
    flat = [lead for lead, std in zip(LEADS, ecg.std(axis=1)) if std < FLAT_STD_MV]
    if flat:
        raise ECGReadError(f"{name}: flat line in lead(s) {', '.join(flat)} "
                           f"(standard deviation < {FLAT_STD_MV * 1000:g} uV)")
    amplitude = float(np.percentile(np.abs(ecg - np.median(ecg, axis=1, keepdims=True)), 99, axis=1).max())
    if amplitude > MAX_AMPLITUDE_MV:
        raise ECGReadError(f"{name}: implausible amplitude ({amplitude:.4g} at the 99th percentile; "
                           f"an ECG in mV stays below {MAX_AMPLITUDE_MV:g}): are the values in uV? "
                           f"Arrays must be in mV")
    ecg = resample_ecg(ecg, fs)
    return fit_length(ecg, TARGET_LENGTH).astype(np.float32)


def resample_ecg(ecg: np.ndarray, fs: float, target_fs: float = TARGET_FS) -> np.ndarray:
    """``(..., L)`` at ``fs`` -> ``(..., round(L * target_fs / fs))`` with a polyphase filter."""
    if abs(fs - target_fs) < 1e-9:
        return ecg
    from scipy.signal import resample_poly

    ratio = Fraction(float(target_fs) / float(fs)).limit_denominator(1000)
    out = resample_poly(ecg, ratio.numerator, ratio.denominator, axis=-1, padtype="line")
    expected = int(round(ecg.shape[-1] * target_fs / fs))
    return fit_length(out, expected)


def fit_length(ecg: np.ndarray, length: int) -> np.ndarray:
    """Crop at the end or pad with the last value to exactly ``length`` samples (last axis)."""
    if ecg.shape[-1] >= length:
        return ecg[..., :length]
    pad = [(0, 0)] * (ecg.ndim - 1) + [(0, length - ecg.shape[-1])]
    return np.pad(ecg, pad, mode="edge")


def canonical_lead(name: str) -> str | None:
    """``"AVR"``, ``"avr"``, ``"Lead aVR"``, ``"v1"`` -> ``"aVR"`` / ``"V1"``; None if not a lead."""
    key = re.sub(r"[\s_\-]", "", str(name)).lower()
    if key.startswith("lead") and len(key) > 4:
        key = key[4:]
    return _CANONICAL.get(key)


def write_ecg_npy(path: str | Path, ecg: np.ndarray) -> Path:
    """Write a ``(12, L)`` mV array as ``.npy`` (the trivial writer; readable by ``read_ecg``)."""
    path = Path(path)
    np.save(path, np.asarray(ecg, dtype=np.float32))
    return path


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return "xml"
    if suffix == ".npy":
        return "npy"
    if suffix == ".csv":
        return "csv"
    if suffix in (".hea", ".mat", ".dat") or path.with_suffix(".hea").is_file() \
            or Path(str(path) + ".hea").is_file():
        return "wfdb"
    if not path.exists():
        raise ECGReadError(f"{path}: file not found")
    raise ECGReadError(f"{path}: unsupported ECG format '{suffix or '(no extension)'}' "
                       f"(use UK Biobank .xml, WFDB .hea/.mat/.dat, .npy or .csv)")


def _map_leads(leads: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """File lead names -> canonical names; unknown or duplicate names are errors."""
    mapped: dict[str, np.ndarray] = {}
    unknown = []
    for raw, values in leads.items():
        lead = canonical_lead(raw)
        if lead is None:
            unknown.append(str(raw))
            continue
        if lead in mapped:
            raise ECGReadError(f"{name}: lead {lead} appears twice")
        mapped[lead] = np.asarray(values, dtype=np.float64).reshape(-1)
    if unknown:
        raise ECGReadError(f"{name}: unknown lead name(s) {', '.join(repr(u) for u in unknown)} "
                           f"(expected {', '.join(LEADS)}, any case)")
    if not mapped:
        raise ECGReadError(f"{name}: no leads found")
    return mapped


def _read_ukb_xml(path: Path) -> tuple[dict[str, np.ndarray], float]:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        raise ECGReadError(f"{path}: file not found")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as err:
        raise ECGReadError(f"{path}: unreadable XML ({err})") from None
    if _local(root.tag) != "CardiologyXML":
        raise ECGReadError(f"{path}: unsupported XML (root <{_local(root.tag)}>, expected the UK "
                           f"Biobank CardioSoft export with root <CardiologyXML>)")
    strip = _child(root, "StripData")
    if strip is None:  # fall back to a nested StripData, but never to MedianSamples
        strip = next((el for el in root.iter() if _local(el.tag) == "StripData"), None)
    if strip is None:
        raise ECGReadError(f"{path}: no <StripData> (the 10 s rhythm strip) in the XML")
    rate = _number(strip, "SampleRate", path)
    resolution = _number(strip, "Resolution", path)
    units = (_child(strip, "Resolution").get("units") or "uVperLsb").lower()
    to_mv = resolution / 1000.0 if not units.startswith("mv") else resolution
    leads: dict[str, np.ndarray] = {}
    for wave in strip:
        if _local(wave.tag) != "WaveformData":
            continue
        lead = wave.get("lead")
        if lead is None:
            raise ECGReadError(f"{path}: <WaveformData> without a 'lead' attribute")
        text = (wave.text or "").strip().strip(",")
        try:
            values = np.array([int(v) for v in text.split(",") if v.strip()], dtype=np.float64)
        except ValueError:
            raise ECGReadError(f"{path}: lead {lead}: samples are not comma-separated integers") from None
        if lead in leads:
            raise ECGReadError(f"{path}: lead {lead} appears twice")
        leads[lead] = values * to_mv
    if not leads:
        raise ECGReadError(f"{path}: <StripData> holds no <WaveformData> leads")
    return leads, rate


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element, name: str):
    return next((el for el in element if _local(el.tag) == name), None)


def _number(element, name: str, path: Path) -> float:
    node = _child(element, name)
    try:
        value = float((node.text or "").strip())
    except (AttributeError, ValueError):
        raise ECGReadError(f"{path}: <{name}> missing or not a number in <StripData>") from None
    if not np.isfinite(value) or value <= 0:
        raise ECGReadError(f"{path}: <{name}> must be positive, got {value:g}")
    return value


def _read_wfdb(path: Path) -> tuple[dict[str, np.ndarray], float]:
    import wfdb

    record = path.with_suffix("") if path.suffix.lower() in (".hea", ".mat", ".dat") else path
    if not Path(str(record) + ".hea").is_file():
        raise ECGReadError(f"{path}: WFDB header '{record}.hea' not found")
    try:
        rec = wfdb.rdrecord(str(record))
    except Exception as err:  # wfdb raises many types for corrupt files
        raise ECGReadError(f"{path}: unreadable WFDB record ({type(err).__name__}: {err})") from None
    if rec.p_signal is None or rec.p_signal.ndim != 2:
        raise ECGReadError(f"{path}: WFDB record has no 2-D physical signal")
    scale = {"mv": 1.0, "uv": 1e-3, "μv": 1e-3, "v": 1e3}
    leads = {}
    for i, (lead, unit) in enumerate(zip(rec.sig_name, rec.units or ["mV"] * len(rec.sig_name))):
        factor = scale.get(str(unit).strip().lower())
        if factor is None:
            raise ECGReadError(f"{path}: lead {lead} has unsupported units '{unit}' (need uV, mV or V)")
        if lead in leads:
            raise ECGReadError(f"{path}: lead {lead} appears twice")
        leads[lead] = rec.p_signal[:, i] * factor
    return leads, float(rec.fs)


def _read_npy(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ECGReadError(f"{path}: file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ECGReadError(f"{path}: unreadable .npy ({type(err).__name__}: {err})") from None
    if array.ndim != 2 or 12 not in array.shape:
        raise ECGReadError(f"{path}: wrong dimensions {array.shape}: need (12, L) or (L, 12)")
    if not np.issubdtype(array.dtype, np.number):
        raise ECGReadError(f"{path}: dtype {array.dtype} is not numeric")
    if array.shape[0] != 12:
        array = array.T
    return dict(zip(LEADS, array.astype(np.float64)))


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    import pandas as pd

    if not path.is_file():
        raise ECGReadError(f"{path}: file not found")
    try:
        table = pd.read_csv(path)
    except Exception as err:
        raise ECGReadError(f"{path}: unreadable CSV ({type(err).__name__}: {err})") from None
    columns = [c for c in table.columns if str(c).strip().lower() not in _IGNORED_CSV_COLUMNS
               and not str(c).lower().startswith("unnamed:")]  # pandas' written index
    if not columns:
        raise ECGReadError(f"{path}: no lead columns (need a header row of lead names)")
    leads = {}
    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(values).any() and not table[column].isna().any():
            raise ECGReadError(f"{path}: column {column!r} has non-numeric values")
        leads[str(column)] = values
    return leads
