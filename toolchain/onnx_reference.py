"""The ANN itself, run by onnxruntime on the original ONNX file: the accuracy to match."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from toolchain.errors import ToolchainError, option
from toolchain.passes.frontend.layout import channels_last_input


class OnnxReference:
    def __init__(self, path: str | Path):
        import onnxruntime as ort

        from toolchain.fileio import check_external_data

        check_external_data(path)  # onnxruntime would follow any path the file names
        ort.set_default_logger_severity(3)  # its warnings are raw C++ lines on stderr

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # The ANN runs beside the SNN simulation: no busy-waiting threads competing with it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            options.intra_op_num_threads = int(os.environ["OMP_NUM_THREADS"])
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ToolchainError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.input = self.session.get_inputs()[0]
        # A channels-last model gets the (N, C, H, W) images every reader here produces as (N, H, W, C).
        model = onnx.load(str(path), load_external_data=False)
        self.channels_last = channels_last_input(model.graph, self.input.name) is not None
        batch_dim = self.input.shape[0] if self.input.shape else None
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        if self.channels_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        elif len(self.input.shape) == 3 and x.ndim == 4 and x.shape[1] == 1:  # an (N, H, W) model: no channel axis
            x = x[:, 0]
        if self.fixed_batch in (None, len(x)):
            return self.session.run(None, {self.input.name: x})[0]
        size = self.fixed_batch
        if len(x) % size:
            raise ToolchainError(f"the ONNX model takes batches of exactly {size}; use {option('batch_size', size)}")
        return np.concatenate([self.session.run(None, {self.input.name: x[i : i + size]})[0] for i in range(0, len(x), size)])
