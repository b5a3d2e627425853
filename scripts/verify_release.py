"""Run the model zoo's bundle checks on a bundle folder (an unzipped release), with MONAI's own tools only.

This follows what the model zoo's ``ci/verify_bundle.py -m full`` and its unit-test runner do with a bundle, so a
release that passes here passes there; it needs only the packages of the bundle's ``metadata.json`` (no
``pip install`` of this project: the release's own ``custom_components`` copy is used, found on the bundle root as
the zoo puts it on ``sys.path``)::

    python scripts/verify_release.py --bundle release/dual_attention_synthesis --schema meta_schema_20240725.json

Checks, in the zoo's order (each prints one ``verified:`` line; the first failure raises with the reason):

1. the files the zoo requires (``configs/metadata.json``, ``LICENSE``) and prefers (``models/model.pt``,
   ``configs/inference.json``);
2. ``version`` has a ``changelog`` entry;
3. ``verify_metadata`` against the schema the metadata names (``--schema``: a local copy, as the zoo's
   ``ci/prepare_schema.py`` downloads it to ``eval/schema.json`` beforehand; nothing is downloaded here);
4. the inference workflow built from ``configs/inference.json`` alone passes ``check_properties()``; so does the
   training workflow from ``configs/train.json`` alone (the zoo's unit tests check it; it is run on a tiny phantom
   written into a temporary folder);
5. ``verify_net_in_out`` of ``network_def`` with ``configs/inference.json`` alone;
6. ``ckpt_export`` of ``models/model.pt`` to TorchScript with ``configs/inference.json`` alone, and the TorchScript
   module's output equal to the eager network's on a random input of the metadata's shape.

The zoo's standard inference command, ``python -m monai.bundle run --config_file configs/inference.json`` inside the
bundle folder, is run by the test suite after these checks (it writes data and outputs into the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

NET_ID = "network_def"
REQUIRED = ("configs/metadata.json", "LICENSE")
PREFERRED = ("models/model.pt", "configs/inference.json")
#: the training check runs on this phantom (a few seconds) instead of the default data set
TINY_PHANTOM = {"task": "t1t2", "n_train": 1, "n_val": 1, "n_test": 1, "shape": [32, 32, 32], "seed": 0}


def _say(what: str) -> None:
    print(f"verified: {what}", flush=True)


def check_files(bundle: Path) -> None:
    missing = [f for f in REQUIRED + PREFERRED if not (bundle / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{bundle}: the model zoo requires {', '.join(missing)}, not found.")
    _say(f"required and preferred files ({', '.join(REQUIRED + PREFERRED)})")


def check_version(bundle: Path) -> dict:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog"):
        if key not in meta:
            raise ValueError(f"configs/metadata.json has no {key!r}.")
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"configs/metadata.json: version {meta['version']} has no entry in 'changelog'.")
    _say(f"version {meta['version']} and its changelog entry")
    return meta


def check_metadata(bundle: Path, schema: Path) -> None:
    from monai.bundle import verify_metadata

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "schema.json"  # where verify_metadata would download it; an existing file is used
        shutil.copy(schema, local)
        verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(local))
    _say(f"metadata against {schema.name}")


def check_properties(bundle: Path) -> None:
    from monai.bundle import create_workflow

    configs = bundle / "configs"
    common = {"bundle_root": str(bundle), "meta_file": str(configs / "metadata.json"), "logging_file": None}
    infer = create_workflow(config_file=str(configs / "inference.json"), workflow_type="inference", **common)
    problems = infer.check_properties()
    if problems:
        raise ValueError(f"configs/inference.json alone: check_properties() reports {problems}.")
    _say("inference workflow properties (configs/inference.json alone)")
    with tempfile.TemporaryDirectory() as tmp:
        train = create_workflow(config_file=str(configs / "train.json"), workflow_type="train",
                                dataset_dir=str(Path(tmp) / "data"), phantom=TINY_PHANTOM,
                                output_dir=str(Path(tmp) / "run"), cache_rate=0.0, **common)
        problems = train.check_properties()
    if problems:
        raise ValueError(f"configs/train.json alone: check_properties() reports {problems}.")
    _say("training workflow properties (configs/train.json alone)")


def check_net_in_out(bundle: Path) -> None:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id=NET_ID, meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), device="cpu")
    _say(f"{NET_ID} input and output shapes (configs/inference.json alone)")


def check_torchscript(bundle: Path, atol: float = 1e-5) -> None:
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    configs = bundle / "configs"
    with tempfile.TemporaryDirectory() as tmp:
        ts = Path(tmp) / "verify_model.ts"
        ckpt_export(net_id=NET_ID, filepath=str(ts), ckpt_file=str(bundle / "models" / "model.pt"),
                    meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
                    bundle_root=str(bundle))
        scripted = torch.jit.load(str(ts))
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    parser.read_meta(str(configs / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    eager = parser.get_parsed_content(NET_ID)
    eager.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    eager.eval()
    spec = parser["_meta_"]["network_data_format"]["inputs"]["image"]
    shape = [int(str(s).replace("*n", "").replace("n", "1")) * 4 for s in spec["spatial_shape"]]
    torch.manual_seed(0)
    x = torch.rand(1, int(spec["num_channels"]), *shape)
    with torch.no_grad():
        diff = float((scripted(x) - eager(x)).abs().max())
    if not diff <= atol:
        raise ValueError(f"TorchScript output differs from the eager network's by {diff:.3g} (> {atol}).")
    _say(f"TorchScript export of models/model.pt, output equal to eager (max difference {diff:.1e})")


def verify(bundle: str | os.PathLike, schema: str | os.PathLike) -> None:
    bundle = Path(bundle).resolve()
    sys.path.insert(0, str(bundle))  # as the zoo does, so the bundle's own custom_components is imported
    check_files(bundle)
    check_version(bundle)
    check_metadata(bundle, Path(schema))
    check_properties(bundle)
    check_net_in_out(bundle)
    check_torchscript(bundle)
    print(f"all model-zoo checks passed for {bundle}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--bundle", required=True, help="bundle folder (an unzipped release)")
    cli.add_argument("--schema", required=True, help="local copy of the metadata schema the bundle names")
    args = cli.parse_args()
    verify(args.bundle, args.schema)
