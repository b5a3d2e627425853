"""with_tracking: MONAI's MLFlowHandler on an engine whose output is one dict per batch (no model needed)."""

from __future__ import annotations

import pytest
from ignite.engine import Engine
from monai.handlers import StatsHandler, from_engine

from custom_components.handlers.training import loss_terms
from custom_components.utils.tracking import as_decollated, with_tracking

mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra")


def _engine() -> Engine:
    def step(engine, batch):  # the shape of DualAttentionTrainer's output: float terms and a tensor
        return {"loss": 0.5 + engine.state.iteration, "loss_recon": 0.25, "pred": [1, 2], "confidence_mean": 0.3}

    return Engine(step)


def test_decollated_form_is_what_the_stock_settings_read():
    out = {"loss": 1.0, "loss_recon": 0.5, "pred": object()}
    assert from_engine(["loss"], first=True)(as_decollated(out)) == 1.0
    assert as_decollated([out]) == [out]


@pytest.mark.parametrize("transform,metrics", [
    (from_engine(["loss"], first=True), {"train_loss"}),  # MONAI's stock settings
    (loss_terms, {"loss", "loss_recon", "confidence_mean"}),  # the bundle's settings
])
def test_stock_and_shipped_transforms_log_every_iteration_params_and_artifacts(tmp_path, transform, metrics):
    from monai.handlers import MLFlowHandler

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"weights")
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="t", iteration_log=True, epoch_log=False,
                            tag_name="train_loss", output_transform=transform, close_on_complete=True)
    engine = _engine()
    other = StatsHandler(iteration_log=False)
    handlers = with_tracking([other, handler], {"variant": "dual_attention", "beta": 2.0}, [str(tmp_path / "models")])
    assert handlers[0] is other
    for h in handlers:
        h.attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED"
    assert {k: run.data.params.get(k) for k in ("variant", "beta")} == {"variant": "dual_attention", "beta": "2.0"}
    assert set(run.data.metrics) == metrics
    first = sorted(metrics)[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, first)] == [1, 2, 3]
    if "train_loss" in metrics:
        assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.5, 2.5, 3.5]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.pt"]
