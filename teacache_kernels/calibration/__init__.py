"""Calibration for any model: fit TeaCache's rescale polynomial, then pick the threshold for a target.

    from teacache_kernels.calibrate import calibrate, find_threshold, load_coefficients_file
    result = calibrate(transformer, run, samples)          # run(sample): one full generation
    result.save("teacache.json"); result.plot("fit.png"); print(result.report())
    thr = find_threshold(transformer, run, samples, min_psnr=30, coefficients_file="teacache.json")
    thr.save_to("teacache.json")

Modules: probes (where signals are read, per family), record (hooks, CFG contexts), fit (polynomial,
R^2, correlations), result (CalibrationResult), calibrator (calibrate), threshold (find_threshold),
coefficients_file (the JSON), plot, progress, setups (CalibrationSetup, built-in models), cli.
"""

from .calibrator import calibrate
from .coefficients_file import FORMAT, load_coefficients_file
from .fit import PolynomialFit, fit_polynomial
from .probes import DEFAULT_SIGNALS, PROBES, RUNTIME_SIGNALS, FamilyProbes, Probe
from .result import CalibrationResult
from .setups import CalibrationSetup
from .threshold import ThresholdPoint, ThresholdResult, find_threshold

__all__ = [
    "DEFAULT_SIGNALS",
    "FORMAT",
    "PROBES",
    "RUNTIME_SIGNALS",
    "CalibrationResult",
    "CalibrationSetup",
    "FamilyProbes",
    "PolynomialFit",
    "Probe",
    "ThresholdPoint",
    "ThresholdResult",
    "calibrate",
    "find_threshold",
    "fit_polynomial",
    "load_coefficients_file",
]
