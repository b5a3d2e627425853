"""inference_inputs, the inputs step of inference.json (collect, then screen with the config's switches), and the
helpers the inference config declares its defaults with."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from custom_components.apps.inference import InferenceInputs, inference_inputs, input_root
from custom_components.transforms.confidence import confidence_condition_key
from custom_components.config.paths import config_files

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
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), np.eye(4)), str(out / "a_synthetic.nii.gz"))  # earlier run
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


@pytest.mark.parametrize("local_conditional, key", [(True, "source"), ("true", "source"), (False, None), ("off", None)])
def test_a_conditional_local_discriminator_sees_the_source_beside_the_synthetic_image(local_conditional, key):
    assert confidence_condition_key(local_conditional) == key


def test_error_activation_turns_a_predicted_error_into_one_minus_the_error():
    """The error-prediction head's QA map: M = 1 - clip(predicted |Y - G(X)|, 0, 1), the source beside the image."""
    import torch

    from custom_components.transforms.confidence import ConfidenceMapd

    seen = []

    class Head(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[1])
            return torch.full_like(x[:, :1], 0.3)

    head = Head()
    head.p = torch.nn.Parameter(torch.zeros(1))  # a device to run on
    data = {"pred": torch.rand(1, 8, 8), "source": torch.rand(1, 8, 8)}
    out = ConfidenceMapd("pred", head, condition_key="source", activation="error")(data)
    assert seen == [2] and torch.allclose(out["confidence"], torch.full((1, 8, 8), 0.7))
    sig = ConfidenceMapd("pred", head, activation="sigmoid")(data)
    assert torch.allclose(sig["confidence"], torch.sigmoid(torch.tensor(0.3)).expand(1, 8, 8))
    with pytest.raises(ValueError, match="activation"):
        ConfidenceMapd("pred", head, activation="softmax")


# ---------------------------------------------------------------------------------------------------------------
# issue 17, items 4 and 9


def _nii(path, shape=(6, 5, 4), value=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.float32), np.eye(4)), str(path))


def test_an_input_is_skipped_only_when_every_output_exists_and_can_be_read(folder, tmp_path):
    """Issue 17, item 4: a 0-byte output left by a kill, or a synthetic image without its confidence map, was
    skipped as done."""
    out = tmp_path / "out"
    _nii(out / "a_synthetic.nii.gz")  # the confidence map of a is missing
    (out / "b_synthetic.nii.gz").parent.mkdir(parents=True, exist_ok=True)
    (out / "b_synthetic.nii.gz").write_bytes(b"")  # killed while writing
    _nii(out / "b_confidence.nii.gz")
    inputs = inference_inputs(folder, str(out), save_confidence=True)
    assert inputs.skipped == [] and sorted(_planned(inputs)) == ["a.nii.gz", "b.nii.gz"]
    _nii(out / "a_confidence.nii.gz")
    _nii(out / "b_synthetic.nii.gz")
    again = inference_inputs(folder, str(out), save_confidence=True)
    assert sorted(Path(s["file"]).name for s in again.skipped) == ["a.nii.gz", "b.nii.gz"] and again.items == []
    assert "exists and can be read" in again.skipped[0]["reason"]


def test_outputs_are_written_under_a_temporary_name_and_renamed_when_complete(tmp_path, monkeypatch):
    """Issue 17, item 4: a kill during a write left a truncated file under the output's final name."""
    import torch
    from monai.data import MetaTensor

    from custom_components.apps.writers import AtomicNibabelWriter, partial_name, remove_partial_outputs

    final = tmp_path / "out" / "case" / "t1_synthetic.nii.gz"
    image = MetaTensor(torch.rand(1, 6, 5, 4), affine=torch.eye(4))

    def write():
        writer = AtomicNibabelWriter()
        writer.set_data_array(image, channel_dim=0)
        writer.set_metadata({"affine": image.affine, "original_affine": image.affine})
        writer.write(str(final))

    real = nib.save

    def killed(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b half a gzip stream")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        write()
    assert not final.exists() and list(final.parent.iterdir()) == []  # nothing under the final name, no leftover
    monkeypatch.setattr(nib, "save", real)
    write()
    assert nib.load(str(final)).shape == (6, 5, 4) and [p.name for p in final.parent.iterdir()] == [final.name]
    assert partial_name(final, 123).name == ".t1_synthetic.partial-123.nii.gz"
    leftover = partial_name(final, 2 ** 22 + 12345)  # a process id no process has: a killed run's file
    leftover.write_bytes(b"partial")
    assert remove_partial_outputs(final) == [leftover] and not leftover.exists()


def _evaluator(items, out, root, fail_on):
    """A MONAI evaluator as inference.json builds one (data set over the screened items, SaveImaged after the
    network), whose preprocessing raises for the input named ``fail_on``."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, Lambdad, LoadImaged, SaveImaged

    from custom_components.data.datalist import PrepareSourceTarget
    from custom_components.engines.evaluator import SynthesisEvaluator

    def check(x):
        if fail_on in str(x.meta["filename_or_obj"]):
            raise ValueError(f"cannot use {Path(x.meta['filename_or_obj']).name}")
        return x

    pre = Compose([LoadImaged("source", image_only=True), EnsureChannelFirstd("source"), Lambdad("source", check)])
    post = Compose([SaveImaged("pred", output_dir=str(out), output_postfix="synthetic", separate_folder=False,
                               data_root_dir=root, print_log=False,
                               writer="custom_components.apps.writers.AtomicNibabelWriter")])
    loader = DataLoader(Dataset(items, pre), batch_size=1, num_workers=0)
    return SynthesisEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=torch.nn.Identity(),
                              prepare_batch=PrepareSourceTarget("source", None), postprocessing=post)


def test_each_input_succeeds_or_fails_on_its_own_with_its_own_error(tmp_path):
    """Issue 17, item 9: after one input failed, every later input was marked failed with the same error."""
    from custom_components.apps.inference import InferenceError

    for name in ("a", "b", "c"):
        _nii(tmp_path / "in" / f"{name}.nii.gz", shape=(8, 8, 4))
    out = tmp_path / "out"
    inputs = inference_inputs(tmp_path / "in", str(out))
    with pytest.raises(InferenceError) as e:
        inputs.run(_evaluator(inputs.items, out, inputs.data_root_dir, fail_on="b.nii"))
    assert "1 of 3 input(s) could not be synthesised" in str(e.value)
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [Path(f).name for f in summary["synthesised"]] == ["a.nii.gz", "c.nii.gz"]
    (failed,) = summary["failed"]
    assert Path(failed["file"]).name == "b.nii.gz"
    assert failed["reason"] == "ValueError in Lambdad: cannot use b.nii.gz"  # its own error, not a Compose object
    assert sorted(p.name for p in out.iterdir()) == ["a_synthetic.nii.gz", "c_synthetic.nii.gz",
                                                     "inference_summary.json"]


def test_inputs_too_small_for_the_networks_are_set_aside_before_any_work(tmp_path):
    """Issue 17, item 9: a 16^3 volume crashed the confidence map (an instance norm of one element)."""
    from ignite.engine import Events

    from custom_components.data.shapes import slice_size_problem
    from custom_components.apps.inference import InferenceError
    from custom_components.inferers.inferer import WholeSliceInferer

    inferer = WholeSliceInferer(divisor=16)
    assert "16 x 16 voxels" in slice_size_problem((16, 16, 16), inferer)
    assert "at least 17 voxels" in slice_size_problem((9, 16, 40), inferer)
    assert slice_size_problem((17, 16, 3), inferer) is None and slice_size_problem((16, 16, 16), None) is None
    _nii(tmp_path / "in" / "tiny.nii.gz", shape=(16, 16, 16))
    _nii(tmp_path / "in" / "ok.nii.gz", shape=(32, 16, 4))
    out = tmp_path / "out"
    inputs = inference_inputs(tmp_path / "in", str(out))
    assert inputs.shapes == {str(tmp_path / "in" / "ok.nii.gz"): (32, 16, 4),
                             str(tmp_path / "in" / "tiny.nii.gz"): (16, 16, 16)}
    evaluator = _evaluator(inputs.items, out, inputs.data_root_dir, fail_on="nothing")
    evaluator.inferer = inferer
    seen = []
    evaluator.add_event_handler(Events.ITERATION_STARTED,
                                lambda e: seen.append(Path(e.state.batch["source"].meta["filename_or_obj"][0]).name))
    with pytest.raises(InferenceError, match="tiny.nii.gz: its slices are 16 x 16 voxels"):
        inputs.run(evaluator)
    assert seen == ["ok.nii.gz"]  # the tiny volume never reached the networks
