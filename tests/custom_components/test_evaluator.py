"""One name per concept (issue 20, item 3): ``label`` is the tumour labels, the target image is ``target``.

MONAI's ``SupervisedEvaluator`` puts the target under ``label`` in its output while the bundle's batch holds the tumour
labels under ``label``; both met in train.json's tumour metrics. The bundle's evaluator and trainer name the images as
the batch does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.networks.nets import UNet

from custom_components import DualAttentionKeys, DualAttentionTrainer
from custom_components.data.datalist import PrepareSourceTarget
from custom_components.engines.evaluator import SynthesisEvaluator
from unit_options import trainer_options

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _subject() -> dict:
    """A subject whose target, tumour label and source are three different images: pred = source = 0."""
    target = torch.full((1, 8, 8, 4), 0.5)
    label = torch.zeros((1, 8, 8, 4))
    label[:, :4, :4] = 2  # a tumour (BraTS value 2) in one corner, where the target is brighter
    target[label > 0] = 1.0
    return {"source": torch.zeros((1, 8, 8, 4)), "target": target, "label": label, "mask": torch.ones((1, 8, 8, 4))}


def _evaluator(metrics: dict | None = None) -> SynthesisEvaluator:
    """An evaluator as train.json builds one (decollated output) when given ``metrics``, else undecollated."""
    loader = DataLoader(Dataset([_subject()]), batch_size=1)
    return SynthesisEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=torch.nn.Identity(),
                              prepare_batch=PrepareSourceTarget(), decollate=metrics is not None,
                              key_val_metric=None if metrics is None else {"val_mae": metrics.pop("val_mae")},
                              additional_metrics=metrics)


def test_the_evaluator_names_the_images_as_the_batch_does():
    evaluator = _evaluator()
    evaluator.run()
    output, batch = evaluator.state.output, evaluator.state.batch
    assert set(output) == {"source", "target", "pred"}  # MONAI's "image" and "label" are gone
    assert torch.equal(output["target"], _subject()["target"][None]) and torch.equal(output["source"], batch["source"])
    assert torch.equal(batch["label"], _subject()["label"][None])  # "label" is the tumour labels, only


def test_train_jsons_tumour_metrics_read_the_target_from_the_output_and_the_tumour_from_the_batch():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    metrics = {name: parser.get_parsed_content(f"validate#additional_metrics#{name}")
               for name in ("val_mae", "val_mae_tumour")}
    evaluator = _evaluator(metrics)
    evaluator.run()
    # pred is 0 everywhere: the error is the target, 1 in the tumour (16 x 4 of 256 voxels) and 0.5 elsewhere
    assert evaluator.state.metrics["val_mae_tumour"] == pytest.approx(1.0)
    assert evaluator.state.metrics["val_mae"] == pytest.approx((64 * 1.0 + 192 * 0.5) / 256)


def test_the_trainer_output_names_the_images_as_the_batch_does():
    g = UNet(2, 1, 1, (4, 8), (2,), num_res_units=0)
    batch = {"source": torch.rand(2, 1, 16, 16), "target": torch.rand(2, 1, 16, 16)}
    trainer = DualAttentionTrainer("cpu", 1, [batch], g, torch.optim.Adam(g.parameters()), "unet",
                                   **trainer_options())
    trainer.run()
    output = trainer.state.output
    assert {"source", "target", "pred"} <= set(output) and not {"image", "label"} & set(output)
    assert torch.equal(output[DualAttentionKeys.TARGET], batch["target"])
    assert torch.equal(output[DualAttentionKeys.SOURCE], batch["source"])


def test_the_postprocessing_sees_the_tumour_labels_under_label_and_the_target_under_target():
    """MONAI merges batch and output for the postprocessing; with its "label" for the target, the output's target
    replaced the batch's tumour labels there."""
    seen = {}

    def record(data):
        seen.update({str(k): v for k, v in data.items()})
        return data

    loader = DataLoader(Dataset([_subject()]), batch_size=1)
    SynthesisEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=torch.nn.Identity(),
                       prepare_batch=PrepareSourceTarget(), postprocessing=record).run()
    assert torch.equal(seen["label"], _subject()["label"]) and torch.equal(seen["target"], _subject()["target"])
    assert "image" not in seen
