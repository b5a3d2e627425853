"""`python -m monai.bundle run ...` command lines the configs cannot honour are refused before any work (issue 17,
items 1, 11 and 12): a stray positional word (it became the ``init_id`` and switched every start-up check off), an
option no config defines (it was echoed and ignored), a value of the wrong type or range (raw tracebacks, some after
the data were cached). Each case runs the real command line and checks that the one plain ``ERROR`` line names the
problem and that nothing was written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from custom_components.utils.errors import project_error

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"


def _run(args: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


TRAIN = ["training", "--config_file", str(CONFIGS / "train.json"), "--epochs", "1"]


def _run_in_process(tmp_path: Path, init_id: str | None = None, **override) -> None:
    """``monai.bundle.scripts.run`` as ``python -m monai.bundle run training ...`` calls it (fire's parsed values)."""
    from monai.bundle.scripts import run

    run("training", init_id, config_file=str(CONFIGS / "train.json"), logging_file=False,
        output_dir=str(tmp_path / "run"), dataset_dir=str(tmp_path / "data"), **{"epochs": 1, **override})


def test_a_stray_word_is_refused_in_one_plain_line_and_nothing_is_written(tmp_path):
    code, out = _run([*TRAIN, "--output_dir", str(tmp_path / "run"), "--dataset_dir", str(tmp_path / "data"),
                      "extra_word"], tmp_path)
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert code != 0 and len(errors) == 1, out[-3000:]
    assert "init_id 'extra_word' is not defined by the configs: a stray word on the command line?" in errors[0]
    assert "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data generated, no run folder


@pytest.mark.parametrize("init_id, override, message", [
    ("32]", {"patch_size": "[32,"}, "init_id '32]' is not defined by the configs"),  # an unquoted list, split in two
    (None, {"betta": 3}, "--betta is not an option of these configs (did you mean --beta?)"),
    (None, {"lambda_adv_globl": 1}, "--lambda_adv_globl is not an option of these configs (did you mean --lambda_adv_global?)"),
    (None, {"epochs": "ten"}, "--epochs 'ten': expected an integer >= 1."),
    (None, {"epochs": 0}, "--epochs 0: expected an integer >= 1."),
    (None, {"epochs": -3}, "--epochs -3: expected an integer >= 1."),
    (None, {"patch_size": 96}, "--patch_size 96: expected a list of 2 integers >= 1 (spatial_dims 2)"),
    (None, {"patch_size": [96, 0]}, "expected a list of 2 integers >= 1"),
    (None, {"lr_g": -0.1}, "--lr_g -0.1: expected a number > 0."),
    (None, {"batch_size": 0}, "--batch_size 0: expected an integer >= 1."),
    (None, {"samples_per_volume": 0}, "--samples_per_volume 0: expected an integer >= 1."),
    (None, {"cache_rate": 2}, "--cache_rate 2: expected a number in [0, 1]."),
])
def test_training_refuses_the_command_line_before_any_work(init_id, override, message, tmp_path):
    with pytest.raises(Exception) as raised:
        _run_in_process(tmp_path, init_id, **override)
    error = project_error(raised.value)  # MONAI wraps a component's error; the plain ERROR line shows this one
    assert isinstance(error, ValueError) and message in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data generated, no run folder


def test_inference_and_evaluation_refuse_unknown_options_and_stray_words(tmp_path):
    infer = ["--config_file", str(CONFIGS / "inference.json"), "--output_dir", str(tmp_path / "out")]
    code, out = _run(["inferring", *infer, "--modle_dir", "x"], tmp_path)
    assert code != 0 and "--modle_dir is not an option of these configs (did you mean --model_dir?)" in out, out[-2000:]
    code, out = _run(["inferring", *infer, "stray"], tmp_path)
    assert code != 0 and "init_id 'stray' is not defined by the configs" in out, out[-2000:]
    evaluate = ["--config_file", json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])]
    code, out = _run(["evaluating", *evaluate, "--eval_sectoin", "test"], tmp_path)
    assert code != 0 and "did you mean --eval_section?" in out, out[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ids_of_every_loaded_config_file_are_options_even_outside_the_bundle(tmp_path):
    """A user's own overlay (anywhere on disk) defines options too; they are not refused as unknown."""
    overlay = tmp_path / "mine.json"
    overlay.write_text(json.dumps({"my_window": [0.0, 1.0], "target_window": "@my_window"}))
    configs = json.dumps([str(CONFIGS / "inference.json"), str(overlay)])
    code, out = _run(["inferring", "--config_file", configs, "--my_window", "[0.0, 2.0]", "--input",
                      str(tmp_path / "missing.json"), "--output_dir", str(tmp_path / "out")], tmp_path)
    assert code != 0 and "is neither a datalist .json file nor a folder" in out, out[-2000:]  # got past the check
    assert "not an option" not in out


def test_a_validation_volume_too_small_for_ssim_is_refused_at_start_naming_the_subject(tmp_path):
    """Issue 17, item 10: a 1-slice validation volume failed in SSIM at the first validation, after the warm-up."""
    import nibabel as nib
    import numpy as np

    from custom_components.apps.phantom_dataset import ensure_phantom

    data = tmp_path / "data"
    ensure_phantom(data, task="t1t2", n_train=1, n_val=1, n_test=1, shape=(32, 32, 32), seed=2)
    val = json.loads((data / "datalist.json").read_text())["validation"][0]
    for key, path in val.items():  # every image of the subject, so that they still agree with each other
        if isinstance(path, str) and path.endswith(".nii.gz"):
            nib.save(nib.Nifti1Image(np.ones((32, 32, 1), np.float32) * (key != "label"), np.eye(4)), str(data / path))
    with pytest.raises(Exception) as raised:
        _run_in_process(tmp_path, make_phantom=False, patch_size=[32, 32])
    error = project_error(raised.value)
    assert "validation list: 1 volume(s) too small" in str(error)
    assert f"subject {val['subject']}" in str(error) and "every axis needs at least 11" in str(error)
    assert not (tmp_path / "run").exists()
