"""The configs read as declarations: no long expression, each definition written once, overlays name ids.

Logic lives in named, tested functions of ``custom_components`` that the configs reference; evaluation and inference
are overlays on train.json (``custom_components.paths.WORKFLOW_CONFIGS``), so the networks and the inferer they share
are defined there only, and a change to the generator is made in one place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from custom_components.paths import WORKFLOW_CONFIGS, config_files

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = sorted((BUNDLE / "configs").glob("*.json"))
MAX_EXPRESSION = 80  # characters of a "$..." expression: one short line


def _walk(node, path=()):
    """(id, value) of every leaf of a config, ids joined with '#' as MONAI writes them."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))
    else:
        yield "#".join(path), node


def _components(node, path=()):
    """(id, _target_) of every component of a config."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield "#".join(path), node["_target_"]
        for k, v in node.items():
            yield from _components(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _components(v, (*path, str(i)))


def test_no_config_holds_an_expression_longer_than_one_short_line():
    long = {f"{cfg.name}: {where}": len(value) for cfg in CONFIGS for where, value in _walk(json.loads(cfg.read_text()))
            if isinstance(value, str) and value.startswith("$") and len(value) > MAX_EXPRESSION}
    assert long == {}, f"write these as a named function or a _target_ declaration: {long}"


def test_the_walk_sees_expressions_inside_lists_and_nested_ids():
    """The check above would pass on an empty walk: make sure it reaches what it must judge."""
    found = dict(_walk({"initialize": ["$x", {"a": "$" + "y" * 90}], "b#c": "$z"}))
    assert found == {"initialize#0": "$x", "initialize#1#a": "$" + "y" * 90, "b#c": "$z"}


@pytest.mark.parametrize("target", [
    "monai.networks.nets.UNet",  # the generator G
    "custom_components.GlobalCritic",
    "custom_components.LocalDiscriminator",
    "custom_components.inferers.slice_inferer",  # the whole-volume inferers of validation, evaluation, inference
    "SlidingWindowInferer",
])
def test_each_network_and_inferer_is_defined_in_one_config_only(target):
    where = [f"{cfg.name}: {cid}" for cfg in CONFIGS for cid, t in _components(json.loads(cfg.read_text()))
             if t == target]
    assert len(where) == 1 and where[0].startswith("train.json: "), where


@pytest.mark.parametrize("workflow", sorted(WORKFLOW_CONFIGS))
def test_every_workflow_builds_the_generator_of_train_json(workflow, tmp_path):
    """A change to the generator in train.json reaches training, evaluation and inference alike."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for cfg in CONFIGS:
        (configs / cfg.name).write_text(cfg.read_text())
    train = json.loads((configs / "train.json").read_text())
    train["network_def"]["num_res_units"] = 1
    train["generator_channels"] = [4, 8, 16, 32]
    (configs / "train.json").write_text(json.dumps(train))
    parser = ConfigParser()
    parser.read_config(config_files(tmp_path, workflow))
    parser.update({"bundle_root": str(tmp_path), "device": "cpu"})
    net = parser.get_parsed_content("network_def")
    assert net.model[0].conv.unit0.conv.out_channels == 4
    assert not hasattr(net.model[0].conv, "unit1")  # num_res_units 1: one convolution per residual unit (shipped: 2)


def test_only_train_json_lists_imports():
    """An overlay's ``imports`` would replace train.json's list (MONAI merges configs key by key)."""
    assert [cfg.name for cfg in CONFIGS if "imports" in json.loads(cfg.read_text())] == ["train.json"]


def test_no_overlay_addresses_a_list_position():
    """Overlays override ids by name; an index (``initialize#3``) would silently hit another item after an edit."""
    keys = [f"{cfg.name}: {k}" for cfg in CONFIGS for k in json.loads(cfg.read_text()) if re.search(r"#\d+(#|$)", k)]
    assert keys == []
