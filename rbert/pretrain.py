"""``mode=pretrain`` (``python run.py --config-name pretrain``): masked-LM pre-training.

Fits the system (every stage), validates the final weights on every evaluation set, writes
them as a Hugging Face folder (model + tokenizer) that fine-tunes directly
(``python run.py task=sst2 backbone=<run>/hf``), and reports loss, perplexity and
masked-token accuracy per set in a table and ``results.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rbert.build import model_choice
from rbert.data.vocab import TRAIN, train_tokenizer
from rbert.errors import ConfigError
from rbert.fit import best_checkpoint, fit, resume_checkpoint, setup_run
from rbert.report import format_table, write_json
from rbert.tracking import log_curve, log_summary

log = logging.getLogger(__name__)


def check(cfg: DictConfig, system, datamodule) -> None:
    """Settings that would otherwise fail only after (or well into) training."""
    max_positions = system.net.config.max_position_embeddings
    if datamodule.max_seq_len > max_positions:
        raise ConfigError(f"data.max_seq_len={datamodule.max_seq_len} exceeds the model's max_position_embeddings="
                          f"{max_positions} (arch)")
    if len(datamodule.tokenizer) > system.net.config.vocab_size:
        raise ConfigError(f"tokenizer: {len(datamodule.tokenizer)} tokens, but the model's vocabulary has "
                          f"{system.net.config.vocab_size}")
    if cfg.get("export_dir"):
        try:
            system.check_exportable()
        except ValueError as err:
            raise ConfigError(f"export_dir: {err}; set export_dir=null") from err


def own_vocabulary(cfg: DictConfig) -> None:
    """``tokenizer=train``: train (or find cached) the run's vocabulary on its training text, copy
    it into the run folder and point ``tokenizer`` there, so the data, the model, the stored
    config (``mode=export``) and the exported folder all use it."""
    if cfg.tokenizer != TRAIN:
        return
    if cfg.get("data_dir") is None:
        raise ConfigError("tokenizer=train: trains on local text files; set data_dir (or RBERT_TEXT_DIR)")
    splits = list(cfg.vocab.splits)
    unknown = [s for s in splits if s not in cfg.data.files]
    if unknown:
        raise ConfigError(f"vocab.splits: {unknown} not among data.files ({list(cfg.data.files)})")
    files = [Path(cfg.data_dir).expanduser() / cfg.data.files[s] for s in splits]
    folder = train_tokenizer(files, cfg.vocab.size, cfg.vocab.base, cfg.paths.cache_dir,
                             Path(cfg.paths.output_dir) / "tokenizer")
    cfg.tokenizer = str(folder)
    log.info("own vocabulary of %d tokens (trained on %s) in %s", cfg.vocab.size, ", ".join(splits), folder)


def run(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = resume_checkpoint(cfg)
    own_vocabulary(cfg)
    system, datamodule, loggers = setup_run(cfg)
    check(cfg, system, datamodule)
    trainer, checkpoints = fit(cfg, system, datamodule, loggers, ckpt_path)
    steps = system.steps_before_stage() + trainer.global_step  # over all stages
    if system.validated_at != trainer.global_step:  # the final weights, unless just validated
        trainer.validate(system, datamodule=datamodule, verbose=False)
    results = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.split("/")[0] in datamodule.eval_splits}
    if not trainer.is_global_zero:
        return results
    out = Path(cfg.paths.output_dir)
    export = Path(cfg.export_dir) if cfg.get("export_dir") else None
    if export is not None:
        system.export_net().save_pretrained(export)
        datamodule.tokenizer.save_pretrained(export)
        log.info("Hugging Face model + tokenizer written to %s", export)
    rows = [{"set": prefix, **{k.split("/")[1]: v for k, v in results.items() if k.startswith(f"{prefix}/")}}
            for prefix in datamodule.eval_splits]
    arch = HydraConfig.get().runtime.choices.get("arch") if HydraConfig.initialized() else None
    print(f"\npretrain model={model_choice(cfg)} arch={arch} steps={steps} "
          f"train time={system.train_seconds:.0f} s seed={cfg.seed}\n{format_table(rows)}\n")
    best = best_checkpoint(checkpoints)
    summary = {"final": results, "steps": steps, "train_seconds": system.train_seconds,
               "seed": cfg.seed, "export": str(export) if export else None,
               "checkpoint": best.best_model_path if best else None,
               "objective": {cfg.objective: results.get(cfg.objective)}}
    if best is not None and best.best_model_score is not None:
        summary["best_val"] = {best.monitor: float(best.best_model_score)}
    write_json(out / "results.json", summary)
    log_curve(loggers, "curves/val_loss_vs_time", system.history, "train_minutes", "val/loss",
              "validation MLM loss vs training time")
    log_summary(loggers, {**results, "steps": steps, "train_seconds": system.train_seconds})
    return results
