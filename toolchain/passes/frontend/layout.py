"""Channels-last models: what a Keras model through tf2onnx, or a torch model that starts
with `x.permute(0, 3, 1, 2)`, looks like in ONNX.

Such a model takes (N, H, W, C) images and transposes them to (N, C, H, W) first; before its
classifier it often transposes back to (N, H, W, C) and flattens, so that the classifier's
weights expect features in (H, W, C) order. The IR is channels-first throughout: the input
Transpose is dropped (the IR's input is (C, H, W), the same images in the layout every
data reader here produces), and the flatten in (H, W, C) order becomes a plain flatten with
the classifier's weight columns reordered to match. `OnnxReference` transposes images back
to (N, H, W, C) for onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx

TO_CHANNELS_FIRST = [0, 3, 1, 2]
TO_CHANNELS_LAST = [0, 2, 3, 1]


def transpose_perm(node: onnx.NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(onnx.helper.get_attribute_value(attribute))
    return None


def channels_last_input(graph: onnx.GraphProto, input_name: str) -> onnx.NodeProto | None:
    """The Transpose to (N, C, H, W) that is the only reader of a channels-last input, if there is one."""
    readers = [node for node in graph.node if input_name in node.input]
    if len(readers) == 1 and readers[0].op_type == "Transpose" and transpose_perm(readers[0]) == TO_CHANNELS_FIRST:
        return readers[0]
    return None


def channels_last_columns(weight: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """(out, H*W*C) weights of a classifier that reads features in (H, W, C) order, reordered for (C, H, W)."""
    c, h, w = chw
    return weight.reshape(weight.shape[0], h, w, c).transpose(0, 3, 1, 2).reshape(weight.shape[0], -1)
