"""Wall-clock timing of the early-exit engine against a full pass, robust to a shared machine.

Used by ``mode=eval``, the table ``mode=train`` ends with, and the benches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rbert.inference.engine import EarlyExit
from rbert.inference.policies import ExitPolicy, NoExit
from rbert.inference.words import IGNORE
from rbert.models.multi_exit import MultiExitBert


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
        def run(i):
            b = batches[i]
            if isinstance(engine, EarlyExit) and engine.tokens:  # a tagger's policy looks at the words
                return engine(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), words=b["labels"] != IGNORE)
            return engine(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        return run

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
            repeats: int, full: EarlyExit | None = None, reference=None) -> dict[str, float]:
    """Measured wall-clock speed-up of early exit with ``policy`` over a full pass, at bs=1 and batched.

    The full pass is the same engine with only the final exit (identical code but for the
    exits); each input is timed in turns with it (see :func:`time_in_turns`): timings drift.
    ``reference``: another model called as ``reference(input_ids, attention_mask,
    token_type_ids)`` (the plain fine-tuned model a user would deploy instead), timed in the
    same turns; the speed-ups over it come back too.
    """
    full = full or EarlyExit(net, NoExit(), exit_layers=layers[-1:])
    engines = {"full": full, "exit": EarlyExit(net, policy, layers)}
    if reference is not None:
        engines["plain"] = reference
    one = time_runs(engines, inputs.single, device, autocast, repeats)
    many = time_runs(engines, inputs.batched, device, autocast, repeats)
    out = {"measured_speedup_bs1": one["full"] / one["exit"], "measured_speedup_batched": many["full"] / many["exit"],
           "full_seconds_bs1": one["full"], "full_seconds_batched": many["full"]}
    if reference is not None:
        out.update(speedup_vs_plain_bs1=one["plain"] / one["exit"],
                   speedup_vs_plain_batched=many["plain"] / many["exit"])
    return out

