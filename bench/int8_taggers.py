"""int8 taggers against fp32 on rbert's ONNX runtime: speed and accuracy, EWT POS dev.

``export_quantize=int8`` quantises a tagger's graphs (docs/benchmarks.md 13.9 measured their
accuracy on the selection split only). This bench exports one tagger checkpoint twice, fp32
and int8 (each with ``exit_policy=budget``: the sentence-level threshold chosen on the
selection split, int8's on its own exits), and runs both folders on onnxruntime three ways:
full depth, sentence-level exit (SENTEE, the folder's policy) and token-level exit (TOKEE,
``--tokee`` window and threshold). Reported: word accuracy on every dev sentence, batched by
32 and at bs=1 (dynamic int8 scales activations per batch, so the two may differ), and the
time of each at bs=1 (``--samples`` sentences) and batched (``--batches`` dev batches of 32,
in file order, padding included for all alike), token ids given (tokenising not timed), all
six in turns in one process (:func:`rbert.inference.timing.time_in_turns`), as ratios over
fp32 full depth.

    python bench/int8_taggers.py logs/frontier/pos_ewt/romebert-s42-*/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.deploy_int8 import REPO, export  # noqa: E402
from rbert.data.tagging_files import read_conllu  # noqa: E402
from rbert.deploy import OnnxEarlyExitModel  # noqa: E402
from rbert.inference.policies import NoExit  # noqa: E402
from rbert.inference.timing import evenly, time_in_turns  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def word_accuracy(model: OnnxEarlyExitModel, sentences: list[list[str]], gold: list[list[str]],
                  batch_size: int) -> tuple[float, float]:
    """(word accuracy in points, mean exit layer over words) of ``model.predict``."""
    answers = model.predict(sentences, batch_size=batch_size)
    right = total = layers = 0
    for answer, tags in zip(answers, gold):
        right += sum(p == g for p, g in zip(answer["tags"], tags))
        total += len(tags)
        layers += sum(answer.get("exit_layers", [answer["exit_layer"]] * len(tags)))
    return 100.0 * right / total, layers / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a tagger checkpoint with internal exits (pos_ewt)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/tagging"))
    parser.add_argument("--work", type=Path, default=REPO / "logs" / "int8_taggers")
    parser.add_argument("--tokee", type=float, nargs=2, default=(1, 0.4), metavar=("WINDOW", "THRESHOLD"))
    parser.add_argument("--samples", type=int, default=200, help="dev sentences timed at bs=1")
    parser.add_argument("--batches", type=int, default=8, help="dev batches of 32 timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_taggers.json")
    args = parser.parse_args()
    data, work = args.data.resolve(), args.work.resolve()
    dev = read_conllu(data / "UD_English-EWT" / "en_ewt-ud-dev.conllu")
    sentences, gold = [s.words for s in dev], [s.tags for s in dev]

    tokee = {"name": "window_entropy", "window": int(args.tokee[0]), "threshold": args.tokee[1]}
    models = {}
    for graphs, extra in (("fp32", ()), ("int8", ("export_quantize=int8",))):
        folder = export(args.checkpoint.resolve(), work / graphs, data, "task=pos_ewt", "exit_policy=budget", *extra)
        models[f"{graphs} full depth"] = OnnxEarlyExitModel.from_pretrained(folder, NoExit())
        models[f"{graphs} SENTEE"] = OnnxEarlyExitModel.from_pretrained(folder)
        models[f"{graphs} TOKEE"] = OnnxEarlyExitModel.from_pretrained(folder, tokee)

    rows = {name: {"runtime": name, "policy": m.policy.describe()} for name, m in models.items()}
    for name, model in models.items():
        for bs, key in ((32, "batched"), (1, "bs1")):
            accuracy, layer = word_accuracy(model, sentences, gold, bs)
            rows[name][f"acc_{key}"], rows[name][f"mean_exit_{key}"] = round(accuracy, 2), round(layer, 2)
        print(f"{name}: dev {rows[name]['acc_batched']} batched, {rows[name]['acc_bs1']} bs=1", flush=True)

    any_model = models["fp32 TOKEE"]  # its inputs carry each piece's word, which only TOKEE reads
    single = [any_model.tag_batches([sentences[i]], 1)[1][0] for i in evenly(len(sentences), args.samples)]
    grouped = any_model.tag_batches(sentences, 32)[1]
    grouped = [grouped[i] for i in evenly(len(grouped), args.batches)]
    for key, inputs in (("bs1", single), ("batched", grouped)):
        calls = {name: (lambda i, m=model, x=inputs: m.run(*x[i])) for name, model in models.items()}
        seconds = time_in_turns(calls, len(inputs), args.repeats)
        for name in models:
            rows[name][f"ms_{key}"] = round(1000 * seconds[name] / len(inputs), 3)
            rows[name][f"speedup_{key}"] = round(seconds["fp32 full depth"] / seconds[name], 2)

    table = list(rows.values())
    print(format_table(table, ["runtime", "policy", "acc_batched", "acc_bs1", "mean_exit_batched", "ms_bs1",
                               "speedup_bs1", "ms_batched", "speedup_batched"]))
    write_json(args.out, {"checkpoint": str(args.checkpoint), "machine": platform.processor() or platform.machine(),
                          "date": time.strftime("%Y-%m-%d"), "samples": len(single), "batches": len(grouped),
                          "rows": table})


if __name__ == "__main__":
    main()
