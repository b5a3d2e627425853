"""inference_inputs, the inputs step of inference.json (collect, then screen with the config's switches), and the
helpers the inference config declares its defaults with."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from custom_components.inference import InferenceInputs, confidence_condition_key, inference_inputs, input_root
from custom_components.paths import config_files

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"


@pytest.fixture
def folder(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), np.eye(4)), str(inp / f"{name}.nii.gz"))
    return inp


def _planned(inputs: InferenceInputs) -> dict[str, list[str]]:
    return {Path(src).name: sorted(Path(p).name for p in outs) for src, outs in inputs.outputs.items()}


@pytest.mark.parametrize("save_confidence, names", [
    ("true", ["a_confidence.nii.gz", "a_synthetic.nii.gz"]),
    ("false", ["a_synthetic.nii.gz"]),
    (False, ["a_synthetic.nii.gz"]),
])
def test_confidence_output_is_planned_only_when_switched_on(folder, tmp_path, save_confidence, names):
    inputs = inference_inputs(folder, str(tmp_path / "out"), save_confidence=save_confidence)
    assert _planned(inputs)["a.nii.gz"] == names


def test_overwrite_switch_given_as_text(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_synthetic.nii.gz").write_bytes(b"earlier run")
    kept = inference_inputs(folder, str(out), overwrite="false")
    assert [Path(s["file"]).name for s in kept.skipped] == ["a.nii.gz"] and sorted(_planned(kept)) == ["b.nii.gz"]
    redo = inference_inputs(folder, str(out), overwrite="true")
    assert redo.skipped == [] and sorted(_planned(redo)) == ["a.nii.gz", "b.nii.gz"]
    with pytest.raises(ValueError, match="save_confidence must be true or false, got 'maybe'"):
        inference_inputs(folder, str(out), save_confidence="maybe")


def test_section_and_source_key_of_a_datalist(folder, tmp_path):
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"test": [{"subject": "a", "t1": "in/a.nii.gz"}],
                              "validation": [{"subject": "b", "t1": "in/b.nii.gz"}]}))
    inputs = inference_inputs(dl, str(tmp_path / "out"), section="validation", source_key="t1")
    assert [Path(i["t1"]).name for i in inputs.items] == ["b.nii.gz"] and inputs.source_key == "t1"


def test_inference_config_builds_its_inputs_with_this_function(folder, tmp_path):
    parser = ConfigParser()
    parser.read_config(config_files(BUNDLE, "infer"))
    parser.update({"input": str(folder), "output_dir": str(tmp_path / "out"), "save_confidence": "true"})
    inputs = parser.get_parsed_content("inputs")
    assert isinstance(inputs, InferenceInputs) and inputs.data_root_dir == str(folder)
    assert _planned(inputs)["b.nii.gz"] == ["b_confidence.nii.gz", "b_synthetic.nii.gz"]


def test_input_root_is_the_datalist_folder_or_the_input_folder(folder, tmp_path, monkeypatch):
    dl = tmp_path / "datalist.json"
    dl.write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert input_root("datalist.json") == str(tmp_path)  # absolute, whatever the working directory
    assert input_root(folder) == str(folder)


@pytest.mark.parametrize("local_conditional, key", [(True, "image"), ("true", "image"), (False, None), ("off", None)])
def test_a_conditional_local_discriminator_sees_the_source_beside_the_synthetic_image(local_conditional, key):
    assert confidence_condition_key(local_conditional) == key


def test_error_activation_turns_a_predicted_error_into_one_minus_the_error():
    """The error-prediction head's QA map: M = 1 - clip(predicted |Y - G(X)|, 0, 1), the source beside the image."""
    import torch

    from custom_components.inference import ConfidenceMapd

    seen = []

    class Head(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[1])
            return torch.full_like(x[:, :1], 0.3)

    head = Head()
    head.p = torch.nn.Parameter(torch.zeros(1))  # a device to run on
    data = {"pred": torch.rand(1, 8, 8), "image": torch.rand(1, 8, 8)}
    out = ConfidenceMapd("pred", head, condition_key="image", activation="error")(data)
    assert seen == [2] and torch.allclose(out["confidence"], torch.full((1, 8, 8), 0.7))
    sig = ConfidenceMapd("pred", head, activation="sigmoid")(data)
    assert torch.allclose(sig["confidence"], torch.sigmoid(torch.tensor(0.3)).expand(1, 8, 8))
    with pytest.raises(ValueError, match="activation"):
        ConfidenceMapd("pred", head, activation="softmax")
