"""MR -> CT: inference normalises the MR exactly as training and evaluation do (issue 17, item 7).

Training took the MR's intensity window from percentiles inside the body mask, while inference (which has no mask)
took them over the voxels > 0: the same model then saw another input scale at inference (170 HU volume MAE through
the evaluation path, 204 HU from the inference output on the probe's subject). Both now use the voxels > 0 of the
MR itself, so the two paths give the same network input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from custom_components.apps.phantom_dataset import ensure_phantom

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _source(files: list[str], transform_id: str, item: dict, overrides: dict) -> torch.Tensor:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({"device": "cpu", **overrides})
    return parser.get_parsed_content(transform_id)(item)["source"].as_tensor()


def test_inference_gives_the_network_the_same_mr_input_as_evaluation(tmp_path):
    data = tmp_path / "mrct"
    ensure_phantom(data, task="mrct", n_train=1, n_val=1, n_test=1, shape=(48, 48, 32), seed=4)
    subject = json.loads((data / "datalist.json").read_text())["test"][0]
    item = {k: str(data / v) for k, v in subject.items() if isinstance(v, str) and v.endswith(".nii.gz")}
    assert "mask" in item  # the evaluation path has the body mask; inference never has one
    evaluated = _source(["train.json", "mrct.json", "evaluate.json"], "validate#preprocessing", item,
                        {"dataset_dir": str(data)})
    inferred = _source(["inference.json"], "preprocessing", {"source": item["source"]}, {"make_phantom": False})
    assert evaluated.shape == inferred.shape
    torch.testing.assert_close(inferred, evaluated, atol=1e-6, rtol=0)
