"""Synthesis served by MONAI Label: an inference task that runs the bundle's inference config on one volume.

MONAI Label's ``BundleInferTask`` is built for segmentation (it types the result as a label map and casts it to the
client's ``result_dtype``). :class:`SynthesisTask` instead runs the bundle's own inference pipeline, so the result is
exactly what ``python -m monai.bundle run inferring`` writes: a float32 NIfTI in the source's geometry, or the QA
(confidence) map. The MONAI Label app in ``monailabel_app/`` registers two tasks sharing one :class:`Synthesiser`,
which reads the configs once and loads the networks once (again only when a weight file changes, as MONAI Label's
own ``BasicInferTask`` does). The classes also work without MONAI Label installed (the task then only follows
MONAI Label's ``InferTask`` interface).

Errors a client can act on are :class:`RejectedRequest`: a ``ValueError`` that is also FastAPI's ``HTTPException``,
so MONAI Label's server answers it with its status code (422 for an image the bundle cannot read or use, 404 for a
missing image or model output) and the reason as ``detail``, instead of a bare 500.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config.paths import config_files
from .inference import output_path

try:  # MONAI Label is an optional extra; without it the task keeps the same interface
    from monailabel.interfaces.tasks.infer_v2 import InferTask as _InferTaskBase
    from monailabel.interfaces.tasks.infer_v2 import InferType

    _OTHERS: Any = InferType.OTHERS
except ImportError:  # pragma: no cover - exercised where MONAI Label is not installed
    _InferTaskBase, _OTHERS = object, "others"

try:  # MONAI Label's server is FastAPI: an HTTPException raised by a task becomes the reply's status and detail
    from fastapi import HTTPException as _HTTPException
except ImportError:  # pragma: no cover - FastAPI comes with MONAI Label (and mlflow)
    class _HTTPException(Exception):  # type: ignore[no-redef]
        def __init__(self, status_code: int, detail: Any = None, headers: dict | None = None) -> None:
            super().__init__(status_code, detail)
            self.status_code, self.detail, self.headers = status_code, detail, headers

        def __str__(self) -> str:
            return f"{self.status_code}: {self.detail}"

__all__ = ["NETWORK_IDS", "RejectedRequest", "SynthesisFailed", "SynthesisTask", "Synthesiser", "TaskError",
           "synthesise"]

logger = logging.getLogger(__name__)

#: config ids whose resolved objects are networks (with their weights loaded); resolved once by
#: :meth:`Synthesiser.networks` and handed to every request's parser, so no request loads weights again
NETWORK_IDS = ("network_def", "unwrapped_network", "network", "local_discriminator", "error_predictor",
               "confidence_network")
#: config ids of the weight files (a change of one of them reloads the networks)
WEIGHT_IDS = ("model_path", "local_discriminator_path", "error_head_path")
OUTPUTS = ("synthetic", "confidence")


class TaskError(_HTTPException):
    """An error whose reason the client sees: HTTP ``status_code`` and ``detail`` in MONAI Label's server."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code=status_code, detail=detail)


class RejectedRequest(TaskError, ValueError):
    """A request the task cannot serve (4xx): an unusable image, a missing image or model output."""


class SynthesisFailed(TaskError, RuntimeError):
    """The synthesis of an accepted image failed (500), with the reason."""


class Synthesiser:
    """The bundle's inference config, read once, with its networks loaded once and shared by every request.

    Each call builds a fresh :class:`monai.bundle.ConfigParser` from the in-memory config (no file is read) with the
    request's input and output folder, and the already loaded networks in place of their definitions, then runs the
    config's own ``inputs`` screening and ``run`` (the same pipeline as ``monai.bundle run inferring``). The
    networks are loaded again only when a weight file's size or modification time changes. Calls are serialised
    (one request at a time uses the networks).

    Args:
        bundle_dir: the bundle folder (``configs/`` and ``models/``).
        overrides: config overrides (e.g. ``{"device": "cpu"}``), as ``--key value`` on the command line.
    """

    def __init__(self, bundle_dir: str | os.PathLike, overrides: dict[str, Any] | None = None) -> None:
        from monai.bundle import ConfigParser


        self.bundle_dir = Path(bundle_dir).resolve()
        self.config_files = config_files(self.bundle_dir, "infer")
        missing = [f for f in self.config_files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"bundle {self.bundle_dir}: no {', '.join(missing)}.")
        parser = ConfigParser()
        parser.read_config(self.config_files)
        parser.update({"bundle_root": str(self.bundle_dir), **(overrides or {})})
        self._config = copy.deepcopy(parser.get())
        self.weight_files = {k: str(parser.get_parsed_content(k)) for k in WEIGHT_IDS if k in parser}
        self.loads = 0  #: how many times the networks were loaded
        self._networks: dict[str, Any] | None = None
        self._key: tuple | None = None
        self._lock = threading.RLock()

    def parser(self, pairs: dict[str, Any] | None = None):  # noqa: ANN201 - monai.bundle.ConfigParser
        """A new parser of the in-memory config with ``pairs`` set (a deep copy: requests never share state)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser(config=copy.deepcopy(self._config))
        parser.update(pairs or {})
        return parser

    def _weights_key(self) -> tuple:
        return tuple((k, p, s.st_size, s.st_mtime_ns) for k, p in sorted(self.weight_files.items())
                     if (s := _stat(p)) is not None)

    def networks(self) -> dict[str, Any]:
        """The resolved network ids (see :data:`NETWORK_IDS`), loaded on first use and when a weight file changes."""
        with self._lock:
            key = self._weights_key()
            if self._networks is None or key != self._key:
                start = time.time()
                parser = self.parser()
                parser.get_parsed_content("network")  # loads the generator's weights (inference.json's load_weights)
                if "confidence_network" in parser:
                    parser.get_parsed_content("confidence_network")  # D2 or the error head, None without weights
                if "check_patch_size" in parser:  # the config's initialize check, once
                    parser.get_parsed_content("check_patch_size")
                resolved = parser.ref_resolver.resolved_content
                self._networks = {k: resolved[k] for k in NETWORK_IDS if k in resolved}
                self._key, self.loads = key, self.loads + 1
                logger.info("synthesis: loaded the networks of %s (load %d, %.1f s): %s", self.bundle_dir, self.loads,
                            time.time() - start, ", ".join(Path(p).name for _, p, *_ in key))
            return self._networks

    def has_confidence(self) -> bool:
        """Whether the bundle has weights for the QA map (the error head's or the local discriminator's)."""
        return self.networks().get("confidence_network") is not None

    def __call__(self, image: str | os.PathLike, output_dir: str | os.PathLike,
                 outputs: Sequence[str] = OUTPUTS, name: str | None = None) -> dict[str, str]:
        """Synthesise ``image`` into ``output_dir``; return the paths written, by output (``synthetic``,
        ``confidence``, of those in ``outputs`` the bundle can make).

        Raises :class:`RejectedRequest` (422) with the screening reason when the image cannot be used (unreadable,
        not a 3D single-channel volume, non-finite values); ``name`` replaces the image's path in that reason
        (default: the file name), so no server-side path is shown to a client.
        """

        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"outputs must be among {OUTPUTS}, got {unknown}.")
        image, output_dir = Path(image).resolve(), Path(output_dir).resolve()
        name = name or image.name
        with self._lock:
            networks = dict(self.networks())
            confidence = "confidence" in outputs and networks.get("confidence_network") is not None
            if not confidence:
                networks["confidence_network"] = None  # no QA map computed when it is not asked for
            output_dir.mkdir(parents=True, exist_ok=True)
            datalist = output_dir / "request.json"
            datalist.write_text(json.dumps({"test": [{"subject": image.name.split(".")[0], "source": str(image)}]}))
            # data_root_dir: the outputs' sub-folders are taken relative to it, so the image's own folder puts them
            # directly in output_dir (never next to the source)
            parser = self.parser({"input": str(datalist), "datalist_section": "test", "output_dir": str(output_dir),
                                  "data_root_dir": str(image.parent), "overwrite": True,
                                  "save_confidence": confidence, **networks})
            inputs = parser.get_parsed_content("inputs")
            if inputs.failed:
                raise RejectedRequest(422, _hide(inputs.failed[0]["reason"], {str(image): name, str(output_dir): "."}))
            try:
                parser.get_parsed_content("run")
            except Exception as e:  # noqa: BLE001 - the reason goes to the client without server-side paths
                raise SynthesisFailed(500, _hide(f"synthesis of {image} failed: {e}",
                                                 {str(image): name, str(output_dir): "."})) from e
            root = parser.get_parsed_content("data_root_dir")
        files = {"synthetic": output_path(str(image), str(output_dir), "synthetic", root)}
        if confidence:
            files["confidence"] = output_path(str(image), str(output_dir), "confidence", root)
        missing = [f for f in files.values() if not os.path.isfile(f) or Path(f).parent != output_dir]
        if missing:
            raise RuntimeError(f"inference of {image} did not write {missing}.")
        return {k: v for k, v in files.items() if k in outputs}


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _hide(text: str, names: dict[str, str]) -> str:
    """``text`` with each path of ``names`` replaced by its public name (longest first)."""
    for path in sorted(names, key=len, reverse=True):
        text = text.replace(path, names[path])
    return text


def synthesise(bundle_dir: str | os.PathLike, image: str | os.PathLike, output_dir: str | os.PathLike,
               overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Run the bundle's inference config on one ``image`` (a one-off :class:`Synthesiser`); return the paths written
    (``synthetic``, and ``confidence`` when the bundle has QA weights).

    Raises :class:`RejectedRequest` (a ``ValueError``) with the screening reason when the image is rejected.
    """
    return Synthesiser(bundle_dir, overrides)(image, output_dir)


class SynthesisTask(_InferTaskBase):  # type: ignore[misc, valid-type]
    """MONAI Label inference task returning the synthetic image (``result="synthetic"``) or the confidence map.

    ``__call__`` takes MONAI Label's request (``request["image"]`` is the path of the study's volume, or of the
    posted file) and returns ``(result_file, params)``: a float32 NIfTI in a new temporary file, which MONAI Label's
    server deletes once it has sent it (a caller in process owns it), and a dict describing it (no server-side
    path). Nothing else is left behind: the request's working folder is removed before returning.

    Args:
        bundle_dir: the bundle folder.
        result: ``"synthetic"`` or ``"confidence"``.
        overrides: config overrides for a :class:`Synthesiser` of its own (ignored when ``synthesiser`` is given).
        description: shown by MONAI Label's ``/info``.
        synthesiser: a :class:`Synthesiser` shared with other tasks (the app's two tasks share one).
    """

    def __init__(self, bundle_dir: str | os.PathLike, result: str = "synthetic",
                 overrides: dict[str, Any] | None = None, description: str = "",
                 synthesiser: Synthesiser | None = None) -> None:
        if result not in OUTPUTS:
            raise ValueError(f"result must be 'synthetic' or 'confidence', got {result!r}.")
        self.synthesiser = synthesiser or Synthesiser(bundle_dir, overrides)
        self.bundle_dir, self.result = self.synthesiser.bundle_dir, result
        description = description or {
            "synthetic": "cross-modality synthesis: the synthetic image (float32, the source's geometry)",
            "confidence": "QA map of the synthesis: high where it is trusted (float32 in [0, 1], the source's "
                          "geometry)",
        }[result]
        if _InferTaskBase is object:
            self.type, self.labels, self.dimension, self.description, self._config = _OTHERS, [], 3, description, {}
        else:
            super().__init__(type=_OTHERS, labels=None, dimension=3, description=description)

    def info(self) -> dict[str, Any]:
        return {"type": self.type, "labels": self.labels, "dimension": self.dimension,
                "description": self.description, "config": self.config()}

    def config(self) -> dict[str, Any]:
        return self._config

    def _weights(self) -> str | None:
        """The weight file this task's output depends on most: the generator's, or the QA network's."""
        files = self.synthesiser.weight_files
        if self.result == "synthetic":
            return files.get("model_path")
        error_head = files.get("error_head_path")
        if error_head and os.path.isfile(error_head):
            return error_head
        return files.get("local_discriminator_path")

    def get_path(self, validate: bool = True) -> str | None:
        """MONAI Label's model file of this task (``GET /model/<name>``): ``None`` when ``validate`` and it is
        missing, as for MONAI Label's own tasks."""
        path = self._weights()
        if path and (not validate or os.path.isfile(path)):
            return path
        return None

    def is_valid(self) -> bool:
        files = self.synthesiser.config_files
        return all(os.path.isfile(f) for f in files) and self.get_path() is not None

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)) or not image or not os.path.isfile(image):
            shown = "" if not isinstance(image, (str, os.PathLike)) else Path(image).name
            raise RejectedRequest(404, f"no image to synthesise: {shown or 'none given'!r} is not a file (post the "
                                       "volume as 'file', or give the id of an image of the datastore as 'image').")
        image = str(image)
        # MONAI Label stores a posted file as a temporary file (keeping the upload's suffixes): its name means
        # nothing to the client, who is shown "posted.nii.gz" instead
        posted = os.path.dirname(os.path.realpath(image)) == os.path.realpath(tempfile.gettempdir())
        name = "posted" + "".join(Path(image).suffixes) if posted else Path(image).name
        if self.result == "confidence" and not self.synthesiser.has_confidence():
            raise RejectedRequest(404, "this bundle has no QA map: it needs models/error_head.pt or "
                                       "models/local_discriminator.pt.")
        start = time.time()
        with tempfile.TemporaryDirectory(prefix="synthesis_") as work:
            files = self.synthesiser(image, work, outputs=(self.result,), name=name)
            fd, result = tempfile.mkstemp(prefix=f"synthesis_{self.result}_", suffix=".nii.gz")
            os.close(fd)
            shutil.move(files[self.result], result)
        import nibabel as nib

        img = nib.load(result)
        params = {"result": self.result, "dtype": str(img.get_data_dtype()), "shape": [int(s) for s in img.shape],
                  "latency": round(time.time() - start, 3)}
        logger.info("synthesis: %s of %s in %.2f s", self.result, name, params["latency"])
        return result, params
