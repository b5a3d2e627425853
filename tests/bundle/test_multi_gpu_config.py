"""train.json + multi_gpu_train.json run by ``torchrun`` in two CPU processes (gloo): what each rank does.

One short DDP run of ``monai.bundle run training`` is shared by the tests below. An extra overlay attaches
:class:`rank_probe.RankProbe`, which records on each rank the subjects it trained and validated on, its learning rate
at each iteration, the files it saved and the networks its engines run. The tests check the behaviour the overlay
exists for: the ranks train on disjoint shards and end with identical weights, every rank runs the handlers that
change its own training (validation, learning-rate schedule, error-weighted sampling), only rank 0 logs, shows a
progress bar and writes files, the trainer's DDP wrapper holds the pre-trained generator that the evaluator runs
bare and whose weights load into inference.json's network, and train.json's start-up checks still run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
PHANTOM = {"n_train": 4, "n_val": 3, "n_test": 1, "seed": 5}  # 3 validation subjects: uneven shards of 2 and 1
EPOCHS = 2
SMALL = ["--make_phantom", "false", "--variant", "dual_attention", "--adversarial_warmup", "0",
         "--attention_warmup", "0", "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]",
         "--local_channels", "[8,8,16,16]", "--error_head_channels", "[4,4,8,8]", "--batch_size", "1",
         "--samples_per_volume", "2", "--log_every", "1", "--epochs", str(EPOCHS), "--val_interval", "1",
         "--hard_sampling", "true", "--error_interval", str(EPOCHS)]  # the learning rate follows the cosine schedule


def _torchrun(phantom, root, probe_dir, *extra, timeout=500):
    """``torchrun --nproc_per_node 2 -m monai.bundle run training`` with the DDP overlay and the probe overlay."""
    probe = root / "probe.json"
    probe.write_text(json.dumps({
        "rank_probe": {"_target_": "rank_probe.RankProbe", "probe_dir": str(probe_dir),
                       "evaluator": "@validate#evaluator", "optimizer": "@optimizer_g"},
        "train#trainer#train_handlers": "$@train#tracked_handlers + [@rank_probe]",
    }))
    configs = [str(ROOT / "bundle" / "configs" / f) for f in ("train.json", "multi_gpu_train.json")] + [str(probe)]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
           "--config_file", json.dumps(configs), "--logging_file", "bundle/configs/logging.conf",
           "--bundle_root", str(root), "--model_dir", str(root / "models"), "--dataset_dir", str(phantom),
           "--save_rank_weights", "true", *SMALL, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started, a hung collective included
        log, _ = proc.communicate()
        pytest.fail(f"the DDP run did not end in {timeout} s:\n{log[-4000:]}")
    return proc.returncode, log


@pytest.fixture(scope="module")
def ddp_run(phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(1)
    pretrained = _inference_parser().get_parsed_content("network_def").state_dict()
    torch.save(pretrained, root / "pretrained.pt")
    returncode, log = _torchrun(phantom, root, root / "probe", "--pretrained_generator", str(root / "pretrained.pt"))
    assert returncode == 0, log[-6000:]
    ranks = [json.loads((root / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    subjects = {s: [item["subject"] for item in json.loads((phantom / "datalist.json").read_text())[s]]
                for s in ("training", "validation")}
    return {"root": root, "run": root / "runs" / "dual_attention", "log": log, "ranks": ranks, "subjects": subjects,
            "phantom": phantom, "pretrained": [float(t.double().sum()) for t in pretrained.values()]}


def _inference_parser():
    """inference.json (where the trained weights are used) with the network sizes of the run."""
    from monai.bundle import ConfigParser

    from custom_components.config.paths import config_files

    parser = ConfigParser()
    parser.read_config(config_files(ROOT / "bundle", "infer"))
    parser.update({"bundle_root": str(ROOT / "bundle"), "generator_channels": [8, 16, 32, 64],
                   "local_channels": [8, 8, 16, 16], "error_head_channels": [4, 4, 8, 8]})
    return parser


def test_each_epoch_splits_the_training_subjects_between_the_ranks(ddp_run):
    training = set(ddp_run["subjects"]["training"])
    for epoch in range(1, EPOCHS + 1):
        shards = [{s for it in rank["train"] if it[0] == epoch for s in it[1:]} for rank in ddp_run["ranks"]]
        assert not shards[0] & shards[1], f"epoch {epoch}: both ranks trained on {shards[0] & shards[1]}"
        assert shards[0] | shards[1] == training, f"epoch {epoch}: {shards} do not cover {training}"
    # 4 subjects over 2 ranks, batch 1: 2 iterations per epoch on each rank, and the checkpoint counts them so
    assert [len(rank["train"]) for rank in ddp_run["ranks"]] == [2 * EPOCHS, 2 * EPOCHS]
    state = torch.load(ddp_run["run"] / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * EPOCHS


def test_every_rank_validates_its_own_share_and_together_every_subject_once(ddp_run):
    main, other = (rank["validations"] for rank in ddp_run["ranks"])
    assert len(main) == len(other) == EPOCHS  # val_interval 1
    for shards in zip(main, other):  # 3 subjects, none padded in to even the shards (2 and 1)
        assert sorted(shards[0] + shards[1]) == sorted(ddp_run["subjects"]["validation"]), shards


def test_the_ranks_follow_one_learning_rate_schedule_and_end_with_identical_weights(ddp_run):
    lrs = [rank["lr"] for rank in ddp_run["ranks"]]
    assert lrs[0] == lrs[1] and lrs[0][-1] < lrs[0][0]  # the cosine schedule runs on both ranks
    weights = [torch.load(ddp_run["run"] / f"generator_rank{r}.pt", weights_only=True) for r in (0, 1)]
    params = [k for k in weights[0] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params and all(torch.equal(weights[0][k], weights[1][k]) for k in params)


def test_every_rank_updates_the_sampling_weights_of_its_data(ddp_run):
    assert ddp_run["log"].count("error-weighted sampling: updated the sampling weights") == 2


def test_only_rank_0_logs_and_writes(ddp_run):
    main, other = ddp_run["ranks"]
    assert main["saved"] and other["saved"] == []  # checkpoints and models: torch.save on rank 0 only
    run = ddp_run["run"]
    writers = {p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")}
    assert writers == {str(main["pid"])}  # TensorBoard
    assert ddp_run["log"].count("Epoch[1] Metrics") == 1  # the stats handlers: validation, and training below
    assert len(re.findall(r"Epoch: \d+/\d+, Iter: \d+/\d+ --", ddp_run["log"])) == len(main["train"])
    shown = set(re.findall(r"\bloss=([-0-9.e+]+)", ddp_run["log"]))  # the progress bar shows rank 0's losses only
    assert shown and shown <= {tqdm.format_num(loss) for loss in main["loss"]}, (shown, main["loss"], other["loss"])
    assert len(json.loads((run / "checkpoints" / "run_config.json").read_text())) == 1  # the start-up check
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "checkpoint_final.pt", "run_config.json"]


def test_the_trainer_updates_ddp_wrappers_and_handlers_save_the_bare_networks(ddp_run):
    """The evaluator and the savers use the generator itself, so model.pt loads into the inference network."""
    for rank in ddp_run["ranks"]:
        assert rank["trainer_runs_ddp"] and rank["evaluator_runs_the_trained_generator"]
        # the DDP wrapper holds the generator --pretrained_generator loaded
        assert rank["start_weights"] == pytest.approx(ddp_run["pretrained"])
    parser = _inference_parser()
    models = ddp_run["root"] / "models"
    for name, network in (("model.pt", "network_def"), ("local_discriminator.pt", "local_discriminator"),
                          ("error_head.pt", "error_predictor")):
        parser.get_parsed_content(network).load_state_dict(torch.load(models / name, weights_only=True))


def test_the_start_up_checks_of_train_json_run_on_every_rank(ddp_run, tmp_path):
    """A second run into the finished run's folders is refused on both ranks before any training (check_outputs, the
    last of train.json's checks, runs on rank 0 and rank 1 learns of its refusal)."""
    returncode, log = _torchrun(ddp_run["phantom"], ddp_run["root"], tmp_path / "probe", timeout=300)
    assert returncode != 0
    assert "--resume true" in log
    assert log.count("ERROR (RuntimeError): rank 0 failed: FileExistsError: an earlier run left") == 2
    assert "Epoch[1]" not in log and not (tmp_path / "probe").exists()
