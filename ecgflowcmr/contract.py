"""The data contract every stage shares (docs/architecture.md; the shapes below): what an ECG and a cine are.

ECG: float32 ``(NUM_LEADS, ECG_SAMPLES)`` = 10 s at 500 Hz in mV, leads in ``LEADS`` order.
Cine: float32 ``(1, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE)`` in [-1, 1], one R-R cycle from the R-peak.
Torch-free on purpose: the readers import it too.
"""
ECG_FS = 500                     # Hz
ECG_SECONDS = 10.0
ECG_SAMPLES = 5000               # ECG_FS * ECG_SECONDS
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = len(LEADS)
NUM_FRAMES = 50                  # frames per R-R cycle; frame 0 = R-peak / end-diastole
IMAGE_SIZE = 96                  # cine height = width (pixels)

assert ECG_SAMPLES == int(ECG_FS * ECG_SECONDS)
