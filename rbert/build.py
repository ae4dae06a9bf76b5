"""Config or checkpoint -> objects: what train, pretrain, eval, predict and the benches share.

A run's objects are built from its composed config: the task (absent for pre-training),
the system (LightningModule), the datamodule, loggers, callbacks and one Trainer per
training stage. A checkpoint written by rbert stores that config (plain containers), so
:func:`load_system` rebuilds the same system from the file alone.

Checkpoints are user files, so they are data, never code: they are read with
``torch.load(weights_only=True)`` and the stored config may only name rbert's own targets
(and the optimisers it builds) before anything is instantiated from it.
"""

from __future__ import annotations

import inspect
import pickle
import zipfile
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import rbert.launch  # noqa: F401  (registers the rbert.run_id resolver that conf/hydra/default.yaml uses)
from rbert.errors import ConfigError, option_message

# What a config stored in a checkpoint may instantiate: classes and functions defined in rbert
# (see allowed_target), and these optimisers.
ALLOWED_OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD")


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-shaped group (``logger``, ``callbacks``)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


# ---------------------------------------------------------------------------- from a config
def build_task(cfg: DictConfig):
    """The run's :class:`~rbert.data.tasks.TaskSpec`, or None for a task-free (pre-training) run."""
    return hydra.utils.instantiate(cfg.task) if cfg.get("task") is not None else None


def check_optimisation(cfg: DictConfig) -> None:
    """Ranges of the settings every system shares (the rest are checked where they are used)."""
    lr = OmegaConf.select(cfg, "model.optimizer.lr")
    if lr is not None and not float(lr) > 0:
        raise ConfigError(f"model.optimizer.lr must be > 0, got {lr}")
    warmup = OmegaConf.select(cfg, "model.warmup_ratio")
    if warmup is not None and not 0 <= float(warmup) < 1:
        raise ConfigError(f"model.warmup_ratio must lie in [0, 1), got {warmup}")


MODELS_DIR = Path(__file__).resolve().parent / "models"


def model_error(err: BaseException | None) -> ValueError | None:
    """The plain ValueError raised by model code (rbert/models) behind ``err``, if any: models
    know nothing of configs, so the build layer names the option (``model.net``)."""
    while err is not None:
        if isinstance(err, ValueError) and not isinstance(err, ConfigError):
            tb = err.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(MODELS_DIR):
                return err
        err = err.__cause__ or err.__context__
    return None


# A tagging task's heads: every ``model=`` names a sentence network; the task's kind swaps in
# the token one (no pooler: ``pooling`` and ``style`` have no meaning there).
TOKEN_NETS = {"rbert.models.BertForSequenceClassification": "rbert.models.BertForTokenClassification",
              "rbert.models.MultiExitBert": "rbert.models.MultiExitTokenBert"}
SENTENCE_ONLY = ("pooling", "style")


def model_config(cfg: DictConfig, task=None) -> DictConfig:
    """``cfg.model``, with token heads when ``task`` is a tagging task."""
    if getattr(task, "kind", None) != "tagging":
        return cfg.model
    model = cfg.model.copy()
    target = OmegaConf.select(model, "net._target_")
    if target not in TOKEN_NETS:
        raise ConfigError(f"model: task {task.name} tags words, and model.net._target_={target!r} has no token "
                          f"heads (the sentence models that do: {', '.join(TOKEN_NETS)})")
    with open_dict(model):
        model.net._target_ = TOKEN_NETS[target]
        for key in SENTENCE_ONLY:
            model.net.pop(key, None)
    return model


def build_system(cfg: DictConfig, task=None) -> pl.LightningModule:
    check_optimisation(cfg)
    try:
        # Partial, then called: Hydra would turn the TaskSpec object into a config node.
        if task is None:
            return hydra.utils.instantiate(cfg.model)
        return hydra.utils.instantiate(model_config(cfg, task), _partial_=True)(task=task)
    except Exception as err:
        cause = model_error(err)
        if cause is None:
            raise
        raise ConfigError(option_message("model.net", str(cause))) from err


def build_datamodule(cfg: DictConfig, task=None, **overrides) -> pl.LightningDataModule:
    if task is None:
        return hydra.utils.instantiate(cfg.data, **overrides)
    return hydra.utils.instantiate(cfg.data, _partial_=True)(task=task, **overrides)


def model_choice(cfg: DictConfig) -> str:
    """The ``model=`` option of the run (its target outside a Hydra run)."""
    return HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else cfg.model._target_


def make_trainer(cfg: DictConfig, system, loggers: list, stage: int) -> tuple[pl.Trainer, list]:
    """A Trainer for one training stage, and its checkpoint callbacks.

    A checkpoint callback whose config has ``monitor: null`` and keeps checkpoints
    (``save_top_k != 0``) watches what the system's ``monitor()`` names, in its direction
    (task metrics up, MLM loss down). Callbacks that write files (``dirpath``) write into
    ``stage<N>/`` when the system has several stages.
    """
    system.set_stage(stage)
    key, mode = system.monitor() or (None, "min")
    callbacks = []
    for c in (cfg.get("callbacks") or {}).values():
        if not (isinstance(c, DictConfig) and "_target_" in c):
            continue
        overrides = {}
        if system.num_stages > 1 and c.get("dirpath"):
            overrides["dirpath"] = f"{c.dirpath}/stage{stage + 1}"
        if "monitor" in c and c.monitor is None and c.get("save_top_k", 1) != 0:
            overrides.update(monitor=key, mode=mode)
        callbacks.append(hydra.utils.instantiate(c, **overrides))
    checkpoints = [c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                      enable_checkpointing=bool(checkpoints), **system.stage_overrides(stage))
    return trainer, checkpoints


# ---------------------------------------------------------------------------- from a checkpoint
def check_checkpoint(path: str) -> str:
    """Fail early, in one line, on a checkpoint that could not be read."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"ckpt_path: {file} does not exist")
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive
        raise ConfigError(f"ckpt_path: {file} is not a readable PyTorch checkpoint")
    return str(file)


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents, unpickling only tensors and plain containers (no code runs).

    Memory-mapped: reading a stored setting does not load every tensor.
    """
    path = check_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:  # anything beyond tensors and plain containers
        raise ConfigError(f"ckpt_path: {path} holds more than tensors and plain values; refused") from err
    except (RuntimeError, OSError, EOFError) as err:
        raise ConfigError(f"ckpt_path: {path} is not a readable PyTorch checkpoint "
                          f"({str(err).splitlines()[0]})") from err


def allowed_target(target: str) -> bool:
    """Whether a stored ``_target_`` names one of rbert's own classes or functions (or an allowed optimiser).

    The target is resolved and its defining module checked, not its spelling: a path such as
    ``rbert.models.bert.os.system`` starts with ``rbert.`` but resolves to ``os.system``.
    """
    if target in ALLOWED_OPTIMIZERS:
        return True
    if not target.startswith("rbert."):
        return False
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target)
    except ImportError:
        return False
    return (isinstance(obj, type) or inspect.isfunction(obj)) and obj.__module__.startswith("rbert.")


def check_targets(node, path: str, where: str) -> None:
    """Refuse a stored config that would instantiate anything but rbert's own classes."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None and not allowed_target(str(target)):
            raise ConfigError(f"ckpt_path: {path}: stored config {where}._target_={target!r} is not one of "
                              "rbert's own; refused")
        for key, value in node.items():
            check_targets(value, path, f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            check_targets(value, path, f"{where}[{i}]")


def stored_config(path: str, ckpt: dict) -> DictConfig:
    if "rbert_config" not in ckpt:
        raise ConfigError(f"ckpt_path: {path} was not written by rbert's run.py (no rbert_config inside)")
    cfg = OmegaConf.create(ckpt["rbert_config"])
    for key in ("task", "model"):
        if cfg.get(key) is not None:
            check_targets(cfg[key], path, key)
    return cfg


def load_system(ckpt_path: str) -> tuple[pl.LightningModule, DictConfig, dict]:
    """Rebuild a trained system from its checkpoint; also the config that trained it and the checkpoint.

    The stage is restored *before* the weights load: a stage may change parameter shapes.
    """
    ckpt = read_checkpoint(ckpt_path)
    train_cfg = stored_config(ckpt_path, ckpt)
    system = build_system(train_cfg, build_task(train_cfg))
    system.set_stage(int(ckpt.get("rbert_stage", 0)))
    try:
        system.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"ckpt_path: {ckpt_path}: weights do not fit the model its config describes: "
                          f"{str(err).splitlines()[0]}") from err
    return system.eval(), train_cfg, ckpt


def stored_stage(system: pl.LightningModule, ckpt_path: str) -> int:
    """The training stage a checkpoint was saved in (multi-stage objectives resume there).

    Before Lightning opens the file, this vets it (tensors and plain values only) and checks,
    in that stage, that its weights fit the system this run built: a checkpoint of another
    model or another backbone size is refused in one line instead of a shape traceback.
    """
    ckpt = read_checkpoint(ckpt_path)
    stage = int(ckpt.get("rbert_stage", 0))
    system.set_stage(stage)
    own = {k: tuple(v.shape) for k, v in system.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in ckpt.get("state_dict", {}).items()}
    missing, unexpected = sorted(own.keys() - stored.keys()), sorted(stored.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & stored.keys() if own[k] != stored[k])
    if missing or unexpected or reshaped:
        if reshaped:
            diff = f"{reshaped[0]} is {list(stored[reshaped[0]])} there, {list(own[reshaped[0]])} here"
        else:
            diff = f"{(missing or unexpected)[0]} is {'missing there' if missing else 'not in this model'}"
        cfg = ckpt.get("rbert_config") or {}
        arch = cfg.get("arch") or {}
        made = ", ".join(f"{k}={v}" for k, v in (
            ("model", (cfg.get("model") or {}).get("_target_")), ("backbone", cfg.get("backbone")),
            ("arch", arch and f"{arch.get('num_hidden_layers')} layers x {arch.get('hidden_size')}")) if v)
        raise ConfigError(f"ckpt_path: {ckpt_path} does not fit this run's model ({diff}; it was trained with "
                          f"{made or 'another config'})")
    return stage
