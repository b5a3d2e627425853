"""`scripts/export_bundle.py promote` reads only the current run of a run folder (issue 17, item 3)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.config.paths import config_files

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("export_bundle", ROOT / "scripts" / "export_bundle.py")
export_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_bundle)


def _events(run_dir: Path, created: float, scalars: dict[str, list[tuple[int, float]]]) -> Path:
    """A TensorBoard event file named as if created at unix time ``created``."""
    from torch.utils.tensorboard import SummaryWriter

    tmp = run_dir / f"tmp{int(created)}"
    writer = SummaryWriter(str(tmp))
    for tag, values in scalars.items():
        for step, value in values:
            writer.add_scalar(tag, value, step)
    writer.close()
    (src,) = tmp.glob("events.out.tfevents.*")
    parts = src.name.split(".")
    parts[3] = str(int(created))
    dst = run_dir / ".".join(parts)
    shutil.move(src, dst)
    tmp.rmdir()
    return dst


@pytest.fixture
def bundle(tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundle", out, ignore=shutil.ignore_patterns("runs", "eval", "data", "inference", "*.pt"))
    (out / "models").mkdir(exist_ok=True)
    return out


def _weights(bundle: Path, run: Path) -> None:
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "infer"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", "save_confidence": True})
    (run / "models").mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), run / "models" / "model.pt")
    return parser


def test_promote_reads_only_the_current_runs_events_and_refuses_an_earlier_runs_weights(bundle, tmp_path):
    run = tmp_path / "run"
    parser = _weights(bundle, run)
    now = time.time()
    # an earlier dual_attention run into the same folder: its events and its discriminator are still there
    _events(run, now - 3600, {"val_psnr": [(5, 30.0)], "val_local_qa_auroc": [(5, 0.9)]})
    stale = run / "models" / "local_discriminator.pt"
    torch.save(parser.get_parsed_content("local_discriminator").state_dict(), stale)
    os.utime(stale, (now - 3600, now - 3600))
    (run / "checkpoints").mkdir()
    started = datetime.datetime.fromtimestamp(now - 60).isoformat(timespec="seconds")
    (run / "checkpoints" / "run_config.json").write_text(json.dumps([
        {"started": started, "options": {"variant": "unet"}},
        {"started": datetime.datetime.fromtimestamp(now - 10).isoformat(timespec="seconds"), "options": {},
         "resumed_from": {"file": "checkpoint_epoch=2.pt", "iteration": 4, "epoch": 2}}]))
    _events(run, now - 50, {"val_psnr": [(1, 12.0), (2, 14.0)]})
    _events(run, now - 5, {"val_psnr": [(3, 13.0)]})  # written after the resume: same run
    with pytest.raises(ValueError, match=r"local_discriminator.pt: written before the current run .* started"):
        export_bundle.promote(str(run), bundle_dir=str(bundle))
    assert not (bundle / "models" / "model.pt").exists()  # nothing promoted
    stale.unlink()
    metrics = export_bundle.promote(str(run), bundle_dir=str(bundle))
    assert metrics == {"val_psnr": 14.0, "best_epoch": 2}  # not the earlier run's 30 dB, nor its val_local_qa
    assert sorted(p.name for p in (bundle / "models").glob("*.pt")) == ["model.pt"]


def test_a_run_without_a_record_is_read_whole(bundle, tmp_path, capsys):
    run = tmp_path / "old_run"
    _weights(bundle, run)
    _events(run, time.time() - 100, {"val_psnr": [(1, 11.0)]})
    assert export_bundle.promote(str(run), bundle_dir=str(bundle))["val_psnr"] == 11.0
    assert "run_config.json does not exist" in capsys.readouterr().out
