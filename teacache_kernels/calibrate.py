"""Calibration's public API (see `teacache_kernels.calibration`): fit, save, load, pick a threshold."""

from .calibration import (
    DEFAULT_SIGNALS,
    FORMAT,
    RUNTIME_SIGNALS,
    CalibrationResult,
    CalibrationSetup,
    PolynomialFit,
    ThresholdPoint,
    ThresholdResult,
    calibrate,
    find_threshold,
    fit_polynomial,
    load_coefficients_file,
)

__all__ = [
    "DEFAULT_SIGNALS",
    "FORMAT",
    "RUNTIME_SIGNALS",
    "CalibrationResult",
    "CalibrationSetup",
    "PolynomialFit",
    "ThresholdPoint",
    "ThresholdResult",
    "calibrate",
    "find_threshold",
    "fit_polynomial",
    "load_coefficients_file",
]
