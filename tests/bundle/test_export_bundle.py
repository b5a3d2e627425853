"""The release made by scripts/export_bundle.py passes the model-zoo checks and runs on its own."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from custom_components.config.paths import config_files
from custom_components.apps.phantom_dataset import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT.parent / "shared" / "monai-schema" / "meta_schema_20240725.json"
REQUIRED_FILES = ["configs/metadata.json", "configs/train.json", "configs/inference.json", "models/model.pt",
                  "docs/README.md", "LICENSE"]
INFERENCE_CONFIGS = "configs/inference.json"  # --config_file of the release's inference: the one file, as the zoo runs it
TINY_PHANTOM = {"task": "t1t2", "n_train": 1, "n_val": 1, "n_test": 1, "shape": [32, 32, 32], "seed": 2}

_spec = importlib.util.spec_from_file_location("export_bundle", ROOT / "scripts" / "export_bundle.py")
export_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_bundle)


def _networks(bundle: Path, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "infer"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", "save_confidence": True})
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("local_discriminator")


def _fake_run(run_dir: Path, bundle: Path) -> None:
    """What a training run leaves that `promote` reads: models/*.pt and TensorBoard validation scalars."""
    from torch.utils.tensorboard import SummaryWriter

    (run_dir / "models").mkdir(parents=True)
    generator, local_d = _networks(bundle, seed=1)
    torch.save(generator.state_dict(), run_dir / "models" / "model.pt")
    torch.save(local_d.state_dict(), run_dir / "models" / "local_discriminator.pt")
    writer = SummaryWriter(str(run_dir))
    for epoch, psnr, ssim in ((5, 12.0, 0.3), (10, 18.5, 0.61), (15, 17.0, 0.64)):
        writer.add_scalar("val_psnr", psnr, epoch)
        writer.add_scalar("val_ssim", ssim, epoch)
        writer.add_scalar("train_loss", 1.0, epoch)
    writer.close()


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory) -> Path:
    """A copy of bundle/ with the weights and metrics of a (fake) run promoted into it."""
    bundle = tmp_path_factory.mktemp("src") / "bundle"
    shutil.copytree(ROOT / "bundle", bundle, ignore=shutil.ignore_patterns("runs", "eval", "data", "*.pt", "*.ts", "inference"))
    run = bundle.parent / "run"
    _fake_run(run, bundle)
    export_bundle.promote(str(run), bundle_dir=str(bundle))
    return bundle


@pytest.fixture(scope="module")
def release(source_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release")
    zip_path = Path(export_bundle.export(str(out), bundle_dir=str(source_bundle)))
    version = json.loads((Path(source_bundle) / "configs" / "metadata.json").read_text())["version"]
    assert zip_path.name == f"dual_attention_synthesis_v{version}.zip"
    return zip_path


def test_promote_records_the_best_epoch_and_never_overwrites(source_bundle):
    meta = json.loads((source_bundle / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == {"val_psnr": 18.5, "val_ssim": 0.61, "best_epoch": 10}
    with pytest.raises(FileExistsError, match="model.pt"):
        export_bundle.promote(str(source_bundle.parent / "run"), bundle_dir=str(source_bundle))


def test_release_holds_the_model_zoo_files_and_the_runtime_package(release):
    with zipfile.ZipFile(release) as z:
        names = set(z.namelist())
    top = "dual_attention_synthesis/"
    assert [f for f in REQUIRED_FILES if top + f not in names] == []
    package = {n[len(top):] for n in names if n.startswith(top + "custom_components/") and n.endswith(".py")}
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "custom_components").rglob("*.py")}
    assert package == source  # every group whole: a group's __init__ imports all of its modules
    assert all(n.startswith(top) for n in names)


def test_metadata_names_only_packages_an_index_has_and_covers_the_runtime_imports(release):
    folder = release.parent / "dual_attention_synthesis"
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    required = {k.lower() for k in meta["required_packages_version"]}
    assert "dual-attention-synthesis" not in required
    import_names = {"pytorch-ignite": "ignite", "simpleitk": "SimpleITK"}
    available = {import_names.get(p, p) for p in required} | {"torch", "monai", "numpy"}
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for file in (folder / "custom_components").rglob("*.py"):
        tree = ast.parse(file.read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
        for node in ast.walk(tree):
            if id(node) in optional:  # `try: import x / except ImportError`: an optional extra
                continue
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - stdlib - {"custom_components"}
    assert sorted(third_party - available) == []


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"offline schema not found at {SCHEMA}")
def test_release_metadata_verifies_against_the_schema(release):
    folder = release.parent / "dual_attention_synthesis"
    out = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                          "configs/metadata.json", "--filepath", str(SCHEMA)], cwd=folder, capture_output=True,
                         text=True, timeout=600)
    assert "metadata is verified with no error" in out.stdout + out.stderr, out.stdout + out.stderr


def test_release_net_in_out_and_torchscript_export_match_eager(release, tmp_path):
    folder = release.parent / "dual_attention_synthesis"
    for args in (["verify_net_in_out", "network_def", "--config_file", INFERENCE_CONFIGS],
                 ["ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"),
                  "--config_file", INFERENCE_CONFIGS]):
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args, "--meta_file", "configs/metadata.json"],
                              cwd=folder, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    eager, _ = _networks(folder)
    eager.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    eager.eval()
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(2, 1, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["repository", "bundle", "release"])
def test_properties_complete_and_bundle_root_follows_the_configs(where, release, tmp_path, monkeypatch):
    folder = {"repository": ROOT / "bundle", "bundle": ROOT / "bundle",
              "release": release.parent / "dual_attention_synthesis"}[where]
    monkeypatch.chdir(ROOT if where == "repository" else folder)
    configs = os.path.relpath(folder / "configs")
    data = tmp_path / "data"
    train = ConfigWorkflow(config_file=f"{configs}/train.json", meta_file=f"{configs}/metadata.json",
                           logging_file=False, workflow_type="train", dataset_dir=str(data), phantom=TINY_PHANTOM,
                           output_dir=str(tmp_path / "run"), cache_rate=0.0)
    train.initialize()
    assert train.check_properties() == []
    assert Path(train.bundle_root) == folder.resolve()
    assert Path(train.parser.get_parsed_content("model_dir")) == tmp_path / "run" / "models"
    infer = ConfigWorkflow(config_file=f"{configs}/inference.json",
                           meta_file=f"{configs}/metadata.json",
                           logging_file=False, workflow_type="infer", dataset_dir=str(data),
                           output_dir=str(tmp_path / "out"))
    assert infer.parser["model_dir"] == "$@bundle_root + '/models'"  # the shipped weights, wherever the bundle is
    infer.parser["model_dir"] = str(release.parent / "dual_attention_synthesis" / "models")  # weights to parse with
    infer.initialize()
    assert infer.check_properties() == []
    assert Path(infer.bundle_root) == folder.resolve()
    default_data = ConfigParser.load_config_file(str(folder / "configs" / "train.json"))
    parser = ConfigParser(default_data)
    parser["bundle_root"] = str(folder.resolve())
    expected = (ROOT / "data" if where != "release" else folder.resolve() / "data") / "phantom_t1t2"
    assert Path(parser.get_parsed_content("dataset_dir")) == expected


def test_export_refuses_missing_or_mismatched_weights_and_existing_zips(source_bundle, release, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(source_bundle, bundle)
    with pytest.raises(FileExistsError, match=r"dual_attention_synthesis"):
        export_bundle.export(str(release.parent), bundle_dir=str(source_bundle))
    assert export_bundle.export(str(release.parent), bundle_dir=str(source_bundle), overwrite=True) == str(release)
    (bundle / "models" / "local_discriminator.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"local_discriminator\.pt cannot be read"):
        export_bundle.export(str(tmp_path / "out"), bundle_dir=str(bundle))
    (bundle / "models" / "local_discriminator.pt").unlink()
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, bundle / "models" / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt does not match the config's 'network_def'"):
        export_bundle.export(str(tmp_path / "out"), bundle_dir=str(bundle))
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"models/model\.pt does not exist"):
        export_bundle.export(str(tmp_path / "out"), bundle_dir=str(bundle))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unzipped_release_runs_inference_without_the_repository(release, tmp_path):
    """`run inferring` from inside an unzipped release, with the project's package not installed.

    ``python -S`` skips site initialisation, so the editable install's import hook (a .pth file) is not loaded;
    the venv's site-packages are given as a plain path for torch, monai and the other required packages. The only
    ``custom_components`` on the path is then the release's own copy (found from the working directory).
    """
    with zipfile.ZipFile(release) as z:
        z.extractall(tmp_path)
    folder = tmp_path / "dual_attention_synthesis"
    ensure_phantom(folder / "data" / "phantom_t1t2", **TINY_PHANTOM)  # the inference config's default input
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    which = subprocess.run([sys.executable, "-S", "-c", "import custom_components; print(custom_components.__file__)"],
                           cwd=folder, env=env, capture_output=True, text=True)
    assert Path(which.stdout.strip()).parent == folder / "custom_components", which.stderr
    assert subprocess.run([sys.executable, "-S", "-c", "import custom_components"], cwd=tmp_path, env=env,
                          capture_output=True).returncode != 0  # not importable from anywhere else
    proc = subprocess.run([sys.executable, "-S", "-m", "monai.bundle", "run", "inferring", "--config_file",
                           INFERENCE_CONFIGS, "--input", "data/phantom_t1t2/datalist.json"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = folder / "inference"
    summary = json.loads((outputs / "inference_summary.json").read_text())
    assert summary["failed"] == [] and len(summary["synthesised"]) == 1
    datalist = json.loads((folder / "data" / "phantom_t1t2" / "datalist.json").read_text())
    source = Path(datalist["test"][0]["source"])
    src = nib.load(folder / "data" / "phantom_t1t2" / source)
    for postfix in ("synthetic", "confidence"):
        out = nib.load(outputs / source.parent / f"{source.name[:-len('.nii.gz')]}_{postfix}.nii.gz")
        assert out.shape == src.shape and out.get_data_dtype() == np.float32
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
        assert np.isfinite(out.get_fdata()).all()


@pytest.mark.slow
def test_project_builds_as_a_wheel_with_the_runtime_modules(tmp_path):
    # built from a copy of the project's files: setuptools leaves build/lib behind in the folder it builds in, and a
    # later build there packs modules that no longer exist (it did, after the package was regrouped)
    source_dir = tmp_path / "project"
    shutil.copytree(ROOT / "custom_components", source_dir / "custom_components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source_dir / name)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(source_dir)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("dual_attention_synthesis-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "custom_components").rglob("*.py")}
    assert {n for n in names if n.startswith("custom_components/")} == source  # every group, subpackages included
    assert not any(n.startswith(("tests/", "bundle/")) for n in names)


def test_an_export_killed_while_zipping_leaves_nothing_under_a_final_name(source_bundle, tmp_path, monkeypatch):
    """A kill during the zip left an invalid zip under its final name and the rerun refused ("already exists")."""
    real = shutil.make_archive

    def killed(base_name, *args, **kwargs):
        Path(base_name + ".zip").write_bytes(b"PK\x03\x04 half a zip")  # what a killed zip writer leaves
        raise KeyboardInterrupt("killed while zipping")

    monkeypatch.setattr(export_bundle.shutil, "make_archive", killed)
    with pytest.raises(KeyboardInterrupt):
        export_bundle.export(str(tmp_path), bundle_dir=str(source_bundle))
    meta = json.loads((source_bundle / "configs" / "metadata.json").read_text())
    final = [tmp_path / meta["name"], tmp_path / f"{meta['name']}_v{meta['version']}.zip"]
    assert not any(p.exists() for p in final)
    monkeypatch.setattr(export_bundle.shutil, "make_archive", real)
    made = Path(export_bundle.export(str(tmp_path), bundle_dir=str(source_bundle)))  # the rerun completes
    assert made == final[1] and zipfile.ZipFile(made).testzip() is None and final[0].is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
