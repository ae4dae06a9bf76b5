"""``mode=predict``: answer a file of texts with a fine-tuned checkpoint and an exit policy,
writing each prediction and the layer it left at."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from omegaconf import DictConfig

from rbert.data.tasks import TaskSpec
from rbert.errors import ConfigError
from rbert.inference.engine import EarlyExit
from rbert.inference.prepare import prepare, resolve_budget
from rbert.report import atomic_write_text


def read_texts(path: Path, task: TaskSpec) -> list[list[str]]:
    """Texts to answer: ``.txt`` (one sample a line, a pair's texts tab-separated) or a table with the task's fields."""
    if not path.is_file():
        raise ConfigError(f"predict.input: {path} does not exist")
    n = len(task.text_fields)
    if path.suffix.lower() == ".txt":
        rows = [line.split("\t") for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        for i, row in enumerate(rows):
            if len(row) != n:
                raise ConfigError(f"{path}: line {i + 1} has {len(row)} tab-separated texts, task {task.name} "
                                  f"needs {n}")
        return rows
    from rbert.data.glue import read_table

    table = read_table(path, task, require_label=False)
    return [[str(r[f]) for f in task.text_fields] for r in table]


def run(cfg: DictConfig) -> Path:
    if not cfg.get("ckpt_path") or not cfg.predict.get("input"):
        raise ConfigError("mode=predict needs ckpt_path=... and predict.input=<file of texts>")
    setup = prepare(cfg)
    if setup.system.task.kind == "tagging":
        from rbert.inference.predict_tags import run as tag

        return tag(cfg, setup)
    policy, system, net, layers, device, autocast = (setup.policy, setup.system, setup.net, setup.layers,
                                                     setup.device, setup.autocast)
    task = system.task
    policy, _ = resolve_budget(setup)  # a budget policy picks its threshold on the dev set first
    texts = read_texts(Path(cfg.predict.input), task)
    tokenizer = setup.datamodule.tokenizer
    engine = EarlyExit(net, policy, layers) if net is not None else None
    out_rows = []
    for start in range(0, len(texts), cfg.eval.batch_size):
        chunk = texts[start:start + cfg.eval.batch_size]
        enc = tokenizer(*zip(*chunk), truncation=True, max_length=setup.datamodule.max_length, padding=True,
                        return_tensors="pt").to(device)
        with torch.no_grad(), autocast():
            if net is None:
                z = system(dict(enc))[-1]
                layer = torch.full((len(chunk),), system.exit_layers[-1])
            else:
                result = engine(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
                z, layer = result.logits, result.exit_layer
        z = z.float().cpu()
        for texts_i, logits_i, layer_i in zip(chunk, z, layer.tolist()):
            if task.is_regression:
                answer, score = f"{logits_i.item():.4f}", logits_i.item()
            else:
                probs = torch.softmax(logits_i, -1)
                answer, score = task.labels[int(probs.argmax())], float(probs.max())
            out_rows.append([*texts_i, answer, f"{score:.4f}", layer_i])
    output = Path(cfg.predict.output)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
    writer.writerow([*task.text_fields, "prediction", "score" if task.is_regression else "probability", "exit_layer"])
    writer.writerows(out_rows)
    atomic_write_text(output, buffer.getvalue())
    print(f"{len(out_rows)} predictions ({policy.describe()}) written to {output}")
    return output
