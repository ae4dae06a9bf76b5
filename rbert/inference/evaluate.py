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
from rbert.progress import track
from rbert.report import atomic_write_text, format_table, write_json
from rbert.systems.base import TaskSystem
from rbert.tracking import log_curve, log_histogram

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
    metrics = build_metrics(task, sync=False)  # the samples in hand are the whole set
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


def evenly(count: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(count)``; all of them when ``k`` is None or >= count."""
    if k is None or k >= count:
        return list(range(count))
    return torch.linspace(0, count - 1, k).long().tolist()


@dataclass
class TimingInputs:
    """What wall-clock timing runs on, spread evenly over the dev set."""

    single: list[dict]   # sentences one at a time, their padding cut
    indices: list[int]   # their positions in the dev set
    batched: list[dict]  # whole batches of the dev loader


def timing_inputs(loader, device: torch.device, samples: int, batches: int | None) -> TimingInputs:
    """``samples`` dev sentences at batch size 1 and ``batches`` dev batches (None: every batch).

    Both are bounded by default: timing every sweep point on a whole dev set, at bs=1 and
    batched, with repeats, is what made ``mode=eval`` take many minutes on a CPU.
    """
    all_batches = list(loader)
    rows = [(b, i) for b in all_batches for i in range(len(b["input_ids"]))]
    indices = evenly(len(rows), samples)
    single = []
    for b, i in (rows[j] for j in indices):
        length = int(b["attention_mask"][i].sum())
        single.append({k: (v[i:i + 1, :length] if v.ndim == 2 else v[i:i + 1]).to(device) for k, v in b.items()})
    batched = [{k: v.to(device) for k, v in all_batches[j].items()} for j in evenly(len(all_batches), batches)]
    return TimingInputs(single, indices, batched)


def measure(net: MultiExitBert, policy: ExitPolicy, layers: list[int], inputs: TimingInputs, device, autocast,
            repeats: int, full: EarlyExit | None = None) -> dict[str, float]:
    """Measured wall-clock speed-up of early exit with ``policy`` over a full pass, at bs=1 and batched.

    The full pass is the same engine with only the final exit (identical code but for the
    exits); each input is timed in turns with it (see :func:`time_in_turns`): timings drift.
    """
    full = full or EarlyExit(net, NoExit(), exit_layers=layers[-1:])
    engine = EarlyExit(net, policy, layers)
    one = time_runs({"full": full, "exit": engine}, inputs.single, device, autocast, repeats)
    many = time_runs({"full": full, "exit": engine}, inputs.batched, device, autocast, repeats)
    return {"measured_speedup_bs1": one["full"] / one["exit"], "measured_speedup_batched": many["full"] / many["exit"],
            "full_seconds_bs1": one["full"], "full_seconds_batched": many["full"]}


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


def placement(eval_cfg: DictConfig) -> tuple[torch.device, Callable]:
    """The device to evaluate on (``eval.device``; cuda if available) and an autocast context
    factory for ``eval.amp``."""
    device = torch.device(eval_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[eval_cfg.amp]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    return device, autocast


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
    device, autocast = placement(cfg.eval)
    system.to(device)
    datamodule = build_datamodule(cfg, system.task, backbone=train_cfg.backbone)
    return Setup(policy, system, net, trained, layers, device, autocast, datamodule, train_cfg)


def dev_loader(datamodule):
    return datamodule.eval_loader(0)


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
    # Wall-clock at bs=1 and batched against a full pass, on bounded samples of the dev set;
    # the bs=1 sample gets its own layer-count speed-up to compare with.
    inputs = timing_inputs(setup.datamodule.eval_loader(0, cfg.eval.batch_size), device, cfg.eval.timing_samples,
                           cfg.eval.timing_batches)
    full = EarlyExit(net, NoExit(), exit_layers=layers[-1:])
    full_1 = full_b = float("inf")
    for row in track(rows, desc=f"timing {len(rows)} sweep points"):
        p = base if row["threshold"] is None else base.with_threshold(row["threshold"])
        timed_layers = simulate(p, logits, layers).exit_layer[inputs.indices].float()
        row["layer_speedup_bs1_samples"] = layers[-1] / timed_layers.mean().item()
        measured = measure(net, p, layers, inputs, device, autocast, cfg.eval.timing_repeats, full)
        full_1 = min(full_1, measured.pop("full_seconds_bs1"))
        full_b = min(full_b, measured.pop("full_seconds_batched"))
        row.update(measured)
    batch_size = inputs.batched[0]["input_ids"].shape[0]
    summary.update(sweep=rows, full_forward_seconds={"bs1": full_1, "batched": full_b},
                   timing_samples=len(inputs.single), timing_batches=len(inputs.batched), batch_size=batch_size)
    if isinstance(policy, BudgetExit):
        summary["budget"] = policy.choose(rows)
    print(f"\nsweep of {base.name}; speed-ups vs a full forward pass (bs=1 on {len(inputs.single)} samples; "
          f"batched: {len(inputs.batched)} batches of {batch_size})\n{format_table(rows, floatfmt='{:.3f}')}")
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
    loggers = instantiate_all(cfg.get("logger"))  # W&B: the sweep as a table and plot, the exit layers
    log_curve(loggers, "eval/sweep", rows, "layer_speedup", task.monitor, f"{label}: {task.name} dev")
    configured = policy.choose(rows, as_policy=True) if isinstance(policy, BudgetExit) and summary["budget"]["met"] \
        else base
    log_histogram(loggers, "eval/exit_layer", simulate(configured, logits, layers).exit_layer.tolist(),
                  {"policy": configured.describe()})
    log.info("evaluation written to %s", out)
    return summary


# ---------------------------------------------------------------------------- after training
def after_training(cfg: DictConfig, system: TaskSystem, datamodule, loggers: list) -> dict | None:
    """What early exit buys, on the dev set, right after ``mode=train`` (``eval.after_train``).

    The exit policy's threshold is chosen as the budget policy does: the largest layer-count
    speed-up within ``eval.max_drop`` metric points of the final exit (``exit_policy=budget``
    brings its own target). That one point is then timed at batch size 1 and batched, on the
    bounded samples ``mode=eval`` uses: seconds on a small model, about a minute on MiniLM on
    2 CPU cores. None for a single-exit model, or a policy that cannot run on this task.
    """
    net, trained, task = getattr(system, "net", None), system.trained_exit_layers(), system.task
    policy = hydra.utils.instantiate(cfg.exit_policy)
    budget = policy if isinstance(policy, BudgetExit) else None
    if budget is None and policy.sweep is not None:
        budget = BudgetExit(policy, max_drop=cfg.eval.max_drop)
    if not isinstance(net, MultiExitBert) or len(trained) < 2 or budget is None:
        return None
    try:
        budget.check(task.num_labels, len(trained))
    except ConfigError as err:
        log.info("no early-exit table: %s", err)
        return None
    device, autocast = placement(cfg.eval)
    system.to(device).eval()
    logits, labels = exit_logits(system, datamodule.eval_loader(0), device, autocast)
    logits = only(logits, system.exit_layers, trained)
    rows = sweep(budget.base, logits, labels, trained, task)
    chosen = budget.choose(rows)
    row = next(r for r in rows if r["threshold"] == chosen["threshold"])
    chosen_policy = budget.base.with_threshold(chosen["threshold"])
    inputs = timing_inputs(datamodule.eval_loader(0, cfg.eval.batch_size), device, cfg.eval.timing_samples,
                           cfg.eval.timing_batches)
    measured = measure(net, chosen_policy, trained, inputs, device, autocast, cfg.eval.timing_repeats)
    exit_layer = simulate(chosen_policy, logits, trained).exit_layer
    summary = {"policy": chosen_policy.describe(), "target": chosen["target"], "met": chosen["met"],
               "metric": task.monitor, "final": row[task.monitor] + row["drop"] / 100,
               "early_exit": row[task.monitor], "drop": row["drop"], "mean_exit_layer": row["mean_exit_layer"],
               "layer_speedup": row["layer_speedup"],
               "layer_speedup_bs1_samples": trained[-1] / exit_layer[inputs.indices].float().mean().item(),
               "measured_speedup_bs1": measured["measured_speedup_bs1"],
               "measured_speedup_batched": measured["measured_speedup_batched"],
               "timing": f"bs=1 on {len(inputs.single)} dev sentences, batched on {len(inputs.batched)} batches "
                         f"of {cfg.eval.batch_size}, best of {cfg.eval.timing_repeats}, {device.type}"}
    log_histogram(loggers, "early_exit/exit_layer", exit_layer.tolist(), summary)
    return summary


def after_training_table(summary: dict) -> str:
    """The early-exit part of ``mode=train``'s report, as text."""
    metric = summary["metric"]
    row = {"policy": summary["policy"], f"final {metric}": summary["final"],
           f"early-exit {metric}": summary["early_exit"], "drop (points)": summary["drop"],
           "mean exit layer": summary["mean_exit_layer"], "layer speed-up": summary["layer_speedup"],
           "bs=1 measured": summary["measured_speedup_bs1"], "batched measured": summary["measured_speedup_batched"]}
    note = "" if summary["met"] else "  (no threshold meets it: the smallest drop)"
    return (f"early exit on the dev set, {summary['target']}{note}; speed-ups vs all layers "
            f"({summary['timing']}):\n{format_table([row], floatfmt='{:.3f}')}")
