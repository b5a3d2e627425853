"""The real MONAI Label server serves the synthesis through /infer (slow).

`bash scripts/setup.sh` installs MONAI Label, so the test fails, not skips, when it is missing: a skipped server test
would hide a broken install in CI. Set SKIP_MONAILABEL=1 (as for setup.sh) to skip it where MONAI Label is not wanted.

One server is started for the module, from a copy of monailabel_app/ (its log then stays out of the repository), on a
free port of 127.0.0.1, with a temporary folder of its own (TMPDIR) and a studies folder written by
`scripts/make_phantom.py --studies_dir`, as the docs do it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.config.paths import config_files

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
LOADED = "synthesis: loaded the networks of"  # custom_components.apps.label_task's log line, once per load

if os.environ.get("SKIP_MONAILABEL") == "1":
    pytest.skip("SKIP_MONAILABEL=1", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    missing = [m for m in ("monailabel", "requests") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `bash scripts/setup.sh` (it installs MONAI Label), or "
                    "set SKIP_MONAILABEL=1 to skip this test.")
    import requests

    tmp = tmp_path_factory.mktemp("monailabel")
    bundle = tmp / "bundle"
    shutil.copytree(ROOT / "bundle" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "infer"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", "save_confidence": True})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    torch.save(parser.get_parsed_content("local_discriminator").state_dict(), bundle / "models" / "local_discriminator.pt")
    phantom, studies = tmp / "phantom", tmp / "studies"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_phantom.py"), "--output_dir", str(phantom),
                    "--studies_dir", str(studies), "--n_train", "1", "--n_val", "1", "--n_test", "2",
                    "--shape", "48,48,32", "--seed", "4", "--verbose", "false"], check=True, capture_output=True,
                   timeout=300)
    app = tmp / "app"
    app.mkdir()
    shutil.copy(ROOT / "monailabel_app" / "main.py", app / "main.py")
    server_tmp = tmp / "server_tmp"
    server_tmp.mkdir()
    log = tmp / "server.log"
    port = _free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app),
                                 "--studies", str(studies), "--conf", "bundle", str(bundle), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(server_tmp)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if requests.get(f"{url}/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, f"MONAI Label server exited during start-up:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"MONAI Label server not up after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield {"url": url, "proc": proc, "log": log, "tmp": server_tmp, "after_start": _listing(server_tmp),
               "bundle": bundle, "studies": studies, "phantom": phantom, "root": tmp, "requests": requests}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl+C: a graceful stop, the app's exit handler runs
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _post(server, model: str, path: Path, output: str = "image", name: str | None = None):
    with open(path, "rb") as f:
        return server["requests"].post(f"{server['url']}/infer/{model}", params={"output": output},
                                       files={"file": (name or path.name, f)}, timeout=600)


def test_info_lists_both_models_and_a_non_empty_datastore(server):
    requests, url = server["requests"], server["url"]
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert {k: v["type"] for k, v in info["models"].items()} == {"synthesis": "others", "synthesis_confidence": "others"}
    studies = sorted(p.name.split(".")[0] for p in server["studies"].glob("*.nii.gz"))
    assert len(studies) == 2 and info["datastore"]["total"] == 2
    sample = requests.post(f"{url}/activelearning/random", timeout=30)  # 3D Slicer's "Next Sample"
    assert sample.status_code == 200 and sample.json()["id"] in studies
    # MONAI Label writes its labels/ and datastore_v2.json into the studies folder, never into the data set
    assert (server["studies"] / "labels").is_dir() and not (server["phantom"] / "labels").exists()


def test_infer_returns_float32_outputs_in_source_geometry_equal_to_run_inferring(server, tmp_path):
    source = sorted(server["studies"].glob("*.nii.gz"))[0]
    outputs = {}
    for model in ("synthesis", "synthesis_confidence"):
        reply = _post(server, model, source)
        assert reply.status_code == 200, reply.text[:2000]
        (tmp_path / f"{model}.nii.gz").write_bytes(reply.content)
        outputs[model] = nib.load(tmp_path / f"{model}.nii.gz")
    # the same study by its datastore id (as 3D Slicer asks), and the reply's params: no server-side path
    by_id = server["requests"].post(f"{server['url']}/infer/synthesis",
                                    params={"image": source.name.split(".")[0], "output": "image"}, timeout=600)
    assert by_id.status_code == 200, by_id.text[:2000]
    (tmp_path / "by_id.nii.gz").write_bytes(by_id.content)
    params = _post(server, "synthesis", source, output="json")
    assert params.status_code == 200 and params.json() == {"result": "synthetic", "dtype": "float32",
                                                           "shape": [48, 48, 32], "latency": params.json()["latency"]}
    assert str(server["root"]) not in params.text and "/tmp" not in params.text

    reference, inputs = tmp_path / "cli", tmp_path / "cli_input"
    inputs.mkdir()
    shutil.copy(source, inputs / source.name)
    bundle = server["bundle"]
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file",
                    str(config_files(bundle, "infer")), "--bundle_root", str(bundle), "--input", str(inputs),
                    "--output_dir", str(reference)], check=True, capture_output=True, timeout=600)
    src = nib.load(source)
    stem = source.name.split(".")[0]
    for model, postfix in (("synthesis", "synthetic"), ("synthesis_confidence", "confidence")):
        img = outputs[model]
        assert img.get_data_dtype() == np.float32 and img.shape == src.shape == (48, 48, 32)
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        values = img.get_fdata()
        assert np.isfinite(values).all() and 0 <= values.min() and values.max() <= 1 and values.std() > 0
        expected = nib.load(reference / f"{stem}_{postfix}.nii.gz").get_fdata()
        np.testing.assert_allclose(values, expected, atol=1e-6)  # the bundle's own inference, unchanged
    np.testing.assert_array_equal(nib.load(tmp_path / "by_id.nii.gz").get_fdata(), outputs["synthesis"].get_fdata())


def test_model_endpoint_serves_the_bundles_weights(server):
    requests, url, models = server["requests"], server["url"], server["bundle"] / "models"
    for model, weights in (("synthesis", "model.pt"), ("synthesis_confidence", "local_discriminator.pt")):
        reply = requests.get(f"{url}/model/{model}", timeout=30)
        assert reply.status_code == 200, reply.text[:2000]
        assert reply.content == (models / weights).read_bytes()
        info = requests.get(f"{url}/model/info/{model}", timeout=30)
        assert info.status_code == 200 and info.json()["checksum"].startswith("SHA256:")


def test_bad_inputs_answer_4xx_with_the_reason(server, tmp_path):
    four_d, nan, not_gzip = tmp_path / "four_d.nii.gz", tmp_path / "nan.nii.gz", tmp_path / "text.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10, 2), np.float32), np.eye(4)), str(four_d))
    values = np.ones((20, 20, 10), np.float32)
    values[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(nan))
    not_gzip.write_text("not an image")
    for path, reason in ((four_d, "has shape (20, 20, 10, 2), expected one 3D volume with a single channel"),
                         (nan, "contains 1 non-finite values (NaN/inf)"),
                         (not_gzip, "cannot be read (ImageFileError: File posted.nii.gz is not a gzip file)")):
        reply = _post(server, "synthesis", path)
        assert reply.status_code == 422, (path.name, reply.status_code, reply.text[:2000])
        assert reason in reply.json()["detail"] and "/tmp" not in reply.text, reply.text
    requests, url = server["requests"], server["url"]
    reply = requests.post(f"{url}/infer/synthesis", params={"image": "no_such_study", "output": "image"}, timeout=60)
    assert reply.status_code == 404 and "image 'no_such_study' is not in the datastore" in reply.json()["detail"]
    reply = _post(server, "no_such_model", four_d)
    assert reply.status_code == 404 and "no model 'no_such_model'" in reply.json()["detail"]


def test_requests_leave_no_temporary_file_and_the_networks_load_once(server):
    source = sorted(server["studies"].glob("*.nii.gz"))[-1]
    for model in ("synthesis", "synthesis_confidence", "synthesis"):
        assert _post(server, model, source).status_code == 200
    assert _post(server, "synthesis", Path(__file__), name="x.nii.gz").status_code == 422  # a rejected upload too
    listing = None
    for _ in range(20):  # MONAI Label deletes the sent files in a background task, right after the reply
        listing = _listing(server["tmp"])
        if listing == server["after_start"]:
            break
        time.sleep(0.25)
    assert listing == server["after_start"], f"left behind: {sorted(set(listing) - set(server['after_start']))}"
    assert not [p for p in server["tmp"].rglob("synthesis_*")]
    log = server["log"].read_text()
    assert log.count(LOADED) == 1, [line for line in log.splitlines() if LOADED in line]
    assert log.count("synthesis: synthetic of") >= 2  # the requests did run
    private = [p for p in server["tmp"].iterdir() if p.name.startswith("monailabel_synthesis_")]
    assert len(private) == 1 and list(private[0].iterdir()) == []
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert not private[0].exists()  # the app's own temporary folder goes with the server
