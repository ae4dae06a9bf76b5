"""``mode=export`` (``python run.py --config-name pretrain mode=export ckpt_path=... export_dir=...``).

Writes a pre-training checkpoint as a Hugging Face folder (``model.safetensors``, config,
tokenizer) that ``transformers.AutoModelForMaskedLM`` loads and every ``model=`` option
fine-tunes (``backbone=<folder>``). A CoRe checkpoint from either phase is expanded into a
standard BERT on the way (W <- U V, softmax attention): for phase 1, that is CoRe's
expansion without the phase-2 training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from rbert.build import load_system
from rbert.errors import ConfigError
from rbert.models.hub import load_tokenizer

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path"):
        raise ConfigError("mode=export needs ckpt_path=<a pre-training checkpoint>")
    if not cfg.get("export_dir"):
        raise ConfigError("mode=export needs export_dir=<the folder to write>")
    system, train_cfg, ckpt = load_system(cfg.ckpt_path)
    if not hasattr(system, "export_net"):
        raise ConfigError(f"ckpt_path: {cfg.ckpt_path} is not a pre-training checkpoint (model "
                          f"{train_cfg.model._target_}); fine-tuned models are used with mode=eval/predict")
    try:
        net = system.export_net()
    except ValueError as err:
        raise ConfigError(f"ckpt_path: {cfg.ckpt_path}: {err}") from err
    out = Path(cfg.export_dir)
    net.save_pretrained(out)
    load_tokenizer(train_cfg.tokenizer, "tokenizer").save_pretrained(out)
    print(f"Hugging Face model + tokenizer written to {out} (from {cfg.ckpt_path}: phase/stage "
          f"{ckpt.get('rbert_stage', 0) + 1} of {system.num_stages}, step {ckpt.get('global_step')})")
    return {"export_dir": str(out)}
