"""multi_gpu_train.json switches rank-0-only handlers off through ``is_main``, never by list position.

train.json marks every handler that only the main process needs (logging, TensorBoard, progress bar, checkpoint
and best-model savers) with ``"_disabled_": "$not @is_main"``; the overlay only sets ``is_main`` from the rank and
wraps ``network`` (what the trainer updates) in DDP, while ``unwrapped_network`` (what handlers and the evaluator use)
stays the generator without the wrapper. Inserting a handler into train.json cannot switch off the wrong one. The DDP
run itself is tested in test_fault_tolerance.py; overlays addressing no list position in test_configs_declarative.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
RANK0_ONLY = {"StatsHandler", "TensorBoardStatsHandler", "TensorBoardImageHandler", "LossProgressBar",
              "AtomicCheckpointSaver"}


def _enabled(is_main: bool) -> dict[str, list[str]]:
    """The handler types each list keeps (and the checkpoint saver) on the main or another rank."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    parser.update({"is_main": is_main, "hard_sampling": True, "variant": "dual_attention"})
    out = {}
    for where in ("train#handlers", "validate#handlers"):
        out[where] = [h["_target_"].split(".")[-1] for i, h in enumerate(parser[where])
                      if "_disabled_" not in h or not parser.get_parsed_content(f"{where}#{i}#_disabled_")]
    out["checkpoint_saver"] = [] if parser.get_parsed_content("train#checkpoint_saver#_disabled_") else ["saver"]
    return out


def test_other_ranks_keep_only_the_handlers_every_rank_needs():
    other = _enabled(is_main=False)
    assert other["train#handlers"] == ["DelayedValidationHandler", "ErrorWeightedSampling", "IterationLrSchedule"]
    assert other["validate#handlers"] == [] and other["checkpoint_saver"] == []


def test_main_rank_keeps_every_handler():
    main = _enabled(is_main=True)
    assert RANK0_ONLY <= set(main["train#handlers"]) | set(main["validate#handlers"])
    # best generator, its local discriminator and its error-prediction head
    assert len(main["train#handlers"]) == 7 and main["validate#handlers"].count("AtomicCheckpointSaver") == 3
    assert main["checkpoint_saver"] == ["saver"]


@pytest.mark.parametrize("where, key", [("train#handlers", "network"), ("validate#handlers", "save_dict")])
def test_handlers_use_the_generator_without_its_ddp_wrapper(where, key):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    uses = [h[key] for h in parser[where] if key in h]
    assert "@unwrapped_network" in uses or {"model": "@unwrapped_network"} in uses
    assert parser["validate"]["evaluator"]["network"] == "@unwrapped_network"
    # the trainer's network is the same generator (pre-trained weights included) inside the DDP wrapper
    assert parser["network"] == {"_target_": "custom_components.engines.distributed.wrap_ddp", "network": "@unwrapped_network",
                                 "device": "@device"}
    single = ConfigParser()
    single.read_config(str(CONFIGS / "train.json"))
    assert single["network"] == "@unwrapped_network" and single["is_main"] is True
    assert single["unwrapped_network"]["_target_"] == "custom_components.networks.nets.load_pretrained"
