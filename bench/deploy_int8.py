"""int8 early exit against what users deploy today: a plain model exported by Hugging Face Optimum.

On SST-2 dev, in turns in one process, at batch size 1 and batched, six ONNX runtimes:

* **Optimum fp32 / int8**: the plain fine-tuned model (``model=bert model.net.pooling=cls``,
  written as a ``transformers`` BertForSequenceClassification folder and checked against
  rbert's logits) exported by ``ORTModelForSequenceClassification(export=True)`` and quantised
  by ``ORTQuantizer`` (``AutoQuantizationConfig.avx2``, dynamic). optimum-onnx pins
  transformers<4.58, so that step runs in a venv of its own (``--optimum-python``), as its
  users have; its graphs are then timed here on onnxruntime directly (``ORTModel``'s torch
  <-> NumPy wrapping is left out, which only flatters Optimum), twice: with onnxruntime's
  default session options (what ``ORTModel`` creates), timed in turns with each other only,
  because default threads keep spinning after a run and steal the cores from whatever runs
  next; and with rbert's session options (spin during a run, stop after), in turns with the
  rest. Speed-ups are over the faster of the two;
* **rbert plain fp32 / int8**: the plain ``model=bert`` (mean pooling) checkpoint through
  ``mode=export`` (``export_quantize=int8``), on rbert's ONNX runtime at full depth;
* **rbert early exit fp32 / int8**: the early-exit checkpoint through ``mode=export
  exit_policy=budget`` (the threshold chosen on its selection split; for int8, again on the
  int8 exits).

Every runtime gets the same token ids (tokenisation is not timed). Speed-ups are over
Optimum's fp32 model, measured side by side; accuracy is on all 872 dev sentences, batched and
at batch size 1 (dynamic int8 scales activations per batch, so the two can differ). Also per
exit: dev accuracy of the early-exit model's fp32 and int8 graphs (every exit at full depth).

    python bench/deploy_int8.py --early-exit <deebert best.ckpt> --plain <model=bert best.ckpt> \\
        --plain-cls <model=bert model.net.pooling=cls best.ckpt> --optimum-python <venv>/bin/python
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.deploy import FolderTokenizer, OnnxEarlyExitModel, read_spec  # noqa: E402
from rbert.deploy.quantize import graph_exit_logits  # noqa: E402
from rbert.inference.policies import NoExit  # noqa: E402
from rbert.inference.timing import evenly, time_in_turns  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402

OPTIMUM_SCRIPT = """
import sys
from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
hf, out = sys.argv[1], sys.argv[2]
model = ORTModelForSequenceClassification.from_pretrained(hf, export=True)
model.save_pretrained(out + "/fp32")
quantizer = ORTQuantizer.from_pretrained(out + "/fp32")
quantizer.quantize(save_dir=out + "/int8", quantization_config=AutoQuantizationConfig.avx2(is_static=False,
                                                                                         per_channel=False))
import optimum.version, transformers
print("optimum", optimum.version.__version__, "transformers", transformers.__version__)
"""


def dev_set(glue: Path) -> tuple[list[str], list[str]]:
    with open(glue / "SST-2" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [r["label"] for r in rows]


def export(ckpt: Path, out: Path, glue: Path, *overrides: str) -> Path:
    """``mode=export`` of ``ckpt`` into ``out`` (kept: a rerun reuses it)."""
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "run.py", "mode=export", f"ckpt_path={ckpt}", f"export_dir={out}",
                        f"data_dir={glue}", f"hydra.run.dir={out}.run", *overrides], cwd=REPO, check=True)
    return out


def hf_folder(ckpt: Path, out: Path, texts: list[str]) -> Path:
    """The plain cls-pooling checkpoint as a ``transformers`` BertForSequenceClassification
    folder; its logits must match rbert's."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification

    from rbert.inference.checkpoint import load_task_system
    from rbert.models import load_tokenizer
    from rbert.models.encoder import write_hf_folder

    system, train_cfg, _ = load_task_system(str(ckpt))
    net = system.net.eval()
    if net.pooling != "cls" or net.pooler is not None:
        raise SystemExit(f"{ckpt}: a BertForSequenceClassification folder needs cls pooling and BERT's own pooler")
    config = net.bert.config
    config.num_labels = system.task.num_labels
    write_hf_folder(out, config, "BertForSequenceClassification", dict(net.state_dict()))
    tokenizer = load_tokenizer(train_cfg.backbone)
    tokenizer.save_pretrained(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tokenizer(texts[:32], padding=True, return_tensors="pt")
    with torch.no_grad():
        gap = (hf(**batch).logits - net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])).abs()
    if gap.max() > 1e-4:
        raise SystemExit(f"{out}: transformers' logits differ from rbert's by {gap.max():.2e}")
    return out


class Session:
    """An Optimum graph on onnxruntime: its default session options, or ``config``'s entries."""

    def __init__(self, path: Path, config: dict[str, str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, input_ids, attention_mask, token_type_ids):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        logits = self.session.run(None, {k: feeds[k] for k in self.inputs})[0]
        return logits, None


def accuracy(run, inputs: list[dict], labels: np.ndarray) -> float:
    predicted = np.concatenate([run(x["input_ids"], x["attention_mask"], x["token_type_ids"])[0].argmax(-1)
                                for x in inputs])
    return 100 * float((predicted == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--early-exit", type=Path, required=True, help="the early-exit checkpoint (best.ckpt)")
    parser.add_argument("--plain", type=Path, required=True, help="model=bert (mean pooling) checkpoint")
    parser.add_argument("--plain-cls", type=Path, required=True, help="model=bert model.net.pooling=cls checkpoint")
    parser.add_argument("--optimum-python", type=Path, required=True,
                        help="python of a venv with optimum-onnx[onnxruntime] (and its transformers<4.58)")
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--work", type=Path, default=REPO / "logs" / "deploy_int8")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "deploy_int8.json")
    args = parser.parse_args()
    glue, work = args.glue.resolve(), args.work.resolve()
    texts, labels = dev_set(glue)
    gold = np.array([int(y) for y in labels])

    folders = {"rbert plain fp32": export(args.plain, work / "plain_fp32", glue),
               "rbert plain int8": export(args.plain, work / "plain_int8", glue, "export_quantize=int8"),
               "rbert early exit fp32": export(args.early_exit, work / "ee_fp32", glue, "exit_policy=budget"),
               "rbert early exit int8": export(args.early_exit, work / "ee_int8", glue, "exit_policy=budget",
                                               "export_quantize=int8")}
    hf = hf_folder(args.plain_cls, work / "plain_cls_hf", texts)
    optimum_version = ""
    if not (work / "optimum" / "int8").is_dir():
        proc = subprocess.run([str(args.optimum_python), "-c", OPTIMUM_SCRIPT, str(hf), str(work / "optimum")],
                              capture_output=True, text=True, check=True)
        optimum_version = proc.stdout.strip().splitlines()[-1]
        (work / "optimum" / "version.txt").write_text(optimum_version)
    optimum_version = (work / "optimum" / "version.txt").read_text()

    optimum = {"fp32": work / "optimum" / "fp32" / "model.onnx",
               "int8": next((work / "optimum" / "int8").glob("*.onnx"))}
    runs = {f"Optimum {k}": Session(path, OnnxEarlyExitModel.SESSION_CONFIG) for k, path in optimum.items()}
    defaults = {f"Optimum {k}, ORT defaults": Session(path) for k, path in optimum.items()}
    for name, folder in folders.items():
        runs[name] = OnnxEarlyExitModel.from_pretrained(folder)
    # the int8 exits at the threshold the fp32 exits earned on the selection split
    fp32_policy = read_spec(folders["rbert early exit fp32"]).policy
    runs["rbert early exit int8, fp32's threshold"] = OnnxEarlyExitModel.from_pretrained(
        folders["rbert early exit int8"], policy=fp32_policy)
    assert all(isinstance(m.policy, NoExit) for n, m in runs.items() if "plain" in n and "rbert" in n)
    tokenizer = FolderTokenizer.from_folder(folders["rbert plain fp32"])
    length = read_spec(folders["rbert plain fp32"]).max_length
    dev_single = [tokenizer([(t,)], length) for t in texts]
    dev_batched = [tokenizer([(t,) for t in texts[s:s + args.batch_size]], length)
                   for s in range(0, len(texts), args.batch_size)]
    acc = {name: {"batched": accuracy(m.run, dev_batched, gold), "bs1": accuracy(m.run, dev_single, gold)}
           for name, m in runs.items()}
    for name in defaults:
        acc[name] = acc[name.replace(", ORT defaults", "")]
    exits = {}
    for name in ("rbert early exit fp32", "rbert early exit int8", "rbert early exit int8, fp32's threshold"):
        layers = np.concatenate([runs[name].run(x["input_ids"], x["attention_mask"], x["token_type_ids"])[1]
                                 for x in dev_batched])
        exits[name] = float(layers.mean())
        folder = folders[name.split(",")[0]]
        logits = graph_exit_logits(folder, read_spec(folder).onnx, dev_batched)
        acc[name]["per exit"] = [round(100 * float((z.argmax(-1) == gold).mean()), 2) for z in logits]

    single = [dev_single[i] for i in evenly(len(texts), args.samples)]
    batched = [tokenizer([(t,) for t in texts[s:s + args.batch_size]], length)
               for s in evenly(len(texts) - args.batch_size, args.batches)]
    rows, started = [], time.time()
    for bs, inputs in (("1", single), (str(args.batch_size), batched)):
        def call(model, inputs=inputs):
            return lambda i: model.run(inputs[i]["input_ids"], inputs[i]["attention_mask"],
                                       inputs[i]["token_type_ids"])

        seconds = time_in_turns({name: call(m) for name, m in runs.items()}, len(inputs), args.repeats)
        seconds |= time_in_turns({name: call(m) for name, m in defaults.items()}, len(inputs), args.repeats)
        reference = {k: min(seconds[f"Optimum {k}"], seconds[f"Optimum {k}, ORT defaults"]) for k in optimum}
        for name in [*defaults, *runs]:
            rows.append({"runtime": name, "batch size": bs, "ms per item": 1000 * seconds[name] / len(inputs),
                         "vs Optimum fp32": reference["fp32"] / seconds[name],
                         "vs Optimum int8": reference["int8"] / seconds[name],
                         "dev acc batched": acc[name]["batched"], "dev acc bs=1": acc[name]["bs1"]})
    print(f"SST-2 dev; bs=1 on {len(single)} sentences, batched on {len(batched)} batches of {args.batch_size}; "
          f"best of {args.repeats}, in turns ({time.time() - started:.0f} s); {optimum_version}")
    print(format_table(rows, floatfmt="{:.3f}"))
    for name in exits:
        print(f"{name}: policy {runs[name].policy.describe()}, mean exit layer {exits[name]:.2f}; "
              f"dev accuracy per exit (full depth) {acc[name]['per exit']}")
    write_json(args.out, {"rows": rows, "accuracy": acc, "mean_exit_layer": exits, "optimum": optimum_version,
                          "policies": {n: m.policy.describe() for n, m in runs.items() if n.startswith("rbert")},
                          "quantization": read_spec(folders["rbert early exit int8"]).onnx["quantization"],
                          "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                          "checkpoints": {"early_exit": str(args.early_exit), "plain": str(args.plain),
                                          "plain_cls": str(args.plain_cls)}})
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
