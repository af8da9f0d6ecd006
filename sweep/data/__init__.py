"""The data a grid point reads: vendored evaluation and calibration files, lm-eval tasks over them, calibration samples."""
