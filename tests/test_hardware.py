"""Hardware options a machine lacks fail in one line before any process starts; bad input meant
for DDP children is found in the launching process (one line, exit 2, no gloo traceback)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rbert.errors import ConfigError
from rbert.hardware import check_trainer, is_multi_process
from tests.test_run import run_cli

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")


@no_gpu
@pytest.mark.parametrize("trainer", ["gpu", "amp", "ddp", "slurm"])
def test_gpu_options_without_a_gpu_fail_in_one_line(trainer, glue_dir, tmp_path):
    proc = run_cli(tmp_path / "run", f"trainer={trainer}", f"data_dir={glue_dir}", check=False, isolated=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: trainer={trainer}: this machine has no usable CUDA GPU")
    assert "trainer=cpu runs here" in lines[-1] and "Traceback" not in proc.stderr
    assert ("trainer=ddp_cpu" in lines[-1]) == (trainer in ("ddp", "slurm"))


def test_ddp_child_data_error_is_one_line_from_the_launching_process(glue_dir, tmp_path):
    """The design card's command on a CPU machine whose GLUE folder lacks MNLI."""
    data = tmp_path / "glue"
    data.mkdir()
    (data / "SST-2").symlink_to(glue_dir / "SST-2")
    proc = run_cli(tmp_path / "run", "task=mnli", "model=romebert", "trainer=ddp_cpu", f"data_dir={data}",
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data_dir: {data} has no MNLI folder")
    assert "Traceback" not in proc.stderr and "gloo" not in proc.stderr.lower()


def trainer(**fields):
    return OmegaConf.create({"trainer": {"_target_": "pytorch_lightning.Trainer", **fields}})


def test_checks_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    check_trainer(trainer(accelerator="gpu", devices=2))
    with pytest.raises(ConfigError, match=r"trainer.devices=4: this machine has 2 GPU\(s\)"):
        check_trainer(trainer(accelerator="gpu", devices=4))
    slurm = trainer(accelerator="gpu", devices=2, strategy="ddp",
                    plugins=[{"_target_": "pytorch_lightning.plugins.environments.SLURMEnvironment"}])
    with pytest.raises(ConfigError, match="not inside a SLURM job"):
        check_trainer(slurm)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    check_trainer(slurm)


def test_which_trainers_start_processes():
    assert is_multi_process(trainer(strategy="ddp", devices=2).trainer)
    assert is_multi_process(trainer(strategy="ddp", devices=-1).trainer)
    assert is_multi_process(trainer(strategy="ddp", devices=1, num_nodes=2).trainer)
    assert not is_multi_process(trainer(strategy="ddp", devices=1).trainer)
    assert not is_multi_process(trainer(accelerator="cpu", devices=1).trainer)
