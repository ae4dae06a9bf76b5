"""CoRe's switch, measured: validation MLM loss of phase-1 checkpoints before and after expansion.

For each checkpoint saved at the end of CoRe's phase 1 (``checkpoints/stage1/last.ckpt``),
on the run's own validation set (fixed masks): the relaxed model, the expanded model with
the low-rank feed-forward made dense (W = U V: exact, so the same loss) and softmax
attention (the kernel switch, which is not function preserving), i.e. the loss jump phase 2
starts from. A blend (``model.transition_steps``) starts from the relaxed loss instead.

    python bench/core_switch.py logs/core/*/checkpoints/stage1/last.ckpt --out bench/results/core_switch.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbert.build import build_datamodule, load_system  # noqa: E402
from rbert.models.relaxed import expand  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


@torch.no_grad()
def val_loss(net, loader) -> float:
    total, count = 0.0, 0
    for batch in loader:
        out = net(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), labels=batch["labels"])
        total += float(out.loss) * out.labels.numel()
        count += out.labels.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", default="bench/results/core_switch.json")
    args = parser.parse_args()
    rows = []
    for path in args.checkpoints:
        system, cfg, ckpt = load_system(path)
        if ckpt.get("rbert_stage") != 0 or not getattr(system, "is_relaxed", False):
            raise SystemExit(f"{path}: not a CoRe phase-1 checkpoint")
        datamodule = build_datamodule(cfg)
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()[0]
        relaxed = val_loss(system.net, loader)
        expanded = val_loss(expand(system.net).eval(), loader)
        rows.append({"run": Path(path).parents[2].name, "step": ckpt["global_step"], "relaxed": relaxed,
                     "expanded": expanded, "jump": expanded - relaxed})
    print(format_table(rows, floatfmt="{:.3f}"))
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
