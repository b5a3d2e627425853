"""Synthesis served by MONAI Label: an inference task that runs the bundle's inference config on one volume.

MONAI Label's ``BundleInferTask`` is built for segmentation (it types the result as a label map and casts it to the
client's ``result_dtype``). :class:`SynthesisTask` instead runs the bundle's own inference pipeline, so the result is
exactly what ``python -m monai.bundle run inferring`` writes: a float32 NIfTI in the source's geometry, plus the local
discriminator's confidence map. The MONAI Label app in ``monailabel_app/`` registers it; the class also works without
MONAI Label installed (it then only follows MONAI Label's ``InferTask`` interface), which is how it is tested.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

try:  # MONAI Label is an optional extra; without it the task keeps the same interface
    from monailabel.interfaces.tasks.infer_v2 import InferTask as _InferTaskBase
    from monailabel.interfaces.tasks.infer_v2 import InferType

    _OTHERS: Any = InferType.OTHERS
except ImportError:  # pragma: no cover - exercised where MONAI Label is not installed
    _InferTaskBase, _OTHERS = object, "others"

__all__ = ["SynthesisTask", "synthesise"]


def synthesise(bundle_dir: str | os.PathLike, image: str | os.PathLike, output_dir: str | os.PathLike,
               overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Run the bundle's inference config (train.json with inference.json over it) on one ``image``; return the paths
    written (``synthetic``, ``confidence``).

    Raises :class:`ValueError` with the screening reason when the image is rejected (unreadable, not a 3D
    single-channel volume, non-finite values).
    """
    from monai.bundle import ConfigParser

    from .inference import output_path
    from .paths import config_files

    bundle_dir, image, output_dir = Path(bundle_dir).resolve(), Path(image).resolve(), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datalist = output_dir / "request.json"
    datalist.write_text(json.dumps({"test": [{"subject": image.name.split(".")[0], "source": str(image)}]}))
    parser = ConfigParser()
    parser.read_config(config_files(bundle_dir, "infer"))
    # data_root_dir: the outputs' sub-folders are taken relative to it, so the image's own folder puts them
    # directly in output_dir (never next to the source)
    parser.update({"bundle_root": str(bundle_dir), "input": str(datalist), "datalist_section": "test",
                   "output_dir": str(output_dir), "data_root_dir": str(image.parent), "overwrite": True,
                   **(overrides or {})})
    inputs = parser.get_parsed_content("inputs")
    if inputs.failed:
        raise ValueError(f"{image}: {inputs.failed[0]['reason']}")
    parser.get_parsed_content("run")
    root = parser.get_parsed_content("data_root_dir")
    files = {"synthetic": output_path(str(image), str(output_dir), "synthetic", root)}
    if parser.get_parsed_content("save_confidence"):
        files["confidence"] = output_path(str(image), str(output_dir), "confidence", root)
    missing = [f for f in files.values() if not os.path.isfile(f) or Path(f).parent != output_dir]
    if missing:
        raise RuntimeError(f"inference of {image} did not write {missing}.")
    return files


class SynthesisTask(_InferTaskBase):  # type: ignore[misc, valid-type]
    """MONAI Label inference task returning the synthetic image (``result="synthetic"``) or the confidence map.

    ``__call__`` takes MONAI Label's request (``request["image"]`` is the path of the study's volume) and returns
    ``(result_file, info)``: the float32 NIfTI and a dict with the paths of both outputs and the intensity scale.
    """

    def __init__(self, bundle_dir: str | os.PathLike, result: str = "synthetic",
                 overrides: dict[str, Any] | None = None, description: str = "") -> None:
        if result not in ("synthetic", "confidence"):
            raise ValueError(f"result must be 'synthetic' or 'confidence', got {result!r}.")
        self.bundle_dir, self.result, self.overrides = Path(bundle_dir), result, dict(overrides or {})
        description = description or f"cross-modality synthesis ({result}) with the bundle in {self.bundle_dir}"
        if _InferTaskBase is object:
            self.type, self.labels, self.dimension, self.description, self._config = _OTHERS, [], 3, description, {}
        else:
            super().__init__(type=_OTHERS, labels=None, dimension=3, description=description)

    def info(self) -> dict[str, Any]:
        return {"type": self.type, "labels": self.labels, "dimension": self.dimension,
                "description": self.description, "config": self.config()}

    def config(self) -> dict[str, Any]:
        return self._config

    def get_path(self) -> str:
        return str(self.bundle_dir / "models" / "model.pt")

    def is_valid(self) -> bool:
        from .paths import config_files

        configs = config_files(self.bundle_dir, "infer")
        return all(os.path.isfile(f) for f in configs) and Path(self.get_path()).is_file()

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)) or not os.path.isfile(image):
            raise ValueError(f"request['image'] should be the path of a volume, got {image!r}.")
        files = synthesise(self.bundle_dir, image, tempfile.mkdtemp(prefix="synthesis_"), self.overrides)
        if self.result not in files:
            raise ValueError(f"no {self.result} output: {self.bundle_dir / 'models' / 'local_discriminator.pt'} is "
                             "needed for the confidence map.")
        return files[self.result], {"files": files, "dtype": "float32", "result": self.result}
