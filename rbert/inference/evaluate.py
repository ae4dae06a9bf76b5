"""``mode=eval``: early-exit evaluation of a fine-tuned checkpoint on the task's first dev set.

* forced per-exit metrics (every sample through exit i), from one full forward pass;
* a threshold sweep of the chosen policy: metric vs layer-count speed-up (L / mean exit
  layer) and expected saving, simulated from that pass (exactly what the engine answers);
* measured wall-clock time of the engine at batch size 1 and batched, against a full
  forward pass, for every sweep point;
* with ``eval.reference=<a plain model's checkpoint>`` (what a user would deploy instead),
  that model's dev metric and its wall-clock time in the same turns: every sweep point
  gains "drop vs plain" and "speed-up vs plain";
* a flag instead of speed-ups when the final exit is at chance level (every sample could
  leave at exit 1 "at no drop");
* a table, ``sweep.csv`` / ``eval.json`` and ``sweep.png`` in the run folder (and W&B).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from omegaconf import DictConfig

from rbert.build import instantiate_all
from rbert.errors import ConfigError
from rbert.inference.engine import EarlyExit, simulate
from rbert.inference.plot import plot_curves
from rbert.inference.policies import BudgetExit, NoExit
from rbert.inference.prepare import dev_loader, prepare
from rbert.inference.sweep import at_chance, exit_logits, only, sweep, task_metric, words_of
from rbert.inference.timing import measure, timing_inputs
from rbert.progress import track
from rbert.report import atomic_write_text, format_table, write_json
from rbert.tracking import log_curve, log_histogram

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path: mode=eval needs the checkpoint to evaluate")
    if str(cfg.exit_policy.get("_target_", "")).endswith("WindowEntropyExit"):
        raise ConfigError("exit_policy=window_entropy: mode=eval sweeps sentence-level policies; token-level exit "
                          "is tuned and timed by bench/tokee.py, and runs in mode=predict and mode=export")
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

    if at_chance(task, logits[-1], labels):
        summary["at_chance"] = True
        print(f"\nthe final exit's dev {task.monitor} is at chance level: no early-exit sweep or speed-up is "
              "reported (every sample could leave at exit 1 at no drop). Train longer or with another lr.")
        write_json(out / "eval.json", summary)
        return summary
    base = policy.base if isinstance(policy, BudgetExit) else policy
    rows = sweep(base, logits, labels, layers, task)
    reference = plain_reference(cfg, task, loader, device, autocast)
    if reference is not None:
        summary["reference"] = {"checkpoint": cfg.eval.reference, task.monitor: reference[1]}
        for row in rows:
            row["drop_vs_plain"] = 100 * (reference[1] - row[task.monitor])
    # Wall-clock at bs=1 and batched against a full pass, on bounded samples of the dev set;
    # the bs=1 sample gets its own layer-count speed-up to compare with.
    inputs = timing_inputs(setup.datamodule.eval_loader(0, cfg.eval.batch_size), device, cfg.eval.timing_samples,
                           cfg.eval.timing_batches)
    full = EarlyExit(net, NoExit(), exit_layers=layers[-1:])
    full_1 = full_b = float("inf")
    for row in track(rows, desc=f"timing {len(rows)} sweep points"):
        p = base if row["threshold"] is None else base.with_threshold(row["threshold"])
        timed_layers = simulate(p, logits, layers, words_of(labels)).exit_layer[inputs.indices].float()
        row["layer_speedup_bs1_samples"] = layers[-1] / timed_layers.mean().item()
        measured = measure(net, p, layers, inputs, device, autocast, cfg.eval.timing_repeats, full,
                           reference and reference[0])
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
    exit_layer = simulate(configured, logits, layers, words_of(labels)).exit_layer
    log_histogram(loggers, "eval/exit_layer", exit_layer.tolist(), {"policy": configured.describe()})
    log.info("evaluation written to %s", out)
    return summary



def plain_reference(cfg: DictConfig, task, loader, device, autocast):
    """``eval.reference``'s model and its dev metric (None without one). It must be a
    single-exit fine-tuned checkpoint of the same task: the model early exit competes with."""
    if not cfg.eval.get("reference"):
        return None
    from rbert.inference.checkpoint import load_task_system

    system, _, _ = load_task_system(cfg.eval.reference)
    if len(system.exit_layers) != 1 or system.task.name != task.name:
        raise ConfigError(f"eval.reference: {cfg.eval.reference} is not a plain (single-exit) {task.name} model")
    system.to(device).eval()
    logits, labels = exit_logits(system, loader, device, autocast)
    return system.net, task_metric(task, logits[-1], labels)[task.monitor]
