"""Where the batch-size-1 early-exit time goes: the engine against a zero-overhead ceiling.

For each policy, on dev sentences taken one at a time (bs=1, no padding), times each
sentence in turns with these four and keeps its best of ``--repeats``:

* ``full``: the engine with only the final exit (the baseline of ``mode=eval``);
* ``engine``: the early-exit engine with the policy;
* ``layers only``: the embeddings and, per sentence, exactly the layers the engine ran, with
  no exit head, decision or bookkeeping: what a zero-overhead engine would take;
* ``bare``: the embeddings and all layers, no head.

``layers only`` against ``bare`` is the best any engine can do at that setting. The
embeddings do not shrink and the sentences that leave early tend to be shorter, which pull
it below the layer-count speed-up (measured: within a few percent of it). ``per exit`` is
the engine's extra time over ``layers only``, divided by the exits it consulted.

    python bench/exit_overhead.py --ckpt logs/compare_exits/romebert-mean_s42/checkpoints/best.ckpt \\
        --policies entropy:0.9 entropy:0.7 confidence:0.7 patience:2 fixed:1 fixed:3 none
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from itertools import islice
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.data.glue import read_table  # noqa: E402
from rbert.inference.checkpoint import load_task_system  # noqa: E402
from rbert.inference.engine import EarlyExit  # noqa: E402
from rbert.inference.policies import POLICIES, NoExit  # noqa: E402
from rbert.inference.timing import time_in_turns  # noqa: E402
from rbert.models.hub import load_tokenizer  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def make_policy(spec: str):
    name, _, value = spec.partition(":")
    cls = POLICIES[name]
    return cls() if not value else cls(int(value) if name in ("fixed", "patience") else float(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--policies", nargs="+", default=["entropy:0.9", "none"])
    parser.add_argument("--exit-layers", type=int, nargs="*", default=None, help="consult only these exits")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/exit_overhead.json")
    args = parser.parse_args()

    system, train_cfg, trained = load_task_system(args.ckpt)
    net = system.net
    layers = sorted(set(args.exit_layers or trained) | {trained[-1]})
    task = hydra.utils.instantiate(OmegaConf.load(REPO / "conf/task/sst2.yaml"))
    table = read_table(Path(args.data_dir) / "SST-2" / "dev.tsv", task)
    picks = torch.linspace(0, len(table) - 1, args.samples).long().tolist()
    tokenizer = load_tokenizer(train_cfg.backbone)
    samples = [tokenizer(table[i]["sentence"], return_tensors="pt", return_token_type_ids=True) for i in picks]
    samples = [(s["input_ids"], s["attention_mask"], s["token_type_ids"]) for s in samples]
    bert, num_layers = net.bert, layers[-1]

    def run_layers(depths: list[int]):  # embeddings + a sample's first `depth` layers, nothing else
        def run(i):
            ids, _, types = samples[i]
            hidden = bert.embed(ids, types)
            for layer in islice(bert.layers, depths[i]):
                hidden = layer(hidden, None)
        return run

    def run_engine(engine: EarlyExit):
        return lambda i: engine(*samples[i])

    full = EarlyExit(net, NoExit(), exit_layers=[num_layers])
    rows = []
    for spec in args.policies:
        engine = EarlyExit(net, make_policy(spec), layers)
        depths = [int(engine(*s).exit_layer) for s in samples]
        consulted = sum(sum(layer <= d for layer in layers) for d in depths)
        with torch.inference_mode():
            t = time_in_turns({"full": run_engine(full), "engine": run_engine(engine),
                               "layers only": run_layers(depths), "bare": run_layers([num_layers] * len(samples))},
                              len(samples), args.repeats)
        layer_speedup = num_layers * len(depths) / sum(depths)
        rows.append({
            "policy": spec, "mean exit": sum(depths) / len(depths), "layer speed-up": layer_speedup,
            "measured": t["full"] / t["engine"], "measured / layer": t["full"] / t["engine"] / layer_speedup,
            "layers only": t["bare"] / t["layers only"],
            "layers only / layer": t["bare"] / t["layers only"] / layer_speedup,
            "full ms": 1e3 * t["full"] / len(samples), "bare ms": 1e3 * t["bare"] / len(samples),
            "per exit us": 1e6 * (t["engine"] - t["layers only"]) / consulted,
        })
    print(f"bs=1 on {len(samples)} SST-2 dev sentences, exits {layers}, {torch.get_num_threads()} threads")
    print(format_table(rows, floatfmt="{:.3f}"))
    write_json(args.out, {"date": date.today().isoformat(), "checkpoint": args.ckpt, "exit_layers": layers,
                          "samples": len(samples), "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
