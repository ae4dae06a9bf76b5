"""How much each layer's exit feature varies with the input: first token ([CLS]) vs masked mean.

For every layer, over SST-2 dev sentences: spread = mean_i ||h_i - mean(h)|| / ||mean(h)||
(0 means every input gets the same vector, which no classifier can use), and the accuracy of a
logistic-regression probe trained on half the sentences and scored on the other half (how
much of the label a frozen exit could read). Run on the pretrained backbone and, optionally,
on the backbones of trained checkpoints, to see whether training changed either.

    python bench/exit_features.py --data-dir ../shared/data/glue \\
        --ckpt romebert-cls=logs/compare_exits/romebert-cls_s42/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.data.glue import read_table  # noqa: E402
from rbert.inference.checkpoint import load_task_system  # noqa: E402
from rbert.models import load_encoder  # noqa: E402
from rbert.models.classifier import pool  # noqa: E402
from rbert.models.hub import load_tokenizer  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


@torch.no_grad()
def layer_features(bert, batch) -> list[dict[str, torch.Tensor]]:
    states = bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                  output_hidden_states=True).hidden_states
    return [{p: pool(h, batch["attention_mask"], p) for p in ("cls", "mean")} for h in states[1:]]


def spread(x: torch.Tensor) -> float:
    centre = x.mean(0)
    return float((x - centre).norm(dim=1).mean() / centre.norm())


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Logistic regression on standardised features, first half to train, second half to score."""
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    half = len(x) // 2
    clf = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(x[:half]), y[:half]) + 1e-3 * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float((clf(x[half:]).argmax(-1) == y[half:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--ckpt", nargs="*", default=[], help="name=checkpoint of a multi-exit run")
    parser.add_argument("--out", default="bench/results/exit_features.json")
    args = parser.parse_args()

    task = hydra.utils.instantiate(OmegaConf.load(REPO / "conf/task/sst2.yaml"))
    table = read_table(Path(args.data_dir) / "SST-2" / "dev.tsv", task)
    tokenizer = load_tokenizer(args.backbone)
    batch = dict(tokenizer(list(table["sentence"]), padding=True, truncation=True, max_length=128,
                           return_tensors="pt", return_token_type_ids=True))
    labels = torch.tensor([task.labels.index(str(y)) for y in table["label"]])

    encoders = {"pretrained": load_encoder(args.backbone)}
    for item in args.ckpt:
        name, path = item.split("=", 1)
        encoders[name] = load_task_system(path)[0].net.bert
    rows = []
    for name, bert in encoders.items():
        per_layer = [layer_features(bert.eval(), {k: v[i:i + 64] for k, v in batch.items()})
                     for i in range(0, len(labels), 64)]
        for layer in range(len(per_layer[0])):
            row = {"encoder": name, "layer": layer + 1}
            for p in ("cls", "mean"):
                x = torch.cat([chunk[layer][p] for chunk in per_layer]).float()
                row[f"{p} spread"] = spread(x)
                row[f"{p} probe acc"] = probe_accuracy(x, labels)
            rows.append(row)
    print(f"SST-2 dev ({len(labels)} sentences): feature spread and linear-probe accuracy per layer")
    print(format_table(rows, floatfmt="{:.3f}"))
    write_json(args.out, {"date": date.today().isoformat(), "backbone": args.backbone, "rows": rows})


if __name__ == "__main__":
    main()
