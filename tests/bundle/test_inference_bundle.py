"""`run inferring` with inference.json (which runs alone), TorchScript export, and verify_net_in_out (bundle CLI in
subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.config.paths import config_files

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = config_files(ROOT / "bundle", "infer")  # [.../inference.json]: it runs alone
CONFIG = str(CONFIGS)  # as --config_file takes a list: "['.../inference.json']"
META = ROOT / "bundle" / "configs" / "metadata.json"
SMALL = ["--generator_channels", "[4,8,16,16]", "--local_channels", "[4,4,8,8]", "--patch_size", "[32,32]"]


def _bundle(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Randomly initialised generator and local discriminator saved as the training run saves them."""
    out = tmp_path_factory.mktemp("models")
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"generator_channels": [4, 8, 16, 16], "local_channels": [4, 4, 8, 8], "save_confidence": True,
                   "device": "cpu"})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), out / "model.pt")
    torch.save(parser.get_parsed_content("local_discriminator").state_dict(), out / "local_discriminator.pt")
    return out


def _volume(path, shape=(37, 29, 11), affine=None, value=None):
    rng = np.random.default_rng(1)
    data = rng.random(shape).astype(np.float32) * 800 if value is None else np.asarray(value, dtype=np.float32)
    if affine is None:  # LPS-like: first two axes flipped, anisotropic spacing, off-centre origin
        affine = np.array([[-1.1, 0, 0, 30.0], [0, -0.9, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


def test_odd_sized_volume_keeps_shape_affine_and_gives_confidence(models, tmp_path):
    inp = tmp_path / "in" / "case01"
    inp.mkdir(parents=True)
    data, affine = _volume(inp / "t1.nii.gz")
    (tmp_path / "in" / "case02").mkdir()  # one slice (issue 17, item 10): written as 2D, third spacing lost
    one, one_affine = _volume(tmp_path / "in" / "case02" / "t1.nii.gz", shape=(40, 36, 1))
    out = tmp_path / "out"
    _bundle("run", "inferring", "--config_file", CONFIG, "--input", tmp_path / "in", "--model_dir", models,
            "--output_dir", out, *SMALL)
    for postfix in ("synthetic", "confidence"):
        written = nib.load(out / "case02" / f"t1_{postfix}.nii.gz")
        assert written.shape == one.shape
        np.testing.assert_allclose(written.affine, one_affine, atol=1e-5)
        np.testing.assert_allclose(written.header.get_zooms(), (1.1, 0.9, 2.5), atol=1e-5)
    syn = nib.load(out / "case01" / "t1_synthetic.nii.gz")
    conf = nib.load(out / "case01" / "t1_confidence.nii.gz")
    assert syn.shape == data.shape and conf.shape == data.shape
    np.testing.assert_allclose(syn.affine, affine, atol=1e-5)
    np.testing.assert_allclose(conf.affine, affine, atol=1e-5)
    c = conf.get_fdata()
    assert c.min() >= 0 and c.max() <= 1 and np.isfinite(c).all()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["failed"] == [] and len(summary["synthesised"]) == 2


def test_ct_output_is_in_hounsfield_units_and_round_trips(tmp_path):
    """An identity 'generator' with the CT window on both sides must give back the input HU exactly."""
    (tmp_path / "models").mkdir()
    torch.save({}, tmp_path / "models" / "model.pt")
    inp = tmp_path / "in"
    inp.mkdir()
    hu = np.linspace(-1024, 3000, 24 * 16 * 8, dtype=np.float32).reshape(24, 16, 8)
    _volume(inp / "ct.nii.gz", value=hu)
    _bundle("run", "inferring", "--config_file", CONFIG, "--input", inp, "--model_dir", tmp_path / "models",
            "--output_dir", tmp_path / "out", "--network_def", "{'_target_': 'torch.nn.Identity'}",
            "--save_confidence", "false", "--target_window", "[-1024,3000]",
            "--source_intensity#a_min", "-1024", "--source_intensity#a_max", "3000", "--patch_size", "[16,16]")
    out = nib.load(tmp_path / "out" / "ct_synthetic.nii.gz").get_fdata()
    np.testing.assert_allclose(out, hu, atol=1e-3)


def test_bad_inputs_are_reported_and_others_processed_and_nothing_overwritten(models, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    _volume(inp / "good.nii.gz")
    _volume(inp / "nan.nii.gz", value=np.full((16, 16, 8), np.nan))
    _volume(inp / "flat.nii.gz", value=np.zeros((16, 16)))
    _volume(inp / "multi.nii.gz", value=np.zeros((16, 16, 8, 2)))
    (inp / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    args = ["run", "inferring", "--config_file", CONFIG, "--input", inp, "--model_dir", models, "--output_dir", out, *SMALL]
    proc = _bundle(*args, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "4 of 5 input(s) could not be synthesised" in log  # issue 10, item 7
    summary = json.loads((out / "inference_summary.json").read_text())
    reasons = {Path(f["file"]).name: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {"nan.nii.gz", "flat.nii.gz", "multi.nii.gz", "broken.nii.gz"}
    assert "non-finite" in reasons["nan.nii.gz"] and "2D" in reasons["flat.nii.gz"]
    assert "2 channels" in reasons["multi.nii.gz"] and "cannot be read" in reasons["broken.nii.gz"]
    assert "broken.nii.gz" in log
    assert [Path(f).name for f in summary["synthesised"]] == ["good.nii.gz"]
    good = out / "good_synthetic.nii.gz"
    stamp = os.stat(good).st_mtime_ns
    _bundle(*args, check=False)
    # the earlier summary is kept; the existing output is reported as skipped, not as failed
    assert len(list(out.glob("inference_summary_*.json"))) == 1
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [Path(f["file"]).name for f in summary["skipped"]] == ["good.nii.gz"]
    assert "exists" in summary["skipped"][0]["reason"] and summary["synthesised"] == []
    assert "good.nii.gz" not in {Path(f["file"]).name for f in summary["failed"]}
    assert os.stat(good).st_mtime_ns == stamp
    _bundle(*args, "--overwrite", "true", check=False)
    assert os.stat(good).st_mtime_ns != stamp
    assert len(list(out.glob("inference_summary_*.json"))) == 2


def test_outputs_stay_under_output_dir_for_absolute_paths_in_any_format(models, tmp_path):
    """Issue 10, items 5 and 8: a datalist elsewhere naming absolute paths, .mha and .nii inputs."""
    import SimpleITK as sitk

    data = tmp_path / "data"
    (data / "case1").mkdir(parents=True)
    (data / "case2").mkdir()
    _volume(data / "case2" / "t1.nii")
    _volume(tmp_path / "tmp.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "tmp.nii.gz")), str(data / "case1" / "t1.mha"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "dl.json").write_text(json.dumps({"test": [{"source": str(data / "case1" / "t1.mha")},
                                                        {"source": str(data / "case2" / "t1.nii")}]}))
    before = sorted(p.name for p in data.rglob("*"))
    out = tmp_path / "out"
    _bundle("run", "inferring", "--config_file", CONFIG, "--input", lists / "dl.json", "--model_dir", models,
            "--output_dir", out, *SMALL)
    assert sorted(p.name for p in data.rglob("*")) == before  # nothing written beside the inputs
    for case in ("case1", "case2"):
        syn = nib.load(out / case / "t1_synthetic.nii.gz")
        assert syn.shape == (37, 29, 11)
    summary = json.loads((out / "inference_summary.json").read_text())
    assert len(summary["synthesised"]) == 2 and summary["failed"] == []


def test_output_name_collisions_are_found_before_any_work(models, tmp_path):
    """Issue 10, item 6: scan.nii and scan.nii.gz would both become scan_synthetic.nii.gz."""
    inp = tmp_path / "in"
    inp.mkdir()
    _volume(inp / "scan.nii")
    _volume(inp / "scan.nii.gz")
    _volume(inp / "other.nii.gz")
    out = tmp_path / "out"
    proc = _bundle("run", "inferring", "--config_file", CONFIG, "--input", inp, "--model_dir", models,
                   "--output_dir", out, *SMALL, check=False)
    assert proc.returncode != 0
    summary = json.loads((out / "inference_summary.json").read_text())
    reasons = {Path(f["file"]).name: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {"scan.nii", "scan.nii.gz"}
    assert "scan_synthetic.nii.gz would also be written for" in reasons["scan.nii"]
    assert not (out / "scan_synthetic.nii.gz").exists() and (out / "other_synthetic.nii.gz").exists()
    assert [Path(f).name for f in summary["synthesised"]] == ["other.nii.gz"]


@pytest.mark.parametrize("ext", ["nii", "nii.gz", "mha", "nrrd"])
def test_every_screened_format_is_readable_by_the_inference_pipeline(tmp_path, ext):
    """Issue 10, item 8: what the screening accepts, the config's loader reads (same array and geometry)."""
    import SimpleITK as sitk

    from custom_components.apps.inference import screen_inputs

    data, affine = _volume(tmp_path / "ref.nii.gz")
    path = tmp_path / f"scan.{ext}"
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "ref.nii.gz")), str(path))
    screened = screen_inputs([{"source": str(path)}], str(tmp_path / "out"))
    assert screened.failed == [] and len(screened.items) == 1
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    loader = next(t for t in parser.get_parsed_content("preprocessing").transforms if "Load" in type(t).__name__)
    loaded = loader({"source": str(path)})["source"]
    assert tuple(loaded.shape) == (1, *data.shape)
    np.testing.assert_allclose(loaded[0].numpy(), data, rtol=1e-6)
    np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-4)


def test_torchscript_export_matches_eager_and_net_in_out_verifies(models, tmp_path):
    ts = tmp_path / "model.ts"
    _bundle("ckpt_export", "network_def", "--filepath", ts, "--ckpt_file", models / "model.pt", "--meta_file", META,
            "--config_file", CONFIG, *SMALL[:2])
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"generator_channels": [4, 8, 16, 16], "device": "cpu"})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    eager.eval()
    scripted = torch.jit.load(str(ts))
    x = torch.rand(2, 1, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=1e-5)
    _bundle("verify_net_in_out", "network_def", "--meta_file", META, "--config_file", CONFIG, *SMALL[:2])


def test_bad_model_files_name_the_file_and_what_was_expected(models, tmp_path):
    """Issue 10, item 12: empty, truncated, 3D-for-2D and wrong-size weights."""
    from custom_components.networks.weights import load_weights

    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"generator_channels": [4, 8, 16, 16], "device": "cpu"})
    net = parser.get_parsed_content("network_def")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"generator weights '{empty}' are an empty file"):
        load_weights(net, empty)
    cut = tmp_path / "cut.pt"
    cut.write_bytes((models / "model.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match=f"'{cut}' \\(500 bytes\\) cannot be loaded, the file is truncated"):
        load_weights(net, cut)
    parser.update({"spatial_dims": 3})
    torch.save(parser.get_parsed_content("network_def", instantiate=True, lazy=False).state_dict(), tmp_path / "3d.pt")
    with pytest.raises(ValueError, match="hold a 3D model, but the config builds a 2D network: use --spatial_dims 3"):
        load_weights(net, tmp_path / "3d.pt")
    parser.update({"spatial_dims": 2, "generator_channels": [8, 8, 16, 16]})
    torch.save(parser.get_parsed_content("network_def", lazy=False).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"tensor\(s\) of another shape .*--generator_channels"):
        load_weights(net, tmp_path / "wide.pt")
    load_weights(net, models / "model.pt")


@pytest.mark.slow
def test_shipped_demo_weights_synthesise_a_phantom_volume_right_after_a_clone(tmp_path):
    """Issue 11: bundle/models/ holds committed demo weights; inference.json uses them with no --model_dir, and the
    synthetic T2 of a phantom subject is far closer to its real T2 than the T1 source is (a trained model)."""
    from custom_components.apps.phantom_dataset import ensure_phantom

    assert (ROOT / "bundle" / "models" / "model.pt").is_file()
    assert (ROOT / "bundle" / "models" / "error_head.pt").is_file()  # the QA map's network
    data = tmp_path / "phantom"
    ensure_phantom(data, task="t1t2", n_train=1, n_val=1, n_test=1, seed=123)
    item = json.loads((data / "datalist.json").read_text())["test"][0]
    _bundle("run", "inferring", "--config_file", CONFIG, "--input", data / "datalist.json", "--output_dir",
            tmp_path / "out")
    out = sorted((tmp_path / "out").rglob("*_synthetic.nii.gz"))
    assert len(out) == 1 and len(list((tmp_path / "out").rglob("*_confidence.nii.gz"))) == 1
    synth, target = nib.load(out[0]), nib.load(data / item["target"])
    assert synth.shape == target.shape and np.allclose(synth.affine, target.affine, atol=1e-4)
    # the target on the network's scale (the pipeline's window: 0.5/99.5 percentiles of the voxels > 0)
    t = target.get_fdata()
    lo, hi = np.percentile(t[t > 0], [0.5, 99.5])
    y = np.clip((t - lo) / (hi - lo), 0, 1)
    s, mask = synth.get_fdata(), nib.load(data / item["mask"]).get_fdata() > 0
    psnr = -10 * np.log10(np.mean((s - y) ** 2))
    mae, mae_constant = np.abs(s - y)[mask].mean(), np.abs(y[mask] - np.median(y[mask])).mean()
    # an untrained model is far below both bounds (the shipped error_weighted weights: see the measured values in
    # the assertion message when it fails)
    assert psnr > 19 and mae < 0.75 * mae_constant, (psnr, mae, mae_constant)


def test_unwritable_output_folder_is_named_before_any_work(models, tmp_path):
    """An --output_dir that cannot be created (below a regular file; chmod does not stop root) stops inference up
    front with one plain message naming the option and the folder, not a traceback from the image writer."""
    src = tmp_path / "in" / "scan.nii.gz"
    src.parent.mkdir()
    _volume(src)
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    proc = _bundle("run", "inferring", "--config_file", CONFIG, "--input", src.parent, "--model_dir", models,
                   "--output_dir", blocker / "sub", *SMALL, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ERROR (PermissionError): output folder check failed before inference" in log
    assert f"--output_dir '{blocker / 'sub'}' cannot be written" in log
    assert "Traceback" not in log


def test_an_error_head_in_the_model_folder_writes_its_qa_map(models, tmp_path):
    """With error_head.pt beside the weights, the map written is 1 - the head's predicted error, not D2's M."""
    from custom_components.transforms.confidence import ConfidenceMapd
    from custom_components.networks.nets import ErrorPredictor

    with_head = tmp_path / "models"
    with_head.mkdir()
    for f in ("model.pt", "local_discriminator.pt"):
        (with_head / f).write_bytes((models / f).read_bytes())
    torch.manual_seed(3)
    head = ErrorPredictor(2, channels=(4, 4, 8, 8), stem_stride=2)
    torch.save(head.state_dict(), with_head / "error_head.pt")
    inp = tmp_path / "in" / "case01"
    inp.mkdir(parents=True)
    _volume(inp / "t1.nii.gz", shape=(32, 32, 4))
    maps = {}
    for name, folder in (("d2", models), ("head", with_head)):
        _bundle("run", "inferring", "--config_file", CONFIG, "--input", tmp_path / "in", "--model_dir", folder,
                "--output_dir", tmp_path / name, *SMALL, "--error_head_channels", "[4,4,8,8]")
        maps[name] = nib.load(tmp_path / name / "case01" / "t1_confidence.nii.gz").get_fdata()
    assert maps["head"].shape == maps["d2"].shape and not np.allclose(maps["head"], maps["d2"])
    assert maps["head"].min() >= 0 and maps["head"].max() <= 1
    # the same numbers as the head applied through the bundle's transform
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"generator_channels": [4, 8, 16, 16], "local_channels": [4, 4, 8, 8], "patch_size": [32, 32],
                   "error_head_channels": [4, 4, 8, 8], "model_dir": str(with_head), "device": "cpu"})
    transform = parser.get_parsed_content("confidence_map")
    assert isinstance(transform, ConfidenceMapd) and transform.activation == "error"
    assert isinstance(transform.network, ErrorPredictor)
