"""MONAI Label app serving the bundle's synthesis (T1 -> T2, or MR -> CT) through ``/infer``.

Install MONAI Label with ``bash scripts/setup.sh`` (see bundle/docs/README.md, Serving with MONAI Label), write a
studies folder and start the server from the repository root::

    .venv/bin/python scripts/make_phantom.py --output_dir data/phantom_t1t2 --studies_dir data/studies_t1t2
    .venv/bin/python -m monailabel.main start_server --app monailabel_app --studies data/studies_t1t2 \\
        --conf bundle bundle --host 127.0.0.1 --port 8000

``--conf bundle`` is the bundle folder (a release folder works too; default: ``bundle/`` next to this app). Two
models are served: ``synthesis`` returns the synthetic image, ``synthesis_confidence`` the QA (confidence) map, both
float32 NIfTI in the geometry of the volume, posted or named by its datastore id::

    curl -X POST "http://127.0.0.1:8000/infer/synthesis?output=image" -F "file=@t1.nii.gz" -o t1_synthetic.nii.gz

The two share one :class:`custom_components.apps.label_task.Synthesiser`: the configs are read and the networks loaded
once, at the first request. MONAI Label writes the server's log to ``monailabel_app/logs/`` (git-ignored).

Temporary files: the app gives the server process a temporary folder of its own (``monailabel_synthesis_*`` in the
system's), which holds MONAI Label's copies of posted files and the results until they are sent (MONAI Label then
deletes them); the copy of a posted file whose request failed is deleted too (MONAI Label 0.8.5 deletes it only
after a successful reply), and the folder itself when the server exits (after Ctrl+C; after SIGTERM, at the next
start).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException

_HERE = Path(__file__).resolve().parent


def _bundle_dir(conf: dict) -> Path:
    bundle = Path(conf.get("bundle", _HERE.parent / "bundle")).resolve()
    # the bundle's runtime package: a release carries its own copy, a source checkout has it next to bundle/
    for root in (bundle, bundle.parent):
        if (root / "custom_components" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    from custom_components.config.paths import config_files

    missing = [f for f in config_files(bundle, "infer") if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"--conf bundle {bundle}: no {' or '.join(missing)} there.")
    return bundle


_TEMP_PREFIX = "monailabel_synthesis_"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _private_tempdir() -> str:
    """A temporary folder for this server process (every ``tempfile`` user in it), removed at exit.

    Python's exit handlers do not run when the server is stopped by SIGTERM (uvicorn re-raises the signal once it
    has shut down), so the folders of servers that are no longer running are removed here, at the next start.
    """
    system = tempfile.gettempdir()
    for old in Path(system).glob(f"{_TEMP_PREFIX}*"):
        pid = old.name[len(_TEMP_PREFIX):].split("_")[0]
        if old.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}_", dir=system)
    tempfile.tempdir = folder
    atexit.register(shutil.rmtree, folder, True)
    return folder


class SynthesisApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        self.tempdir = _private_tempdir()
        self.bundle = _bundle_dir(conf)
        self.device = conf.get("device", "cpu")
        meta = self.bundle / "configs" / "metadata.json"
        version = json.loads(meta.read_text()).get("version", "") if meta.is_file() else ""
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="dual_attention_synthesis",
                         description="Cross-modality synthesis with a dual-attention GAN bundle", version=version)

    def init_infers(self) -> dict:
        from custom_components.apps.label_task import SynthesisTask, Synthesiser

        shared = Synthesiser(self.bundle, {"device": self.device})  # configs read once, networks loaded once
        return {
            "synthesis": SynthesisTask(self.bundle, "synthetic", synthesiser=shared),
            "synthesis_confidence": SynthesisTask(self.bundle, "confidence", synthesiser=shared),
        }

    def init_trainers(self) -> dict:
        return {}  # training runs through `python -m monai.bundle run training`

    def infer(self, request, datastore=None):
        """MONAI Label's inference, with the client's mistakes answered 404 and the reason (MONAI Label itself
        answers them 500): an image id the datastore does not hold, a model the app does not serve."""
        image, store = request.get("image"), datastore or self.datastore()
        if isinstance(image, str) and image and not os.path.exists(image) and isinstance(store, LocalDatastore) \
                and not store.get_image_uri(image):
            known = len(store.list_images())
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore ({known} images; "
                                                        "GET /datastore/?output=all lists them), and no file was "
                                                        "posted.")
        try:
            return super().infer(request, datastore)
        except MONAILabelException as e:  # raised before any task runs: no model given, or not one of ours
            self._remove_posted(image)
            raise HTTPException(status_code=404, detail=f"{e.msg} (models: {', '.join(self._infers)})") from e
        except BaseException:
            self._remove_posted(image)
            raise

    def _remove_posted(self, image) -> None:
        """Delete MONAI Label's copy of a posted file (in this process's temporary folder) after a failed request."""
        if isinstance(image, str) and os.path.isfile(image) and \
                os.path.dirname(os.path.realpath(image)) == os.path.realpath(self.tempdir):
            os.unlink(image)


__all__ = ["SynthesisApp"]
