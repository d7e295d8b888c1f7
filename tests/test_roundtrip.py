"""torch model -> exporters -> ONNX -> toolchain IR -> SNN simulation reproduces the torch model."""

from __future__ import annotations

import numpy as np
import torch

from exporters.onnx_export import export_onnx
from models.train import load_checkpoint
from targets.torch.simulator import TorchTarget as make_target
from tests.conftest import EMBEDDED_MNIST, ROOT
from toolchain.build import BuildOptions, build_snn
from toolchain.data import load_dataset

CHECKPOINT = ROOT / "models" / "mnist_cnn.pt"


def test_exported_snn_reproduces_the_torch_models_predictions(tmp_path):
    model, config = load_checkpoint(CHECKPOINT)
    pre = config["preprocess"]
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, (1, 28, 28), pre, activation=config["act"])

    data = load_dataset(EMBEDDED_MNIST, "test").subset(500)
    snn = build_snn(BuildOptions(model=onnx_path, device="cpu")).snn
    x = snn.preprocess.apply(data.x)
    with torch.inference_mode():
        torch_classes = model(torch.as_tensor(x)).argmax(-1).numpy()

    target = make_target(device="cpu")
    target.prepare(snn)
    steps = 256
    snn_classes = np.concatenate([target.run(x[i : i + 250], steps).readout[-1].argmax(-1) for i in range(0, len(x), 250)])
    agreement = float((snn_classes == torch_classes).mean())
    assert agreement >= 0.995, agreement
    # and the SNN is a classifier, not a copy of a constant
    assert len(np.unique(snn_classes)) == 10
