"""Write ``bundle/configs/inference.json`` as a standalone config: train.json's shared definitions plus the inference
settings, so that ``python -m monai.bundle run --config_file configs/inference.json`` works alone, as the model zoo,
its verifier and MONAI Label load it.

train.json stays the one place where the networks, the inferer and the intensity settings are written. The settings
that only inference has live in ``scripts/config_sources/inference.json`` (an overlay on train.json, with MONAI's
``#``-id merge rules). This script merges the two and keeps, of the merged config, only the ids inference needs: the
overlay's own, the ids MONAI's inference workflow requires, and every id these reference, transitively. ::

    python scripts/sync_configs.py            # rewrite bundle/configs/inference.json
    python scripts/sync_configs.py --check    # exit 1, naming the ids that differ, when the file is out of date

The test suite runs the check, so a change to train.json that is not carried over to inference.json fails CI.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_CONFIGS = ROOT / "bundle" / "configs"
OVERLAY = ROOT / "scripts" / "config_sources" / "inference.json"
TARGET = BUNDLE_CONFIGS / "inference.json"
#: ids MONAI's inference workflow reads (monai.bundle.properties.InferProperties, required or not) and its run steps
WORKFLOW_IDS = ("imports", "bundle_root", "device", "dataset_dir", "dataset", "evaluator", "network_def", "inferer",
                "handlers", "preprocessing", "postprocessing", "initialize", "run", "finalize")
COMMENT = ("Standalone inference config, written by scripts/sync_configs.py from train.json (the networks, inferer "
           "and intensity settings) and the inference settings of scripts/config_sources/inference.json; edit those "
           "two and rerun the script (the test suite fails when this file is out of date).")
_REFERENCE = re.compile(r"@([A-Za-z_]\w*)")
LINE = 120  # a dict or list whose JSON fits on one line of this width is written on one line


def _references(node: Any) -> set[str]:
    """Top-level ids referenced (``@id``, ``@id#sub``, inside ``$`` expressions too) anywhere in ``node``."""
    if isinstance(node, dict):
        return set().union(*(_references(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_references(v) for v in node)) if node else set()
    return set(_REFERENCE.findall(node)) if isinstance(node, str) else set()


def merged_config(train: Path = BUNDLE_CONFIGS / "train.json", overlay: Path = OVERLAY) -> dict:
    """train.json with the inference overlay merged over it, as ``--config_file "['train.json', overlay]"`` reads it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(train), str(overlay)])
    return parser.get()


def standalone_inference(train: Path = BUNDLE_CONFIGS / "train.json", overlay: Path = OVERLAY) -> dict:
    """The standalone inference config: the ids inference needs from the merged config, in train.json's order."""
    merged = merged_config(train, overlay)
    overlay_ids = {key.split("#")[0] for key in json.loads(Path(overlay).read_text())}
    todo = [i for i in (*overlay_ids, *WORKFLOW_IDS) if i in merged]
    needed: set[str] = set()
    while todo:
        key = todo.pop()
        if key in needed:
            continue
        needed.add(key)
        todo.extend(ref for ref in _references(merged[key]) if ref in merged and ref not in needed)
    unknown = sorted(ref for key in needed for ref in _references(merged[key]) if ref not in merged)
    if unknown:
        raise ValueError(f"the inference config would reference ids defined nowhere: {unknown}.")
    return {"_comment": COMMENT, **{key: value for key, value in merged.items() if key in needed}}


def _format(value: Any, indent: int = 0) -> str:
    """JSON with short containers on one line and long ones broken over lines (the configs' hand-written style)."""
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value or indent + len(flat) <= LINE:
        return flat
    pad, inner = " " * indent, " " * (indent + 4)
    if isinstance(value, list):
        items = [inner + _format(v, indent + 4) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    items = [f"{inner}{json.dumps(k)}: {_format(v, indent + 4 + len(json.dumps(k)) + 2)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"


def render(config: dict) -> str:
    """The text of a config file: one top-level id per line (or block), four-space indents."""
    return _format(config) + "\n"


def out_of_date(target: Path = TARGET, train: Path = BUNDLE_CONFIGS / "train.json", overlay: Path = OVERLAY) -> list[str]:
    """Ids whose value in ``target`` differs from what train.json and the overlay define (empty: up to date)."""
    wanted = standalone_inference(train, overlay)
    current = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
    differ = sorted(k for k in wanted.keys() | current.keys() if wanted.get(k, "<absent>") != current.get(k, "<absent>"))
    if not differ and Path(target).read_text() != render(wanted):
        differ = ["<formatting>"]
    return differ


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print(__doc__.split("::")[1].rstrip(), file=sys.stderr)
        return 2
    if argv == ["--check"]:
        differ = out_of_date()
        if differ:
            print(f"{TARGET} is out of date with train.json and {OVERLAY} (ids: {', '.join(differ)}); run "
                  "`python scripts/sync_configs.py` to rewrite it.", file=sys.stderr)
            return 1
        print(f"{TARGET} is up to date.")
        return 0
    TARGET.write_text(render(standalone_inference()))
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
