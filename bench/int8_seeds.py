"""int8 early exit's accuracy against the plain model, over the frontier's seeds.

``bench/deploy_int8.py`` times int8 early exit against Optimum on one seed; its accuracy goal
(within 1 point of the plain model) then rests on that seed's luck. This bench repeats only
the accuracy half for every seed that the SST-2 frontier plan has both a plain ``model=bert``
and a ``model=deebert`` run of (``bench/records/frontier/sst2.jsonl``): the DeeBERT checkpoint
through ``mode=export exit_policy=budget``, fp32 and ``export_quantize=int8`` (each threshold
chosen on the selection split, int8's on the int8 exits), scored on all 872 dev sentences at
bs=1 and batched by 32 on rbert's ONNX runtime, beside the plain model's dev accuracy from the
same record (its full-depth PyTorch logits; section 11.4 shows its fp32 graph agrees), and
each exit's dev accuracy at full depth on the fp32 and int8 graphs.
No timing: the speed side is 11.4's.

    python bench/int8_seeds.py            # every seed recorded; exports are kept and reused
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.deploy_int8 import REPO, accuracy, dev_set, export  # noqa: E402
from rbert.deploy import FolderTokenizer, OnnxEarlyExitModel, read_spec  # noqa: E402
from rbert.deploy.quantize import graph_exit_logits  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def recorded_pairs(record: Path) -> dict[int, dict[str, dict]]:
    """Seed -> {"plain": row, "deebert": row} for every seed that has both."""
    by_seed: dict[int, dict[str, dict]] = {}
    for line in record.read_text().splitlines():
        row = json.loads(line)
        if row["name"] in ("plain", "deebert"):
            by_seed.setdefault(row["seed"], {})[row["name"]] = row
    return {seed: rows for seed, rows in sorted(by_seed.items()) if len(rows) == 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", type=Path, default=REPO / "bench" / "records" / "frontier" / "sst2.jsonl")
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--work", type=Path, default=REPO / "logs" / "int8_seeds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_seeds.json")
    args = parser.parse_args()
    glue, work = args.glue.resolve(), args.work.resolve()
    texts, labels = dev_set(glue)
    gold = np.array([int(y) for y in labels])

    rows = []
    for seed, runs in recorded_pairs(args.record).items():
        ckpt = Path(runs["deebert"]["checkpoint"])
        folders = {"fp32": export(ckpt, work / f"s{seed}_fp32", glue, "exit_policy=budget"),
                   "int8": export(ckpt, work / f"s{seed}_int8", glue, "exit_policy=budget", "export_quantize=int8")}
        tokenizer = FolderTokenizer.from_folder(folders["fp32"])
        length = read_spec(folders["fp32"]).max_length
        single = [tokenizer([(t,)], length) for t in texts]
        batched = [tokenizer([(t,) for t in texts[s:s + args.batch_size]], length)
                   for s in range(0, len(texts), args.batch_size)]
        plain = 100 * runs["plain"]["per_exit"]["dev"][-1]
        for precision, folder in folders.items():
            model = OnnxEarlyExitModel.from_pretrained(folder)
            layers = np.concatenate([model.run(x["input_ids"], x["attention_mask"], x["token_type_ids"])[1]
                                     for x in batched])
            alone = np.concatenate([model.run(x["input_ids"], x["attention_mask"], x["token_type_ids"])[1]
                                    for x in single])
            bs1, many = accuracy(model.run, single, gold), accuracy(model.run, batched, gold)
            onnx_section = read_spec(folder).onnx
            quantization = onnx_section.get("quantization", {})
            per_exit = [round(100 * float((z.argmax(-1) == gold).mean()), 2)
                        for z in graph_exit_logits(folder, onnx_section, batched)]
            rows.append({"seed": seed, "graphs": precision, "policy": model.policy.describe(),
                         "mean exit": float(layers.mean()), "layer speed-up": 6 / float(layers.mean()),
                         "dev acc bs=1": bs1, "dev acc batched": many, "plain dev acc": plain,
                         "bs=1 vs plain": bs1 - plain, "batched vs plain": many - plain,
                         "same exit bs=1/batched": float((alone == layers).mean()),
                         "dev per exit": per_exit, "select per exit": quantization.get("per_exit", {}).get("int8")})
    print(format_table([{k: v for k, v in r.items() if "per exit" not in k} for r in rows], floatfmt="{:.2f}"))
    for r in rows:
        print(f"seed {r['seed']} {r['graphs']}: dev accuracy per exit (full depth) {r['dev per exit']}")
    for precision in ("fp32", "int8"):
        mine = [r for r in rows if r["graphs"] == precision]
        print(f"{precision} early exit, mean over {len(mine)} seeds: bs=1 vs plain "
              f"{np.mean([r['bs=1 vs plain'] for r in mine]):+.2f}, batched vs plain "
              f"{np.mean([r['batched vs plain'] for r in mine]):+.2f}, layer speed-up "
              f"{np.mean([r['layer speed-up'] for r in mine]):.2f}x")
    write_json(args.out, {"rows": rows, "date": time.strftime("%Y-%m-%d"), "record": str(args.record)})
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
