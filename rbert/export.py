"""``mode=export``: a checkpoint as a folder that runs outside the training code.

``python run.py mode=export ckpt_path=<.ckpt> [export_dir=<folder>]`` takes either kind:

* a **fine-tuned** checkpoint (any ``model=`` option) becomes an exported early-exit folder
  (:mod:`rbert.deploy`): weights, tokenizer, the exits and the exit policy with its
  threshold (``exit_policy=budget`` picks it on the dev set now), and ONNX graphs for the
  onnxruntime runtime (``export_onnx=false``: none). It loads with
  ``rbert.deploy.EarlyExitModel.from_pretrained`` and serves with ``mode=serve``.
  A single-exit model (``model=bert``) exports as one exit, answered at full depth.
* a **pre-training** checkpoint becomes a Hugging Face folder (``model.safetensors``,
  config, tokenizer) that ``transformers.AutoModelForMaskedLM`` loads and every ``model=``
  option fine-tunes (``backbone=<folder>``). A CoRe checkpoint from either phase is expanded
  into a standard BERT on the way (W <- U V, softmax attention): for phase 1, that is CoRe's
  expansion without the phase-2 training.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from rbert.build import load_system
from rbert.errors import ConfigError
from rbert.models.hub import load_tokenizer
from rbert.systems.base import TaskSystem

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path"):
        raise ConfigError("mode=export needs ckpt_path=<a fine-tuned or pre-training checkpoint>")
    if not cfg.get("export_dir"):
        raise ConfigError("mode=export needs export_dir=<the folder to write>")
    system, train_cfg, ckpt = load_system(cfg.ckpt_path)
    if isinstance(system, TaskSystem):
        if "exit_policy" not in cfg:
            raise ConfigError(f"ckpt_path: {cfg.ckpt_path} is a fine-tuned checkpoint: export it without "
                              "--config-name pretrain (python run.py mode=export ckpt_path=...)")
        return export_fine_tuned(cfg, system, train_cfg, ckpt)
    if not hasattr(system, "export_net"):
        raise ConfigError(f"ckpt_path: {cfg.ckpt_path}: model {train_cfg.model._target_} has no export")
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


def export_fine_tuned(cfg: DictConfig, system: TaskSystem, train_cfg: DictConfig, ckpt: dict) -> dict:
    from rbert.build import build_datamodule
    from rbert.deploy import DeploySpec, FolderError, save
    from rbert.inference.policies import BudgetExit, NoExit, policy_from_dict, policy_to_dict
    from rbert.inference.prepare import prepare, resolve_budget
    from rbert.models.classifier import BertForSequenceClassification
    from rbert.models.multi_exit import MultiExitBert
    from rbert.models.token_heads import BertForTokenClassification, MultiExitTokenBert

    quantize = cfg.get("export_quantize")
    if quantize not in (None, "int8"):
        raise ConfigError(f"export_quantize: {quantize!r} is not one of null, int8")
    if quantize and not cfg.get("export_onnx", True):
        raise ConfigError("export_quantize=int8 quantises the ONNX graphs: it needs export_onnx=true")
    task = system.task
    tagging = task.kind == "tagging"
    trained = [int(layer) for layer in ckpt.get("rbert_trained_exits", system.exit_layers)]
    budget = None
    single = {BertForSequenceClassification: MultiExitBert, BertForTokenClassification: MultiExitTokenBert}
    if type(system.net) in single:  # one exit: nothing to choose
        net, layers, policy, choice = single[type(system.net)].from_classifier(system.net), trained[-1:], NoExit(), None
        datamodule = None
    else:
        setup = prepare(cfg, loaded=(system, train_cfg, trained))
        net, layers, datamodule = setup.net, setup.layers, setup.datamodule
        policy, choice = resolve_budget(setup)
        budget = setup.policy if isinstance(setup.policy, BudgetExit) else None
    labels = [] if task.is_regression else [str(label) for label in (task.labels or range(task.num_labels))]
    spec = DeploySpec(task=task.name, text_fields=["words"] if tagging else list(task.text_fields), labels=labels,
                      max_length=int(train_cfg.data.max_length), exit_layers=list(net.exit_layers),
                      trained_exits=trained, consulted_exits=layers, style="token" if tagging else net.style,
                      pooling="none" if tagging else net.pooling, policy=policy_to_dict(policy),
                      policy_choice=choice, objective=str(train_cfg.model._target_).rsplit(".", 1)[-1],
                      kind=task.kind, scheme=getattr(task, "scheme", None))
    after_onnx = None
    if quantize:
        if datamodule is None:
            select = cfg.data.get("select_rows") or train_cfg.get("data", {}).get("select_rows")
            datamodule = build_datamodule(cfg, task, backbone=train_cfg.backbone, select_rows=select)
        after_onnx = partial(to_int8, loader=datamodule.selection_loader(), task=task, budget=budget)
    try:
        out = save(cfg.export_dir, net.cpu(), load_tokenizer(train_cfg.backbone), spec,
                   onnx=bool(cfg.get("export_onnx", True)), after_onnx=after_onnx)
    except FolderError as err:
        raise ConfigError(f"export_dir: {err}") from err
    graphs = len(spec.onnx.get("segments", []))
    # what the folder answers with (int8 may have chosen again); token-level exit's rule is its own kind
    described = policy.describe() if spec.policy == policy_to_dict(policy) else policy_from_dict(spec.policy).describe()
    choice = spec.policy_choice
    print(f"early-exit model written to {out}: {task.name}, exits {layers} of {net.exit_layers}, "
          f"policy {described}" + (f" (chosen: {choice})" if choice else "")
          + (f", {graphs} ONNX graphs ({spec.onnx['exporter']})" if graphs else ", no ONNX graphs")
          + (f", int8: {spec.onnx['quantization']['per_exit']}" if quantize else ""))
    return {"export_dir": str(out), "policy": described, "consulted_exits": layers}


def to_int8(folder: Path, spec, loader, task, budget) -> None:
    """``export_quantize=int8``: quantise the folder's graphs, measure every exit before and
    after on the selection split (else dev), choose a budget's threshold again on the int8
    exits, and compose the batch-size-1 graph from the int8 graphs."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from rbert.deploy.onnx_export import write_fused
    from rbert.deploy.quantize import graph_exit_logits, quantize_graphs
    from rbert.inference.policies import policy_to_dict
    from rbert.inference.sweep import IGNORE, TagTargets, sweep, task_metric

    names = ("input_ids", "attention_mask", "token_type_ids")
    batches, originals = [], []
    for batch in loader:
        ids = batch["input_ids"].numpy()
        batches.append({k: batch[k].numpy().astype(np.int64) if k in batch else np.zeros_like(ids) for k in names})
        originals.append(batch)
    if task.kind == "tagging":  # word labels padded as graph_exit_logits pads the token logits
        width = max(b["labels"].shape[1] for b in originals)
        labels = TagTargets(torch.cat([F.pad(b["labels"], (0, width - b["labels"].shape[1]), value=IGNORE)
                                       for b in originals]),
                            torch.cat([b["sentence"] for b in originals]), torch.cat([b["window"] for b in originals]))
    else:
        labels = torch.cat([b["labels"] for b in originals])

    def per_exit(logits: list[np.ndarray]) -> list[float]:
        return [round(task_metric(task, torch.from_numpy(z), labels)[task.monitor], 5) for z in logits]

    fp32 = per_exit(graph_exit_logits(folder, spec.onnx, batches))
    record = quantize_graphs(folder, spec.onnx)
    int8_logits = graph_exit_logits(folder, spec.onnx, batches)
    record["per_exit"] = {"exits": spec.consulted_exits, "metric": task.monitor, "rows": len(labels),
                          "fp32": fp32, "int8": per_exit(int8_logits)}
    if budget is not None:  # the threshold the fp32 exits earned may not hold on int8 ones
        rows = sweep(budget.base, [torch.from_numpy(z) for z in int8_logits], labels, spec.consulted_exits, task)
        record["fp32_policy"], record["fp32_policy_choice"] = spec.policy, spec.policy_choice
        spec.policy = policy_to_dict(budget.choose(rows, as_policy=True))
        spec.policy_choice = {**budget.choose(rows), "on": "int8 graphs"}
    spec.onnx["quantization"] = record
    write_fused(folder, spec.onnx, spec.policy, spec.num_labels)
