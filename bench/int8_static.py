"""Static (calibrated) int8 against the dynamic int8 that ``export_quantize=int8`` ships.

Dynamic quantisation scales each activation per batch at run time; static quantisation fixes
every activation's scale once, from calibration rows, so nothing is measured at run time and
the attention's activation-by-activation products can run in int8 too. Whether that pays on
a given CPU is an empirical question (onnxruntime's docs: its U8S8 kernels on AVX2 without
VNNI may saturate), so this bench answers it before any export option is offered.

From the SST-2 early-exit folders of ``bench/deploy_int8.py`` (fp32 and dynamic int8), each
static variant copies the fp32 folder and quantises every segment graph with
``onnxruntime.quantization.quantize_static`` (QDQ, uint8 activations, int8 weights with a
scale per output column, the same ``MatMul`` and ``Gather`` ops as the dynamic export),
calibrated on SST-2 *training* rows: segment k sees the hidden states the fp32 segments
before it produce for those rows. Then, on all 872 dev sentences: each exit's accuracy at full
depth, early exit's accuracy at bs=1 and batched (every variant at the fp32 folder's threshold,
so only the graphs differ), and the speed of full depth and of early exit at bs=1 and batched,
in turns in one process, as ratios over fp32.

    python bench/int8_static.py           # after bench/deploy_int8.py made logs/deploy_int8/ee_*
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.deploy_int8 import accuracy, dev_set  # noqa: E402
from rbert.deploy import FolderTokenizer, OnnxEarlyExitModel, read_spec  # noqa: E402
from rbert.deploy.quantize import QUANTIZED_OPS, graph_exit_logits  # noqa: E402
from rbert.inference.timing import evenly, time_in_turns  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402

VARIANTS = {"minmax": {"calibrate_method": "MinMax", "reduce_range": False},
            "percentile": {"calibrate_method": "Percentile", "reduce_range": False},
            "minmax-reduce-range": {"calibrate_method": "MinMax", "reduce_range": True}}


def train_rows(glue: Path, count: int) -> list[str]:
    """``count`` SST-2 training sentences spread evenly over the file."""
    with open(glue / "SST-2" / "train.tsv", encoding="utf-8") as f:
        texts = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return [texts[i] for i in evenly(len(texts), count)]


def segment_feeds(folder: Path, batches: list[dict]) -> list[list[dict]]:
    """Each fp32 segment's input feeds over ``batches``: what calibrating segment k must see."""
    import onnxruntime as ort

    spec = read_spec(folder)
    sessions = [ort.InferenceSession(str(folder / s.file), providers=["CPUExecutionProvider"])
                for s in spec.segments]
    first = [i.name for i in sessions[0].get_inputs()]
    feeds: list[list[dict]] = [[] for _ in sessions]
    for batch in batches:
        feed = {name: batch[name] for name in first}
        for k, session in enumerate(sessions):
            feeds[k].append(feed)
            hidden, _ = session.run(None, feed)
            feed = {"hidden": hidden, "attention_mask": batch["attention_mask"]}
    return feeds


def static_folder(fp32: Path, out: Path, feeds: list[list[dict]], calibrate_method: str,
                  reduce_range: bool) -> Path:
    """A copy of ``fp32`` with every segment quantised statically (kept: a rerun reuses it)."""
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if (out / "config.json").is_file():
        return out

    class Reader(CalibrationDataReader):
        def __init__(self, items: list[dict]):
            self.items = iter(items)

        def get_next(self):
            return next(self.items, None)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp32, tmp)
    config = json.loads((tmp / "config.json").read_text())
    section = config["rbert_early_exit"]["onnx"]
    fused = section.pop("fused", None)  # the runtime composes the bs=1 graph from the new segments
    if fused:
        (tmp / fused["file"]).unlink()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a line per tensor
    try:
        for segment, items in zip(section["segments"], feeds):
            path = tmp / segment["file"]
            quantize_static(path, path, Reader(items), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=QUANTIZED_OPS, per_channel=True, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod[calibrate_method])
    finally:
        root.setLevel(level)
    section["quantization"] = {"method": "static", "format": "QDQ", "activations": "uint8",
                               "weights": "int8, a scale per output column", "ops": list(QUANTIZED_OPS),
                               "calibration": f"{calibrate_method}, {sum(len(f['attention_mask']) for f in feeds[0])}"
                                              " SST-2 training rows", "reduce_range": reduce_range,
                               "tool": f"onnxruntime.quantization.quantize_static (onnxruntime "
                                       f"{onnxruntime.__version__})"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, default=REPO / "logs" / "deploy_int8" / "ee_fp32")
    parser.add_argument("--dynamic", type=Path, default=REPO / "logs" / "deploy_int8" / "ee_int8")
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--work", type=Path, default=REPO / "logs" / "int8_static")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--calibration-rows", type=int, default=512)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_static.json")
    args = parser.parse_args()
    glue = args.glue.resolve()
    texts, labels = dev_set(glue)
    gold = np.array([int(y) for y in labels])
    tokenizer = FolderTokenizer.from_folder(args.fp32)
    length = read_spec(args.fp32).max_length

    def batches_of(rows: list[str]) -> list[dict]:
        return [tokenizer([(t,) for t in rows[s:s + args.batch_size]], length)
                for s in range(0, len(rows), args.batch_size)]

    started = time.time()
    # one width for every calibration batch: the percentile calibrator stacks each tensor's
    # batches into one array (the padding is masked in attention; its rows join the statistics)
    calibration = batches_of(train_rows(glue, args.calibration_rows))
    width = max(b["input_ids"].shape[1] for b in calibration)
    calibration = [{k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in b.items()} for b in calibration]
    feeds = segment_feeds(args.fp32, calibration)
    folders = {"fp32": args.fp32, "dynamic int8": args.dynamic}
    for name in args.variants:
        folders[f"static int8, {name}"] = static_folder(args.fp32, args.work.resolve() / name, feeds,
                                                        **VARIANTS[name])
    print(f"calibrated and quantised in {time.time() - started:.0f} s")

    policy = read_spec(args.fp32).policy  # every variant at fp32's threshold: only the graphs differ
    early = {name: OnnxEarlyExitModel.from_pretrained(f, policy=policy) for name, f in folders.items()}
    full = {name: OnnxEarlyExitModel.from_pretrained(f, policy={"name": "none"}) for name, f in folders.items()}
    dev_single = [tokenizer([(t,)], length) for t in texts]
    dev_batched = batches_of(texts)
    results = {}
    for name, folder in folders.items():
        layers = np.concatenate([early[name].run(x["input_ids"], x["attention_mask"], x["token_type_ids"])[1]
                                 for x in dev_batched])
        per_exit = [round(100 * float((z.argmax(-1) == gold).mean()), 2)
                    for z in graph_exit_logits(folder, read_spec(folder).onnx, dev_batched)]
        results[name] = {"dev acc bs=1": accuracy(early[name].run, dev_single, gold),
                         "dev acc batched": accuracy(early[name].run, dev_batched, gold),
                         "mean exit": float(layers.mean()), "dev per exit": per_exit,
                         "MB": sum(p.stat().st_size for p in (folder / "onnx").glob("exit_*.onnx")) / 2**20}

    single = [dev_single[i] for i in evenly(len(texts), args.samples)]
    batched = [tokenizer([(t,) for t in texts[s:s + args.batch_size]], length)
               for s in evenly(len(texts) - args.batch_size, args.batches)]
    started = time.time()
    for bs, inputs in (("bs=1", single), ("batched", batched)):
        for kind, models in (("full depth", full), ("early exit", early)):
            def call(model, inputs=inputs):
                return lambda i: model.run(inputs[i]["input_ids"], inputs[i]["attention_mask"],
                                           inputs[i]["token_type_ids"])

            seconds = time_in_turns({name: call(m) for name, m in models.items()}, len(inputs), args.repeats)
            for name in folders:
                results[name][f"{kind} {bs} ms"] = 1000 * seconds[name] / len(inputs)
                results[name][f"{kind} {bs} vs fp32"] = seconds["fp32"] / seconds[name]
    rows = [{"graphs": name, **{k: v for k, v in r.items() if k != "dev per exit"}} for name, r in results.items()]
    print(f"SST-2 dev, early exit at fp32's {early['fp32'].policy.describe()}; bs=1 on {len(single)} sentences, "
          f"batched on {len(batched)} batches of {args.batch_size}; best of {args.repeats}, in turns "
          f"({time.time() - started:.0f} s)")
    print(format_table(rows, floatfmt="{:.2f}"))
    for name, r in results.items():
        print(f"{name}: dev accuracy per exit (full depth) {r['dev per exit']}")
    write_json(args.out, {"results": results, "policy": early["fp32"].policy.describe(),
                          "quantization": {n: read_spec(f).onnx.get("quantization") for n, f in folders.items()},
                          "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")})
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
