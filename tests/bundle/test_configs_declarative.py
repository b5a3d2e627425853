"""The configs read as declarations: no long expression, each definition written once, overlays name ids.

Logic lives in named, tested functions of ``custom_components`` that the configs reference. train.json defines the
networks and the inferer every workflow shares; evaluate.json is an overlay on it, and inference.json is the
standalone file ``scripts/sync_configs.py`` writes from train.json and the inference settings
(``scripts/config_sources/inference.json``), so a change to the generator is made in one place and a stale
inference.json fails here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from custom_components.config.paths import WORKFLOW_CONFIGS, config_files

_spec = importlib.util.spec_from_file_location("sync_configs", Path(__file__).resolve().parents[2] / "scripts" / "sync_configs.py")
sync_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_configs)

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = sorted((BUNDLE / "configs").glob("*.json"))
SOURCES = sorted((BUNDLE.parent / "scripts" / "config_sources").glob("*.json"))  # hand-written: what sync merges
WRITTEN = [cfg for cfg in CONFIGS if cfg.name != "inference.json"] + SOURCES  # the files a developer edits
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
    long = {f"{cfg.name}: {where}": len(value) for cfg in CONFIGS + SOURCES for where, value in _walk(json.loads(cfg.read_text()))
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
    "custom_components.inferers.inferer.slice_inferer",  # the whole-volume inferers of validation, evaluation, inference
    "SlidingWindowInferer",
])
def test_each_network_and_inferer_is_defined_in_one_config_only(target):
    where = [f"{cfg.name}: {cid}" for cfg in WRITTEN for cid, t in _components(json.loads(cfg.read_text()))
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
    if workflow == "infer":  # the standalone file is rewritten from train.json (the check below keeps it current)
        (configs / "inference.json").write_text(sync_configs.render(sync_configs.standalone_inference(configs / "train.json")))
    parser = ConfigParser()
    parser.read_config(config_files(tmp_path, workflow))
    parser.update({"bundle_root": str(tmp_path), "device": "cpu"})
    net = parser.get_parsed_content("network_def")
    assert net.model[0].conv.unit0.conv.out_channels == 4
    assert not hasattr(net.model[0].conv, "unit1")  # num_res_units 1: one convolution per residual unit (shipped: 2)


def test_only_train_json_lists_imports():
    """An overlay's ``imports`` would replace train.json's list (MONAI merges configs key by key)."""
    assert [cfg.name for cfg in WRITTEN if "imports" in json.loads(cfg.read_text())] == ["train.json"]


def test_no_overlay_addresses_a_list_position():
    """Overlays override ids by name; an index (``initialize#3``) would silently hit another item after an edit."""
    keys = [f"{cfg.name}: {k}" for cfg in CONFIGS + SOURCES for k in json.loads(cfg.read_text()) if re.search(r"#\d+(#|$)", k)]
    assert keys == []


def test_inference_json_is_what_train_json_and_the_inference_settings_define():
    """bundle/configs/inference.json runs alone (the model zoo, its verifier and MONAI Label load it by itself), so
    it repeats train.json's networks, inferer and preprocessing: it must be exactly what sync_configs writes."""
    assert sync_configs.out_of_date() == [], "run `python scripts/sync_configs.py`"
    assert sync_configs.main(["--check"]) == 0


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.update(generator_channels=[8, 16, 32, 64]), ["generator_channels"]),  # the generator's width
    (lambda t: t["local_discriminator"].update(norm="batch"), ["local_discriminator"]),  # D2, the QA map's network
    (lambda t: t["window_inferer"].update(overlap=0.5), ["window_inferer"]),  # the inferer
    (lambda t: t["source_intensity"].update(upper=99.0), []),  # inference's own normalisation overrides train's
])
def test_a_change_to_train_json_leaves_inference_json_stale_and_is_named(edit, expected, tmp_path):
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    edit(train)
    (tmp_path / "train.json").write_text(json.dumps(train))
    assert sync_configs.out_of_date(train=tmp_path / "train.json") == expected


def test_the_inference_settings_override_train_json_where_they_differ():
    standalone = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    overlay = json.loads(SOURCES[[s.name for s in SOURCES].index("inference.json")].read_text())
    assert standalone["source_intensity"] == overlay["source_intensity"]
    assert standalone["model_dir"] == overlay["model_dir"] == "$@bundle_root + '/models'"
    assert "train" not in standalone and "validate" not in standalone and "optimizer_g" not in standalone


@pytest.mark.parametrize("overlay", ["3d.json", "paper.json"])
def test_a_training_overlay_merged_over_inference_json_alone_builds_the_networks_it_trained(overlay):
    """Weights trained with an overlay are used with ``['configs/inference.json', 'configs/<overlay>']``."""
    def nets(files):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        parser.update({"bundle_root": str(BUNDLE), "device": "cpu"})
        built = {n: parser.get_parsed_content(n) for n in ("network_def", "local_discriminator", "error_predictor")}
        return {n: {k: v.shape for k, v in net.state_dict().items()} for n, net in built.items() if net is not None}

    standalone, trained = nets(["inference.json", overlay]), nets(["train.json", overlay])
    shared = standalone.keys() & trained.keys()  # train.json builds D2 only for variants that train it
    assert "network_def" in shared and {n: standalone[n] for n in shared} == {n: trained[n] for n in shared}
    assert standalone != nets(["inference.json"])  # the overlay changed a network
