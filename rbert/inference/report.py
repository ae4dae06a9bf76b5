"""The early-exit table ``mode=train`` ends with (``eval.after_train``)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from rbert.errors import ConfigError
from rbert.inference.engine import simulate
from rbert.inference.policies import BudgetExit
from rbert.inference.prepare import placement
from rbert.inference.sweep import at_chance, exit_logits, only, sweep, words_of
from rbert.inference.timing import measure, timing_inputs
from rbert.models.multi_exit import MultiExitBert
from rbert.models.token_heads import MultiExitTokenBert
from rbert.report import format_table
from rbert.systems.base import TaskSystem
from rbert.tracking import log_histogram

log = logging.getLogger(__name__)


def after_training(cfg: DictConfig, system: TaskSystem, datamodule, loggers: list) -> dict | None:
    """What early exit buys, on the dev set, right after ``mode=train`` (``eval.after_train``).

    The exit policy's threshold is chosen as the budget policy does: the largest layer-count
    speed-up within ``eval.max_drop`` metric points of the final exit (``exit_policy=budget``
    brings its own target), on the selection split when the run held one out
    (``data.select_rows``), and reported on dev. A final exit at chance level is flagged
    instead (there every sample may leave at once "for free"). The point is then timed at
    batch size 1 and batched, on the bounded samples ``mode=eval`` uses: seconds on a small
    model, about a minute on MiniLM on 2 CPU cores. None for a single-exit model, or a policy
    that cannot run on this task.
    """
    net, trained, task = getattr(system, "net", None), system.trained_exit_layers(), system.task
    policy = hydra.utils.instantiate(cfg.exit_policy)
    budget = policy if isinstance(policy, BudgetExit) else None
    if budget is None and policy.sweep is not None:
        budget = BudgetExit(policy, max_drop=cfg.eval.max_drop)
    if not isinstance(net, (MultiExitBert, MultiExitTokenBert)) or len(trained) < 2 or budget is None:
        return None
    try:
        budget.check(task.num_labels, len(trained))
    except ConfigError as err:
        log.info("no early-exit table: %s", err)
        return None
    device, autocast = placement(cfg.eval)
    system.to(device).eval()
    # The threshold is chosen on the selection split when the run held one out, and reported on dev.
    logits, labels = exit_logits(system, datamodule.eval_loader(0), device, autocast)
    logits = only(logits, system.exit_layers, trained)
    rows = sweep(budget.base, logits, labels, trained, task)
    if getattr(datamodule, "select_rows", None):  # else the selection loader is the dev set: no second pass
        select_logits, select_labels = exit_logits(system, datamodule.selection_loader(), device, autocast)
        chosen = budget.choose(sweep(budget.base, only(select_logits, system.exit_layers, trained), select_labels,
                                     trained, task))
    else:
        chosen = budget.choose(rows)
    chosen_policy = budget.base.with_threshold(chosen["threshold"])
    row = next(r for r in rows if r["threshold"] == chosen["threshold"])
    inputs = timing_inputs(datamodule.eval_loader(0, cfg.eval.batch_size), device, cfg.eval.timing_samples,
                           cfg.eval.timing_batches)
    measured = measure(net, chosen_policy, trained, inputs, device, autocast, cfg.eval.timing_repeats)
    exit_layer = simulate(chosen_policy, logits, trained, words_of(labels)).exit_layer
    summary = {"policy": chosen_policy.describe(), "target": chosen["target"], "met": chosen["met"],
               "chosen_on": "selection split" if getattr(datamodule, "select_rows", None) else "dev set",
               "metric": task.monitor, "final": row[task.monitor] + row["drop"] / 100,
               "early_exit": row[task.monitor], "drop": row["drop"], "mean_exit_layer": row["mean_exit_layer"],
               "layer_speedup": row["layer_speedup"],
               "layer_speedup_bs1_samples": trained[-1] / exit_layer[inputs.indices].float().mean().item(),
               "measured_speedup_bs1": measured["measured_speedup_bs1"],
               "measured_speedup_batched": measured["measured_speedup_batched"],
               "at_chance": at_chance(task, logits[-1], labels),
               "timing": f"bs=1 on {len(inputs.single)} dev sentences, batched on {len(inputs.batched)} batches "
                         f"of {cfg.eval.batch_size}, best of {cfg.eval.timing_repeats}, {device.type}"}
    log_histogram(loggers, "early_exit/exit_layer", exit_layer.tolist(), summary)
    return summary


def after_training_table(summary: dict) -> str:
    """The early-exit part of ``mode=train``'s report, as text."""
    metric = summary["metric"]
    if summary.get("at_chance"):
        return (f"early exit: not reported. The final exit's dev {metric} ({summary['final']:.4f}) is at chance "
                "level, so every exit may leave at once and a speed-up would mean nothing; train longer or "
                "with another learning rate first.")
    row = {"policy": summary["policy"], f"final {metric}": summary["final"],
           f"early-exit {metric}": summary["early_exit"], "drop (points)": summary["drop"],
           "mean exit layer": summary["mean_exit_layer"], "layer speed-up": summary["layer_speedup"],
           "bs=1 measured": summary["measured_speedup_bs1"], "batched measured": summary["measured_speedup_batched"]}
    note = "" if summary["met"] else "  (no threshold meets it: the smallest drop)"
    return (f"early exit on the dev set, {summary['target']}{note} (threshold chosen on the "
            f"{summary.get('chosen_on', 'dev set')}); speed-ups vs all layers "
            f"({summary['timing']}):\n{format_table([row], floatfmt='{:.3f}')}")

