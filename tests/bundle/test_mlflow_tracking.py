"""`run training --tracking ...` records a complete MLflow run (slow: two short trainings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra: pip install -c constraints.txt .[tracking]")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EPOCHS, ITERATIONS_PER_EPOCH = 2, 2  # 2 training subjects, batch_size 1
LOSS_TERMS = ["loss", "loss_recon", "loss_adv_global", "loss_adv_local", "loss_global_critic", "gradient_penalty",
              "wasserstein", "loss_local_discriminator", "confidence_mean", "attention_mean"]
PARAMS = {"variant": "dual_attention", "beta": "2.0", "p": "1", "lambda_adv_local": "0.05", "n_critic": "1",
          "lr_g": "0.001", "lr_global_critic": "0.0002", "lr_local_discriminator": "0.0002", "lambda_adv_global": "0.001", "seed": "0"}




def _train(phantom: Path, root: Path, tracking: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json",
           "--meta_file", "bundle/configs/metadata.json", "--logging_file", "bundle/configs/logging.conf",
           "--tracking", tracking, "--bundle_root", str(root), "--dataset_dir", str(phantom), "--make_phantom", "false", "--variant", "dual_attention", "--adversarial_warmup", "0", "--attention_warmup", "0",
           "--epochs", str(EPOCHS), "--val_interval", "1", "--patch_size", "[32,32]",
           "--generator_channels", "[8,16,32,64]", "--batch_size", "1", "--samples_per_volume", "2", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _only_run(uri: str, experiment: str):
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_stock_mlflow_settings_record_a_finished_run(phantom, tmp_path):
    """MONAI's own `--tracking mlflow`: loss per iteration, validation metrics, parameters, config and best model."""
    _train(phantom, tmp_path, "mlflow")
    run_dir = tmp_path / "runs" / "dual_attention"
    uri = f"sqlite:///{run_dir / 'mlruns.db'}"
    client, run = _only_run(uri, "monai_experiment")
    assert run.info.status == "FINISHED"
    assert {k: run.data.params.get(k) for k in PARAMS} == PARAMS
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, EPOCHS * ITERATIONS_PER_EPOCH + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == [1, 2]
    artifacts = _artifacts(client, run.info.run_id)
    assert "model.pt" in artifacts and "local_discriminator.pt" in artifacts
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts


def test_shipped_settings_record_every_loss_term(phantom, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _train(phantom, tmp_path, "bundle/configs/mlflow_settings.json", "--tracking_uri", uri)
    client, run = _only_run(uri, "dual_attention_synthesis")
    assert run.info.status == "FINISHED" and run.info.run_name == "dual_attention_seed0"
    assert {k: run.data.params.get(k) for k in PARAMS} == PARAMS
    gp_interval = json.loads((ROOT / "bundle" / "configs" / "train.json").read_text())["gp_interval"]
    for term in LOSS_TERMS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, term)]
        every = gp_interval if term == "gradient_penalty" else 1  # the lazy penalty is computed (and logged) every k
        assert steps == list(range(every, EPOCHS * ITERATIONS_PER_EPOCH + 1, every)), term
    for metric in ("val_psnr", "val_ssim", "val_mae", "val_psnr_tumour"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    artifacts = _artifacts(client, run.info.run_id)
    assert {"model.pt", "local_discriminator.pt"} <= set(artifacts)
    assert any(a.startswith("config_") for a in artifacts), artifacts
