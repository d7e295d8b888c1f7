"""The passes: functions from one core structure to the next.

- `frontend`: ONNX file -> ANN `Graph`.
- `convert`: the max-pool policy on the ANN; ANN + thresholds -> SNN `Graph`.
- `calibrate`: thresholds and initial potentials from the ANN and calibration data.
- `quantize`: SNN `Graph` -> `FixedGraph`.

Passes import the core and each other, never a backend (`targets`) or a driver.
"""
