from __future__ import annotations

import json
import os

import pytest
import torch
from ignite.engine import Engine, Events

from custom_components.handlers.checkpointing import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    BestMetricState,
    ResumeError,
    ResumeLoader,
    latest_checkpoint,
    record_run,
)


def _trainer_ckpt(path, iteration, epoch):
    torch.save({"trainer": {"iteration": iteration, "epoch_length": iteration // epoch, "max_epochs": 9}}, path)


def test_latest_checkpoint_is_chosen_by_stored_iteration_not_file_time(tmp_path):
    for epoch in (1, 2, 3):
        _trainer_ckpt(tmp_path / f"checkpoint_epoch={epoch}.pt", 2 * epoch, epoch)
    _trainer_ckpt(tmp_path / "checkpoint_final.pt", 6, 3)
    for i, name in enumerate(["checkpoint_final.pt", "checkpoint_epoch=3.pt", "checkpoint_epoch=2.pt",
                              "checkpoint_epoch=1.pt"]):  # a copy reordered the times: epoch 1 looks newest
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=3.pt")
    (tmp_path / "checkpoint_epoch=9.pt").write_bytes(b"truncated")  # unreadable files are skipped
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=3.pt")


def test_keep_last_n_holds_across_resumes(tmp_path):
    for epoch in (1, 2, 5, 6):  # left by earlier resumes that did not know about each other
        _trainer_ckpt(tmp_path / f"checkpoint_epoch={epoch}.pt", 2 * epoch, epoch)
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(str(tmp_path), {"net": net, "trainer": engine}, save_interval=1, n_saved=2)
    loader = ResumeLoader(tmp_path, {"net": net, "trainer": engine}, saver=saver)
    loader._restore_interval_record()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=5.pt",
                                                                              "checkpoint_epoch=6.pt"]
    saver.attach(engine)
    engine.state.epoch, engine.state.iteration = 6, 12
    engine.run([0, 0], max_epochs=7)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=6.pt",
                                                                              "checkpoint_epoch=7.pt"]


def _evaluator_with_scores(scores):
    ev = Engine(lambda e, b: None)
    ev.state.best_metric, ev.state.best_metric_epoch = -1, -1

    @ev.on(Events.EPOCH_COMPLETED)
    def _score(engine):
        value = scores[engine.state.epoch - 1]
        engine.state.metrics["val_psnr"] = value
        if value > engine.state.best_metric:
            engine.state.best_metric, engine.state.best_metric_epoch = value, engine.state.epoch

    return ev


def test_best_metric_and_best_model_survive_a_resume(tmp_path):
    net = torch.nn.Linear(2, 1)
    ev = _evaluator_with_scores([12.368])
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_psnr",
                                  key_metric_filename="model.pt")
    saver.attach(ev)
    ev.run([0], max_epochs=1)
    state = BestMetricState(ev, [saver]).state_dict()
    torch.save({"best_metric": state}, tmp_path / "ckpt.pt")
    best_bytes = (tmp_path / "model.pt").read_bytes()

    # resumed process: new objects, state read back with weights_only=True
    torch.nn.init.constant_(net.weight, 5.0)
    ev2 = _evaluator_with_scores([12.178, 12.5])
    saver2 = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_psnr",
                                   key_metric_filename="model.pt")
    saver2.attach(ev2)
    BestMetricState(ev2, [saver2]).load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["best_metric"])
    assert ev2.state.best_metric == pytest.approx(12.368) and ev2.state.best_metric_epoch == 1
    ev2.run([0], max_epochs=1)
    assert (tmp_path / "model.pt").read_bytes() == best_bytes  # 12.178 is worse: the best model is kept
    ev2.run([0], max_epochs=2)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].eq(5.0).all()  # 12.5 is better


def test_failed_run_writes_no_final_checkpoint_and_keeps_epoch_checkpoints(tmp_path):
    net = torch.nn.Linear(2, 1)

    def step(engine, batch):
        if engine.state.iteration == 5:
            with torch.no_grad():
                net.weight.fill_(float("nan"))
            raise FloatingPointError("diverged")

    engine = Engine(step)
    AtomicCheckpointSaver(str(tmp_path), {"net": net, "trainer": engine}, save_interval=1, n_saved=2,
                          save_final=True, final_filename="checkpoint_final.pt").attach(engine)
    with pytest.raises(FloatingPointError):
        engine.run([0, 0], max_epochs=4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    state = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)
    assert torch.isfinite(state["net"]["weight"]).all() and state["trainer"]["iteration"] == 4


def test_interrupted_save_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    saver = AtomicDiskSaver(tmp_path, "model.pt")
    saver({"w": torch.ones(3)}, "ignored.pt")
    saver.remove("ignored.pt")  # ignite removes the old best before saving the new one: must be a no-op
    assert (tmp_path / "model.pt").is_file()

    def killed(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        saver({"w": torch.zeros(3)}, "ignored.pt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "model.pt", weights_only=True)["w"].eq(1).all()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_resume_with_changed_options_is_refused_listing_them_or_applied(tmp_path):
    options = {"lr_g": 0.001, "beta": 2.0, "epochs": 4}
    record_run(tmp_path, options)
    _trainer_ckpt(tmp_path / "checkpoint_epoch=2.pt", 4, 2)
    record_run(tmp_path, dict(options, epochs=6), resume=True, epochs=6)  # more epochs: fine
    with pytest.raises(ResumeError) as e:
        record_run(tmp_path, dict(options, lr_g=1e6, beta=1.0), resume=True, epochs=6)
    assert "2 option(s) differ" in str(e.value) and "lr_g: 0.001" in str(e.value) and "1000000.0 now" in str(e.value)
    assert "beta: 2.0" in str(e.value) and "--apply_changes true" in str(e.value)
    changes = record_run(tmp_path, dict(options, lr_g=1e-4), resume=True, apply_changes=True, epochs=6)
    assert changes == ["lr_g: 0.001 in the checkpointed run, 0.0001 now"]
    history = json.loads((tmp_path / "run_config.json").read_text())
    assert [h["options"]["lr_g"] for h in history] == [0.001, 0.001, 0.0001]
    assert history[-1]["resumed_from"] == {"file": "checkpoint_epoch=2.pt", "iteration": 4, "epoch": 2}
    with pytest.raises(ResumeError, match="at epoch 2, and --epochs is 2: the run is finished"):
        record_run(tmp_path, options, resume=True, epochs=2)


def test_resume_with_the_same_options_written_another_way_is_not_a_change(tmp_path):
    """The record holds each training option as TrainingOptions stores it: ``--local_conditional false`` (text), a
    ``beta`` of 2 (an int) and ``variant`` as text compare equal to the recorded False, 2.0 and enum value."""
    record_run(tmp_path, {"local_conditional": False, "beta": 2.0, "variant": "dual_attention", "epochs": 4})
    _trainer_ckpt(tmp_path / "checkpoint_epoch=2.pt", 4, 2)
    again = {"local_conditional": "false", "beta": 2, "variant": "dual_attention", "epochs": 4}
    assert record_run(tmp_path, again, resume=True, epochs=6) == []
    history = json.loads((tmp_path / "run_config.json").read_text())
    assert history[-1]["options"]["local_conditional"] is False and history[-1]["options"]["beta"] == 2.0
    with pytest.raises(ResumeError, match="local_conditional: False in the checkpointed run, True now"):
        record_run(tmp_path, dict(again, local_conditional="true"), resume=True, epochs=6)


def test_a_run_recorded_under_the_names_before_the_rename_resumes(tmp_path):
    """0.4.0 renamed lr_d2 and betas_d1 (one name per network): a checkpointed run recorded under the old names is
    not refused for options it did not change."""
    record_run(tmp_path, {"lr_d2": 0.0002, "betas_d1": [0.5, 0.999], "epochs": 4})
    _trainer_ckpt(tmp_path / "checkpoint_epoch=2.pt", 4, 2)
    now = {"lr_local_discriminator": 0.0002, "betas_global_critic": [0.5, 0.999], "epochs": 4}
    assert record_run(tmp_path, now, resume=True, epochs=6) == []
    with pytest.raises(ResumeError, match="lr_local_discriminator: 0.0002 in the checkpointed run, 0.001 now"):
        record_run(tmp_path, dict(now, lr_local_discriminator=0.001), resume=True, epochs=6)


def test_apply_changes_sets_the_new_learning_rate_on_the_restored_optimizer(tmp_path):
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration, engine.state.max_epochs, engine.state.epoch_length = 1, 2, 1, 2
    old_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    torch.save({"net": net.state_dict(), "opt": old_opt.state_dict(), "trainer": engine.state_dict()},
               tmp_path / "checkpoint_epoch=1.pt")
    new_opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    engine2 = Engine(lambda e, b: None)
    engine2.state.max_epochs = 3
    ResumeLoader(tmp_path, {"net": net, "opt": new_opt, "trainer": engine2})(engine2)
    assert new_opt.param_groups[0]["lr"] == 1e-3  # restored as checkpointed
    ResumeLoader(tmp_path, {"net": net, "opt": new_opt, "trainer": engine2}, apply_changes=True)(engine2)
    assert new_opt.param_groups[0]["lr"] == 1e-5 and engine2.state.epoch == 1


def _change_bytes_inside(path, record_suffix="data/0"):
    """Overwrite 16 bytes in the middle of one tensor record of a torch.save file, as a bad disk or copy would."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    data[start:start + 16] = bytes(255 - b for b in data[start:start + 16])
    path.write_bytes(bytes(data))


def test_a_checkpoint_whose_bytes_changed_is_ignored_and_the_previous_one_resumed(tmp_path, caplog):
    """Issue 17, item 13: a checkpoint with random bytes in the middle loaded without complaint (loss_global_critic nan)."""
    import logging

    from custom_components.handlers.checkpointing import checkpoint_iterations, verify_checksums

    saver = AtomicDiskSaver(tmp_path)
    for epoch in (1, 2):
        saver({"trainer": {"iteration": 2 * epoch, "epoch": epoch, "epoch_length": 2},
               "generator": {"w": torch.full((4096,), float(epoch))}}, f"checkpoint_epoch={epoch}.pt")
    latest = tmp_path / "checkpoint_epoch=2.pt"
    assert verify_checksums(latest) is None
    _change_bytes_inside(latest)
    torch.load(latest, weights_only=True)  # PyTorch itself loads it without a word
    assert "does not match the CRC-32 checksum" in verify_checksums(latest)
    with caplog.at_level(logging.WARNING, logger="custom_components.handlers.checkpointing"):
        assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=1.pt")  # falls back, as for a truncated one
    assert f"checkpoint {latest} is damaged and is ignored" in caplog.text
    assert [e for _, e, _ in checkpoint_iterations(tmp_path)] == [1]


def test_damaged_weights_are_named_at_inference(tmp_path):
    from custom_components.networks.weights import load_weights

    net = torch.nn.Linear(64, 64)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    _change_bytes_inside(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model.pt' \(\d+ bytes\) are damaged: record .* does not match the CRC-32"):
        load_weights(torch.nn.Linear(64, 64), tmp_path / "model.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_gpu_is_not_blamed_on_the_weight_file(tmp_path):
    """Issue 17, item 13: inference with --device cuda said the weights were truncated."""
    from custom_components.networks.weights import load_weights

    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="--device cuda: this machine has no usable GPU") as e:
        load_weights(torch.nn.Linear(2, 2), tmp_path / "model.pt", device="cuda")
    assert "truncated" not in str(e.value)


def test_a_full_disk_during_a_save_is_one_plain_error_naming_the_file_and_nothing_is_lost(tmp_path, monkeypatch):
    """Issue 17, item 14: disk full during a checkpoint ended in a 142-line traceback and no plain ERROR line."""
    import errno

    from custom_components.handlers.checkpointing import CheckpointWriteError
    from custom_components.utils.errors import format_project_error

    saver = AtomicDiskSaver(tmp_path)
    saver({"w": torch.ones(3)}, "checkpoint_epoch=1.pt")
    real = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"the first half of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as e:
        saver({"w": torch.zeros(3)}, "checkpoint_epoch=2.pt")
    monkeypatch.setattr(torch, "save", real)
    path = tmp_path / "checkpoint_epoch=2.pt"
    assert str(e.value).startswith(f"could not write {path} (the disk is full; ")
    assert "Nothing was lost" in str(e.value) and "--resume true" in str(e.value)
    report = format_project_error(e.value)
    assert report.startswith("ERROR (CheckpointWriteError): could not write ") and report.count("\n") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]  # no partial file, old one kept
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["w"].eq(1).all()
    # a failure without an errno (PyTorch's zip writer) still names the file and the folder
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(
        "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")))
    with pytest.raises(CheckpointWriteError, match=r"\(the write failed: is the disk full\?; .* MiB free in "):
        AtomicDiskSaver(tmp_path, "model.pt")({"w": torch.zeros(3)}, "x.pt")
