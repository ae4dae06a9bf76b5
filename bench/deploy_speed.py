"""Deployed early exit vs full depth: the onnxruntime runtime, the PyTorch engine, on SST-2 dev.

For an exported folder (``python run.py mode=export ...``), times four runtimes on the same
inputs: the ONNX runtime and the PyTorch engine with the exported policy, and both at full
depth (``exit_policy=none``), each runtime in turns with its own full depth
(:func:`rbert.inference.timing.time_in_turns`: each input with each in turn, best of
``--repeats``). Full depth on onnxruntime is measured twice: running every exit's graph
(heads included) and as the plain model without early exit (one graph of the embeddings, all
layers and the final exit), with the runtime's thread settings and, timed alone, with
onnxruntime's defaults; the speed-ups are over the faster plain one. At batch size 1 (``--samples``
dev sentences, each alone) and batched (``--batches`` batches of ``--batch-size``). Beside
each measured speed-up over full depth: the layer-count speed-up of the same inputs (L /
mean exit layer), the FLOPs-proportional ideal. Also the dev accuracy of each runtime.

At batch size 1 the ONNX runtime runs its exits' graphs as one composed graph with the
policy inside (:mod:`rbert.deploy.onnx_fused`; "onnx", and "onnx full" with ``none``);
"onnx segments" is the same runtime calling one graph an exit (``fused=False``), as it
always does batched, where it is not timed twice.

    python bench/deploy_speed.py logs/export_minilm --glue ../shared/data/glue --out logs/deploy_speed.json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.deploy import EarlyExitModel, OnnxEarlyExitModel  # noqa: E402
from rbert.deploy.onnx_export import export_full_depth  # noqa: E402
from rbert.inference.policies import NoExit  # noqa: E402
from rbert.inference.timing import evenly, time_in_turns  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def dev_set(glue: Path) -> tuple[list[str], list[str]]:
    with open(glue / "SST-2" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an exported folder (mode=export)")
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--samples", type=int, default=200, help="dev sentences timed at batch size 1")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="for both runtimes (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("logs/deploy_speed.json"))
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    models = {"onnx": OnnxEarlyExitModel.from_pretrained(args.folder, threads=threads),
              "onnx segments": OnnxEarlyExitModel.from_pretrained(args.folder, threads=threads, fused=False),
              "onnx full": OnnxEarlyExitModel.from_pretrained(args.folder, policy=NoExit(), threads=threads),
              "torch": EarlyExitModel.from_pretrained(args.folder),
              "torch full": EarlyExitModel.from_pretrained(args.folder, policy=NoExit())}
    spec = models["onnx"].spec
    layers = spec.exit_layers[-1]
    # "onnx full" runs every exit's graph, heads included; "onnx plain" is the model without
    # early exit: one graph of the embeddings, all layers and the final exit. It runs with the
    # runtime's thread settings and with onnxruntime's defaults ("onnx plain, ORT defaults":
    # threads that spin between runs, which only one session can afford); the faster of the
    # two is the baseline.
    plain = Path(tempfile.mkdtemp(prefix="rbert_plain_"))
    export_full_depth(models["torch"].net, plain / "full.onnx")
    plain_spec = dataclasses.replace(spec, consulted_exits=[layers], onnx={
        **spec.onnx, "segments": [{"file": "full.onnx", "first": 1, "exit": layers}]})
    for name, config in (("onnx plain", None), ("onnx plain, ORT defaults", {})):
        models[name] = OnnxEarlyExitModel(plain, plain_spec, models["onnx"].tokenizer, NoExit(), threads=threads,
                                          session_config=config)
    texts, labels = dev_set(args.glue)

    accuracy = {}
    for name, model in models.items():
        if name == "onnx segments":  # predict() runs batches: the same code as "onnx"
            continue
        answers = model.predict(texts, batch_size=args.batch_size)
        accuracy[name] = 100 * float(np.mean([a["label"] == y for a, y in zip(answers, labels)]))
        if name == "onnx":
            mean_exit = float(np.mean([a["exit_layer"] for a in answers]))
    single = [models["onnx"].encode([texts[i]]) for i in evenly(len(texts), args.samples)]
    starts = evenly(len(texts) - args.batch_size, args.batches)
    batched = [models["onnx"].encode(texts[s:s + args.batch_size]) for s in starts]

    rows, started = [], time.time()
    for bs, inputs in (("1", single), (str(args.batch_size), batched)):
        def call(model, inputs=inputs):
            return lambda i: model.run(inputs[i]["input_ids"], inputs[i]["attention_mask"],
                                       inputs[i].get("token_type_ids"))

        # Each library against itself: torch's OpenMP threads spin for a while after a call, so
        # a graph timed right after a torch call finds the cores taken (docs/benchmarks.md,
        # section 11); in one rotation with all four, "onnx" always came right after "torch full".
        # onnxruntime's default threads spin after a run too: that plain graph is timed alone.
        seconds = {}
        with torch.inference_mode():
            onnx = ("onnx", "onnx segments")[:2 if bs == "1" else 1] + ("onnx full", "onnx plain")
            for group in (onnx, ("onnx plain, ORT defaults",), ("torch", "torch full")):
                seconds |= time_in_turns({name: call(models[name]) for name in group}, len(inputs), args.repeats)
        exits = np.concatenate([models["onnx"].run(x["input_ids"], x["attention_mask"], x.get("token_type_ids"))[1]
                                for x in inputs])
        layer_speedup = layers / float(exits.mean())
        fastest_plain = min(("onnx plain", "onnx plain, ORT defaults"), key=seconds.get)
        runtimes = (("onnx", fastest_plain), ("onnx segments", fastest_plain), ("torch", "torch full"))
        for name, baseline in runtimes:
            if name not in seconds:
                continue
            ort = name.startswith("onnx")
            measured = seconds[baseline] / seconds[name]
            rows.append({"runtime": name, "batch size": bs, "seconds": seconds[name],
                         "every exit's graph seconds": seconds["onnx full"] if ort else None,
                         "plain full depth seconds": seconds[baseline], "vs plain full depth": measured,
                         "plain, ORT defaults seconds": seconds["onnx plain, ORT defaults"] if ort else None,
                         "vs torch full depth": seconds["torch full"] / seconds[name],
                         "layer speed-up": layer_speedup, "measured / layer": measured / layer_speedup,
                         "onnx / torch time": seconds[name] / seconds["torch"] if ort else None})
    shutil.rmtree(plain, ignore_errors=True)
    print(f"{args.folder}: {spec.objective} on {spec.task}, policy {models['onnx'].policy.describe()}, exits "
          f"{spec.consulted_exits}; {threads} threads; bs=1 on {len(single)} dev sentences, batched on "
          f"{len(batched)} batches of {args.batch_size}; best of {args.repeats}, in turns "
          f"({time.time() - started:.0f} s)")
    print(format_table(rows, floatfmt="{:.3f}"))
    print("dev accuracy (all 872): " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
          + f"; mean exit layer {mean_exit:.2f} of {layers}")
    write_json(args.out, {"folder": str(args.folder), "policy": models["onnx"].policy.describe(),
                          "onnx": spec.onnx.get("exporter"), "threads": threads, "machine": platform.processor()
                          or platform.machine(), "rows": rows, "accuracy": accuracy, "mean_exit_layer": mean_exit,
                          "samples": len(single), "batches": len(batched), "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
