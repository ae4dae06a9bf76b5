"""rbert as a package: ``pip install .`` gives the ``rbert`` command (config found from any
folder) and the import from anywhere; ``requirements-serve.txt`` plus ``pip install --no-deps .``
serves an exported folder with no torch, transformers, Lightning or Hydra in the venv."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

import pytest

from rbert.deploy import OnnxEarlyExitModel, save
from rbert.models import load_tokenizer
from tests.test_deploy import spec_for
from tests.test_inference import tiny_model
from tests.test_run import REPO
from tests.test_serve import free_port

SERVE_REQUIREMENTS = REPO / "requirements-serve.txt"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """rbert built once as a wheel (no build isolation: no download of setuptools)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, cwd=out)
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' staging folder
    return next(out.glob("rbert-*.whl"))


def pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pip_install_gives_the_command_and_the_import_from_any_folder(wheel, glue_dir, tmp_path):
    """A venv that sees this machine's packages: ``pip install`` must find every declared
    dependency range satisfied here (``--no-index``: nothing is downloaded)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True)  # its pip and setuptools: this machine's
    python = env_dir / "bin" / "python"
    pip(python, "--no-index", str(wheel))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import rbert.cli, rbert.deploy; print(rbert.cli.config_dir())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" in where and (Path(where) / "config.yaml").is_file()
    proc = subprocess.run([str(env_dir / "bin" / "rbert"), "task=sst2", "model=romebert", "backbone=tiny",
                           f"data_dir={glue_dir}", "trainer.max_epochs=1", "data.train_limit=32", "logger=none",
                           "test=false", "eval.after_train=false", "hydra.run.dir=run"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run" / "checkpoints" / "best.ckpt").is_file() and (work / "run" / "run.log").is_file()


def serve_venv() -> Path:
    """A venv with requirements-serve.txt only, kept between runs under the user's cache (keyed
    by the file's content) so that CI downloads it once."""
    key = hashlib.sha256(SERVE_REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:12]
    env_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rbert" / f"serve-venv-{key}"
    python = env_dir / "bin" / "python"
    if not (env_dir / "ready").is_file():
        shutil.rmtree(env_dir, ignore_errors=True)
        venv.create(env_dir, with_pip=True)
        pip(python, "-r", str(SERVE_REQUIREMENTS))
        (env_dir / "ready").touch()
    return python


def test_the_server_runs_from_requirements_serve_alone(wheel, tmp_path):
    python = serve_venv()
    pip(python, "--no-deps", "--force-reinstall", str(wheel))
    for missing in ("torch", "transformers", "pytorch_lightning", "hydra", "onnx"):
        proc = subprocess.run([str(python), "-c", f"import {missing}"], capture_output=True)
        assert proc.returncode != 0, f"{missing} is installed in the serving venv"
    net = tiny_model(num_labels=3, pooling="mean")
    folder = save(tmp_path / "model", net, load_tokenizer("tiny"), spec_for(net))
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([str(python.parent / "rbert-serve"), str(folder), "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    assert json.load(r) == {"ready": True}
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()
                time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", method="POST",
                                         data=json.dumps({"texts": ["a fine film", "dull"]}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            answers = json.load(r)["predictions"]
        print(f"serving venv: first answer {time.perf_counter() - start:.2f} s after start")
        here = OnnxEarlyExitModel.from_pretrained(folder).predict(["a fine film", "dull"])
        assert answers == here
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
