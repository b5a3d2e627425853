"""The MONAI Label synthesis task, in process: float32 NIfTI in the source geometry, equal to `run inferring`; networks
loaded once; nothing left in the temporary folder; rejections with a status and a reason. Also the flat studies folder
of scripts/make_phantom.py and the git-ignored server log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.apps.label_task import RejectedRequest, SynthesisTask, Synthesiser
from custom_components.config.paths import config_files

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"generator_channels": [4, 8, 16, 16], "local_channels": [4, 4, 8, 8], "patch_size": [32, 32]}


def _parser(bundle: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "infer"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", **SMALL, **overrides})
    return parser


def _make_bundle(out: Path, local_d: bool = True) -> Path:
    shutil.copytree(ROOT / "bundle" / "configs", out / "configs")
    (out / "models").mkdir()
    parser = _parser(out, save_confidence=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), out / "models" / "model.pt")
    if local_d:
        torch.save(parser.get_parsed_content("local_discriminator").state_dict(),
                   out / "models" / "local_discriminator.pt")
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """bundle/ configs with small random weights in models/ (generator and local discriminator)."""
    return _make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture()
def volume(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    data = (rng.random((40, 36, 12)) * 900).astype(np.float32)
    affine = np.array([[-1.2, 0, 0, 20.0], [0, -0.8, 0, -5.0], [0, 0, 3.0, 11.0], [0, 0, 0, 1]])
    path = tmp_path / "study" / "case7_t1.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, data, affine


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary folder of the test's own as the ``tempfile`` default, as the MONAI Label app sets one."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_networks_are_loaded_by_their_definition_without_initialize(bundle):
    parser = _parser(bundle)
    network = parser.get_parsed_content("network")
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items())
    assert not network.training
    local_d = parser.get_parsed_content("postprocessing#transforms#0").network  # ConfidenceMapd
    saved_d = torch.load(bundle / "models" / "local_discriminator.pt", weights_only=True)
    assert all(torch.equal(v, saved_d[k]) for k, v in local_d.state_dict().items())


def test_preprocessing_accepts_the_image_under_image(bundle, volume):
    path, data, _ = volume
    out = _parser(bundle).get_parsed_content("preprocessing")({"image": str(path)})
    assert tuple(out["source"].shape) == (1, *data.shape)


def test_tasks_return_float32_outputs_in_source_geometry_equal_to_the_bundle_cli(bundle, volume, tmp_path,
                                                                                 private_tmp):
    path, data, affine = volume
    shared = Synthesiser(bundle, SMALL)
    outputs = {}
    for result in ("synthetic", "confidence"):
        task = SynthesisTask(bundle, result, synthesiser=shared)
        assert task.is_valid() and task.info()["type"] == "others"
        file, params = task({"image": str(path)})
        assert Path(file).parent == private_tmp  # a temporary file of its own, which MONAI Label deletes once sent
        img = nib.load(file)
        assert img.get_data_dtype() == np.float32 and img.shape == data.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        outputs[result] = img.get_fdata()
        assert params == {"result": result, "dtype": "float32", "shape": list(data.shape),
                          "latency": params["latency"]}  # no server-side path in the reply
        os.unlink(file)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing written next to the source
    assert list(private_tmp.iterdir()) == []  # the request's working folder is gone
    for values in outputs.values():
        assert np.isfinite(values).all() and 0 <= values.min() and values.max() <= 1 and values.std() > 0
    cli_out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", str(config_files(bundle, "infer")),
           "--bundle_root", str(bundle), "--input", str(path.parent), "--output_dir", str(cli_out)]
    for key, value in SMALL.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for result, values in outputs.items():
        cli = nib.load(cli_out / f"case7_t1_{result}.nii.gz").get_fdata()
        np.testing.assert_allclose(values, cli, atol=1e-6)


def test_networks_load_once_and_again_only_when_a_weight_file_changes(bundle, volume, monkeypatch, private_tmp):
    path, _, _ = volume
    loaded = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        loaded.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    shared = Synthesiser(bundle, SMALL)
    tasks = [SynthesisTask(bundle, result, synthesiser=shared) for result in ("synthetic", "confidence")]
    for task in tasks * 2:
        os.unlink(task({"image": str(path)})[0])
    assert sorted(loaded) == ["local_discriminator.pt", "model.pt"] and shared.loads == 1
    # a new model file (as MONAI Label's PUT /model/<name> writes) is picked up by the next request
    model = bundle / "models" / "model.pt"
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.unlink(tasks[0]({"image": str(path)})[0])
    assert shared.loads == 2 and sorted(loaded) == ["local_discriminator.pt", "local_discriminator.pt", "model.pt",
                                                    "model.pt"]


def test_get_path_takes_monai_labels_validate_argument(bundle, tmp_path):
    synthetic, confidence = (SynthesisTask(bundle, r, overrides=SMALL) for r in ("synthetic", "confidence"))
    assert synthetic.get_path() == synthetic.get_path(validate=True) == str(bundle / "models" / "model.pt")
    assert confidence.get_path(True) == str(bundle / "models" / "local_discriminator.pt")
    no_d = _make_bundle(tmp_path / "no_d", local_d=False)
    task = SynthesisTask(no_d, "confidence", overrides=SMALL)
    assert task.get_path() is None and not task.is_valid()  # MONAI Label then leaves it out of /info
    assert task.get_path(validate=False) == str(no_d / "models" / "local_discriminator.pt")
    assert SynthesisTask(no_d, "synthetic", overrides=SMALL).is_valid()


def test_rejected_requests_carry_a_status_and_the_reason_without_server_paths(bundle, tmp_path, private_tmp):
    task = SynthesisTask(bundle, overrides=SMALL)
    nan = private_tmp / "tmpnan12345.nii.gz"  # where MONAI Label keeps a posted file
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), str(nan))
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 2), np.float32), np.eye(4)), str(four_d))
    not_gzip = tmp_path / "text.nii.gz"
    not_gzip.write_text("not an image")
    cases = [(nan, 422, "posted.nii.gz contains 2048 non-finite values"),
             (four_d, 422, "four_d.nii.gz has shape (16, 16, 8, 2), expected one 3D volume"),
             (not_gzip, 422, "text.nii.gz cannot be read"),
             (tmp_path / "missing.nii.gz", 404, "'missing.nii.gz' is not a file"),
             ("", 404, "'none given' is not a file")]
    for image, status, reason in cases:
        with pytest.raises(RejectedRequest) as error:
            task({"image": str(image)})
        assert error.value.status_code == status and reason in error.value.detail, error.value.detail
        assert isinstance(error.value, ValueError)  # in process, a plain ValueError
        assert str(tmp_path) not in error.value.detail  # no server-side path
    assert sorted(p.name for p in private_tmp.iterdir()) == [nan.name]  # nothing else left behind
    no_d = _make_bundle(tmp_path / "no_d", local_d=False)
    with pytest.raises(RejectedRequest, match="no QA map") as error:
        SynthesisTask(no_d, "confidence", overrides=SMALL)({"image": str(_ok_volume(tmp_path))})
    assert error.value.status_code == 404
    with pytest.raises(ValueError, match="'synthetic' or 'confidence'"):
        SynthesisTask(bundle, "label", overrides=SMALL)


def _ok_volume(tmp_path: Path) -> Path:
    path = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((32, 32, 8)).astype(np.float32), np.eye(4)), str(path))
    return path


def _make_phantom_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_phantom", ROOT / "scripts" / "make_phantom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_phantom_writes_a_flat_studies_folder_outside_the_data_set(tmp_path, capsys):
    make_phantom = _make_phantom_module()
    data, studies = tmp_path / "phantom", tmp_path / "studies"
    options = {"n_train": 1, "n_val": 1, "n_test": 2, "shape": (32, 32, 32), "verbose": False}
    make_phantom.main(str(data), studies_dir=str(studies), **options)
    assert f"{studies} (2 studies)" in capsys.readouterr().out
    test = json.loads((data / "datalist.json").read_text())["test"]
    expected = {f"{item['subject']}_t1.nii.gz": data / item["source"] for item in test}
    assert sorted(p.name for p in studies.iterdir()) == sorted(expected)  # flat: one file per test subject
    for name, source in expected.items():
        assert (studies / name).read_bytes() == source.read_bytes()
    datalist = data / "datalist.json"
    assert make_phantom.write_studies(datalist, studies) == [studies / n for n in sorted(expected)]  # kept as is
    first = studies / sorted(expected)[0]
    first.write_bytes(b"edited")
    with pytest.raises(FileExistsError, match="exists and differs"):
        make_phantom.write_studies(datalist, studies)
    assert first.read_bytes() == b"edited"
    make_phantom.write_studies(datalist, studies, overwrite="true")
    assert first.read_bytes() == expected[first.name].read_bytes()
    with pytest.raises(ValueError, match="lies inside the data set"):
        make_phantom.write_studies(datalist, data / "studies")
    assert not (data / "studies").exists()
    assert len(make_phantom.write_studies(datalist, tmp_path / "all", "all")) == 4


def test_the_server_log_is_not_tracked_and_is_ignored():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    git = ["git", "-C", str(ROOT)]
    assert subprocess.run([*git, "ls-files", "monailabel_app/logs"], capture_output=True, text=True).stdout == ""
    for path in ("monailabel_app/logs/app.log", "monailabel_app/model/x.pt"):
        assert subprocess.run([*git, "check-ignore", "-q", path]).returncode == 0, path
