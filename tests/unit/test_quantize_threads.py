"""The static INT8 schemes calibrate in an ONNX Runtime session of their own: it took every core whatever the
export's threads (``onnx_threads`` / ``torch_threads``), so a worker held to one core used them all while it
exported, and two test processes on two cores fought over them (the static-schemes test spent 39 s of 53 there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pgsynapse.export import quantize


def _identity_graph(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(("threads", "intra_op"), [(1, 1), (3, 3), (0, 0)])
def test_the_calibration_session_runs_on_the_exports_threads(tmp_path, monkeypatch, threads, intra_op):
    seen: list[int] = []
    real = ort.InferenceSession

    def session(model: Any, sess_options: ort.SessionOptions, **kwargs: Any) -> ort.InferenceSession:
        seen.append(sess_options.intra_op_num_threads)
        return real(model, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    feed = {"x": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "attention_mask": np.array([[1, 0]])}
    ranges = quantize._activation_range(_identity_graph(tmp_path / "m.onnx"), ["y"], [feed], threads=threads)
    assert seen == [intra_op]  # 0: ONNX Runtime's own default (every core), as the setting's 0 means
    assert ranges["y"][0].tolist() == [0, 1, 2] and ranges["y"][1].tolist() == [0, 1, 2]  # the masked token left out
