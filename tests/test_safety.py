"""Files a user hands in are data: a checkpoint never runs code, nor names code to run."""

from __future__ import annotations

import os

import pytest
import torch

from rbert.build import load_system
from rbert.errors import ConfigError
from tests.test_run import run_cli


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["test", "eval", "pretrain", "export"])
def test_a_checkpoint_that_runs_code_is_refused(how, glue_dir, text_dir, tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "rbert_config": {}, "epoch": Payload(marker)}, ckpt)
    args = {"test": ["train=false", f"data_dir={glue_dir}"],
            "eval": ["mode=eval", f"data_dir={glue_dir}"],
            "pretrain": ["arch=tiny", f"data_dir={text_dir}"],
            "export": ["mode=export", f"export_dir={tmp_path / 'hf'}"]}[how]
    config = {"config": "pretrain", "backbone": False} if how in ("pretrain", "export") else {}
    proc = run_cli(tmp_path / "run", *args, f"ckpt_path={ckpt}", check=False, **config)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: ckpt_path: {ckpt} holds more than tensors and plain values; refused" in proc.stderr
    assert not marker.exists()


def test_a_stored_config_may_only_name_rbert_targets(tmp_path):
    ckpt = tmp_path / "foreign.ckpt"
    config = {"task": None, "model": {"_target_": "os.system", "command": "echo hi"}}
    torch.save({"state_dict": {}, "rbert_config": config}, ckpt)
    with pytest.raises(ConfigError, match=r"model._target_='os.system' is not one of rbert's own; refused"):
        load_system(str(ckpt))
    config["model"] = {"_target_": "rbert.systems.MaskedLM", "net": {"_target_": "subprocess.run", "args": "ls"}}
    torch.save({"state_dict": {}, "rbert_config": config}, ckpt)
    with pytest.raises(ConfigError, match=r"model.net._target_='subprocess.run'"):
        load_system(str(ckpt))
