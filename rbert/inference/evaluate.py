"""``mode=eval``: early-exit evaluation of a fine-tuned checkpoint (and what ``mode=predict`` shares).

eval, on the task's first dev set:
  * forced per-exit metrics (every sample through exit i), from one full forward pass;
  * a threshold sweep of the chosen policy: metric vs layer-count speed-up (L / mean exit
    layer) and expected saving, simulated from that pass (exactly what the engine answers);
  * measured wall-clock time of the engine at batch size 1 and batched, against a full
    forward pass, for every sweep point;
  * a table, ``sweep.csv`` / ``eval.json`` and ``sweep.png`` in the run folder (and W&B).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from rbert.build import build_datamodule, instantiate_all, load_system
from rbert.data.tasks import TaskSpec
from rbert.errors import ConfigError
from rbert.inference.engine import EarlyExit, simulate
from rbert.inference.plot import plot_curves
from rbert.inference.policies import BudgetExit, ExitPolicy, NoExit
from rbert.metrics import build_metrics, predictions
from rbert.models.multi_exit import MultiExitBert
from rbert.report import atomic_write_text, format_table, write_json
from rbert.systems.base import TaskSystem

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- loading
def load_task_system(ckpt_path: str) -> tuple[TaskSystem, DictConfig, list[int]]:
    """Rebuild a fine-tuned system from its checkpoint (the config that trained it is stored inside).

    Also returns the layers of the exits its objective had trained when the checkpoint was
    written (e.g. only the final one after DeeBERT's stage 1): early exit uses only those.
    """
    system, train_cfg, ckpt = load_system(ckpt_path)
    if not isinstance(system, TaskSystem):
        raise ConfigError(f"ckpt_path: {ckpt_path} is a pre-training checkpoint; fine-tune it first "
                          "(its run folder's hf/ is a backbone: backbone=<run>/hf)")
    trained = [int(layer) for layer in ckpt.get("rbert_trained_exits", system.exit_layers)]
    return system, train_cfg, trained


def multi_exit_net(system: TaskSystem, policy: ExitPolicy, trained: list[int]) -> MultiExitBert | None:
    net = getattr(system, "net", None)
    policy.check(system.task.num_labels, len(trained))
    return net if isinstance(net, MultiExitBert) else None


def task_metric(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    metrics = build_metrics(task)
    metrics.update(predictions(logits, task), labels)
    return {k: float(v) for k, v in metrics.compute().items()}


# ---------------------------------------------------------------------------- measuring
@torch.no_grad()
def exit_logits(system: TaskSystem, loader, device: torch.device, autocast) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's logits on every sample (one full pass), and the labels."""
    outs, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            outs.append([z.float().cpu() for z in system(batch)])
        labels.append(batch["labels"].cpu())
    return [torch.cat(per_exit) for per_exit in zip(*outs)], torch.cat(labels)


def only(logits: list[torch.Tensor], exit_layers: list[int], keep: list[int]) -> list[torch.Tensor]:
    """The logits of the exits at the layers ``keep``, from those of all exits."""
    return [logits[exit_layers.index(layer)] for layer in keep]


def time_in_turns(calls: dict[str, Callable[[int], object]], count: int, repeats: int = 3,
                  sync: Callable[[], object] | None = None) -> dict[str, float]:
    """Seconds each of ``calls`` takes over items ``0..count-1``: the sum over items of each
    item's best of ``repeats`` timings.

    Every item is timed with each call in turn, the order rotating between passes. On a shared
    machine a stall or slow spell then spoils one item's time in one pass, not a whole pass,
    and hits every call alike; bs=1 timings especially were noisy without this.
    """
    names = list(calls)
    best = {name: [float("inf")] * count for name in names}
    sync = sync or (lambda: None)
    for call in calls.values():
        call(0)  # warm-up
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for i in range(count):
            for name in order:
                sync()
                start = time.perf_counter()
                calls[name](i)
                sync()
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(times) for name, times in best.items()}


def time_runs(engines: dict[str, EarlyExit], batches: list[dict], device, autocast,
              repeats: int = 3) -> dict[str, float]:
    """Seconds each engine takes to answer ``batches`` (see :func:`time_in_turns`)."""
    def call(engine):
        return lambda i: engine(batches[i]["input_ids"], batches[i]["attention_mask"], batches[i]["token_type_ids"])

    with torch.inference_mode(), autocast():
        return time_in_turns({name: call(e) for name, e in engines.items()}, len(batches), repeats,
                             torch.cuda.synchronize if device.type == "cuda" else None)


def sweep(policy: ExitPolicy, logits: list[torch.Tensor], labels: torch.Tensor, layers: list[int],
          task: TaskSpec) -> list[dict]:
    """Simulated metric and layer-count speed-up for each threshold of ``policy.sweep``."""
    num_layers = layers[-1]
    full = task_metric(task, logits[-1], labels)[task.monitor]
    rows = []
    for value in policy.sweep or [None]:
        p = policy if value is None else policy.with_threshold(value)
        result = simulate(p, logits, layers)
        mean_layer = result.exit_layer.float().mean().item()
        metrics = task_metric(task, result.logits, labels)
        rows.append({"policy": p.describe(), "threshold": value, **metrics,
                     "drop": 100 * (full - metrics[task.monitor]), "mean_exit_layer": mean_layer,
                     "layer_speedup": num_layers / mean_layer, "expected_saving": 1 - mean_layer / num_layers})
    return rows


# ---------------------------------------------------------------------------- modes
@dataclass
class Setup:
    policy: ExitPolicy
    system: TaskSystem
    net: MultiExitBert | None    # None: a single-exit model
    trained: list[int]           # layers of the exits the checkpoint's objective trained
    layers: list[int]            # the exits that may answer: trained, and in eval.exit_layers if given
    device: torch.device
    autocast: Callable
    datamodule: object
    train_cfg: DictConfig


def prepare(cfg: DictConfig) -> Setup:
    policy: ExitPolicy = hydra.utils.instantiate(cfg.exit_policy)
    system, train_cfg, trained = load_task_system(cfg.ckpt_path)
    layers = trained
    if cfg.eval.get("exit_layers"):  # fewer exits: less per-exit work, coarser exit choices
        wanted = sorted({int(layer) for layer in cfg.eval.exit_layers})
        missing = [layer for layer in wanted if layer not in trained]
        if missing:
            raise ConfigError(f"eval.exit_layers: no trained exit at layer(s) {missing} in {cfg.ckpt_path} "
                              f"(trained exits: {trained})")
        layers = sorted(set(wanted) | {trained[-1]})
    net = multi_exit_net(system, policy.base if isinstance(policy, BudgetExit) else policy, layers)
    device = torch.device(cfg.eval.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    system.to(device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.eval.amp]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    datamodule = build_datamodule(cfg, system.task, backbone=train_cfg.backbone)
    return Setup(policy, system, net, trained, layers, device, autocast, datamodule, train_cfg)


def dev_loader(datamodule):
    datamodule.setup("validate")
    return datamodule.val_dataloader()[0]


def run(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path: mode=eval needs the checkpoint to evaluate")
    setup = prepare(cfg)
    policy, system, net, layers, device, autocast = (setup.policy, setup.system, setup.net, setup.layers,
                                                     setup.device, setup.autocast)
    task = system.task
    loader = dev_loader(setup.datamodule)
    logits, labels = exit_logits(system, loader, device, autocast)
    forced = [{"exit": f"exit {layer}" + ("" if layer in setup.trained else " (untrained)"),
               **task_metric(task, z, labels)} for layer, z in zip(system.exit_layers, logits)]
    logits = only(logits, system.exit_layers, layers)  # untrained (or unwanted) exits never answer
    out = Path(cfg.paths.output_dir)
    print(f"\nforced exits, {task.name} dev ({len(labels)} samples)\n{format_table(forced)}")
    model_name = str(setup.train_cfg.model._target_).rsplit(".", 1)[-1]
    label = cfg.eval.label or f"{model_name} / {policy.name}"
    summary = {"checkpoint": cfg.ckpt_path, "task": task.name, "model": model_name, "label": label,
               "metric": task.monitor, "policy": policy.describe(), "forced": forced,
               "trained_exits": setup.trained, "exit_layers": layers}
    if net is None:  # a single-exit model: nothing to sweep
        write_json(out / "eval.json", summary)
        return summary

    base = policy.base if isinstance(policy, BudgetExit) else policy
    rows = sweep(base, logits, labels, layers, task)
    # Wall-clock: bs=1 on dev samples spread evenly over the set (no padding), and batched,
    # against a full pass. The bs=1 subset gets its own layer-count speed-up to compare with.
    single = [{k: (v[i:i + 1, : int(b["attention_mask"][i].sum())] if v.ndim == 2 else v[i:i + 1]).to(device)
               for k, v in b.items()} for b in loader for i in range(len(b["input_ids"]))]
    timed = torch.linspace(0, len(single) - 1, min(cfg.eval.timing_samples, len(single))).long()
    single = [single[i] for i in timed.tolist()]
    batched = [{k: v.to(device) for k, v in b.items()} for b in loader]
    # The full pass is the same engine with only the final exit: identical code but for the exits.
    full = EarlyExit(net, NoExit(), exit_layers=layers[-1:])
    repeats = cfg.eval.timing_repeats
    full_1 = full_b = float("inf")
    for row in rows:
        p = base if row["threshold"] is None else base.with_threshold(row["threshold"])
        timed_layers = simulate(p, logits, layers).exit_layer[timed].float()
        row["layer_speedup_bs1_samples"] = layers[-1] / timed_layers.mean().item()
        engine = EarlyExit(net, p, layers)
        # Each point is timed in turns with a full pass (see time_in_turns): timings drift.
        seconds = time_runs({"full": full, "exit": engine}, single, device, autocast, repeats)
        full_1 = min(full_1, seconds["full"])
        row["measured_speedup_bs1"] = seconds["full"] / seconds["exit"]
        seconds = time_runs({"full": full, "exit": engine}, batched, device, autocast, repeats)
        full_b = min(full_b, seconds["full"])
        row["measured_speedup_batched"] = seconds["full"] / seconds["exit"]
    summary.update(sweep=rows, full_forward_seconds={"bs1": full_1, "batched": full_b},
                   timing_samples=len(single), batch_size=loader.batch_size)
    if isinstance(policy, BudgetExit):
        summary["budget"] = policy.choose(rows)
    print(f"\nsweep of {base.name}; speed-ups vs a full forward pass "
          f"(bs=1 on {len(single)} samples; batched bs={loader.batch_size})\n{format_table(rows, floatfmt='{:.3f}')}")
    if "budget" in summary:
        print(f"\nbudget: {summary['budget']}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", buffer.getvalue())
    write_json(out / "eval.json", summary)
    plot_curves({label: ([r["layer_speedup"] for r in rows], [r[task.monitor] for r in rows])},
                out / "sweep.png", metric=f"{task.name} dev {task.monitor}")
    for logger in instantiate_all(cfg.get("logger")):
        if hasattr(logger, "log_table"):  # W&B
            logger.log_table("eval/sweep", columns=list(rows[0]), data=[list(r.values()) for r in rows])
            logger.log_image("eval/sweep_plot", images=[str(out / "sweep.png")])
    log.info("evaluation written to %s", out)
    return summary
