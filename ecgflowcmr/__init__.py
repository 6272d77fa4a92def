"""ECGFlowCMR: 12-lead ECG -> cine cardiac MRI (PA-MAE + 3D-VAE + template-anchored flow matching)."""
__version__ = "0.1.0"
