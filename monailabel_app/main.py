"""MONAI Label app serving the bundle's synthesis (T1 -> T2, or MR -> CT) through ``/infer``.

Start it from the repository root (MONAI Label is an optional extra, see bundle/docs/README.md)::

    monailabel start_server --app monailabel_app --studies data/studies --conf bundle bundle --port 8000

``--conf bundle`` is the bundle folder (a release folder works too; default: ``bundle/`` next to this app). Two
models are served: ``synthesis`` returns the synthetic image, ``synthesis_confidence`` the local discriminator's
confidence map, both float32 NIfTI in the geometry of the posted volume::

    curl -X POST "http://127.0.0.1:8000/infer/synthesis?output=image" -F "file=@t1.nii.gz" -o t1_synthetic.nii.gz
"""

from __future__ import annotations

import sys
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp

_HERE = Path(__file__).resolve().parent


def _bundle_dir(conf: dict) -> Path:
    bundle = Path(conf.get("bundle", _HERE.parent / "bundle")).resolve()
    missing = [name for name in ("train.json", "inference.json") if not (bundle / "configs" / name).is_file()]
    if missing:  # inference.json is an overlay on train.json, which defines the networks
        raise FileNotFoundError(f"--conf bundle {bundle}: no configs/{' or configs/'.join(missing)} there.")
    # the bundle's runtime package: a release carries its own copy, a source checkout has it next to bundle/
    for root in (bundle, bundle.parent):
        if (root / "custom_components" / "__init__.py").is_file() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            break
    return bundle


class SynthesisApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        self.bundle = _bundle_dir(conf)
        self.device = conf.get("device", "cpu")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="dual_attention_synthesis",
                         description="Cross-modality synthesis with a dual-attention GAN bundle", version="0.1.0")

    def init_infers(self) -> dict:
        from custom_components.label_task import SynthesisTask

        overrides = {"device": self.device}
        return {
            "synthesis": SynthesisTask(self.bundle, "synthetic", overrides),
            "synthesis_confidence": SynthesisTask(self.bundle, "confidence", overrides),
        }

    def init_trainers(self) -> dict:
        return {}  # training runs through `python -m monai.bundle run training`

    def init_strategies(self) -> dict:
        return {}


__all__ = ["SynthesisApp"]
