"""handler.runtime: the one loader the handler, the predictor and the benchmarks share."""

from __future__ import annotations

import json

import pytest
import torch

from handler.runtime import load_model, load_scripted_model


def test_loader_switches_the_profiling_executor_off_and_reads_extra_files(tiny_export):
    torch._C._jit_set_profiling_executor(True)
    extra = {"metadata.json": ""}
    model = load_scripted_model(tiny_export / "model.pt", extra_files=extra)
    # The setter returns the previous value: False means the loader switched it off.
    assert torch._C._jit_set_profiling_executor(False) is False
    assert not model.training
    assert json.loads(extra["metadata.json"])["num_classes"] == 4
    with torch.inference_mode():
        logits = model(torch.zeros(2, 3, 64, 96))
    assert tuple(logits.shape) == (2, 4, 64, 96)


def test_load_model_is_the_one_loader_and_refuses_what_it_cannot_load(tiny_export, tmp_path):
    model = load_model(tiny_export / "model.pt", "torchscript", "cpu", threads=1)
    x = torch.zeros(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), load_scripted_model(tiny_export / "model.pt")(x))
    with pytest.raises(ValueError, match="runtime 'tensorrt' is not one of"):
        load_model(tiny_export / "model.pt", "tensorrt")
    with pytest.raises(FileNotFoundError, match="no onnx model file"):
        load_model(tmp_path / "model.onnx", "onnx")
