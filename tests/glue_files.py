"""Write tiny GLUE task folders in the exact format of the real GLUE download.

The label of every row follows from a keyword in its text (``good``/``bad``, ...), so a
model can learn the tiny tasks and tests can check that training works.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ["the", "a", "movie", "film", "plot", "actor", "scene", "story", "music", "very", "quite", "rather",
         "long", "short", "old", "new"]
CUE = {0: "bad", 1: "good", 2: "maybe"}


def sentence(rng: random.Random, label: int | None = None) -> str:
    words = rng.choices(WORDS, k=rng.randint(3, 12))
    if label is not None:
        words.insert(rng.randrange(len(words) + 1), CUE[label])
    return " ".join(words)


def write_task(root: Path, name: str, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> Path:
    """Write ``root/<GLUE folder>/`` for task ``name``; returns the folder."""
    rng = random.Random(seed)
    folder_name = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B",
                   "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}[name]
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n: int, dev: bool) -> list[str]:
        out = []
        for i in range(n):
            if name == "stsb":
                score = round(rng.uniform(0, 5), 3)
                s1, s2 = sentence(rng, 1 if score > 2.5 else 0), sentence(rng)
                out.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s1}\t{s2}\t{score}")
                continue
            label = i % (3 if name == "mnli" else 2)
            s1, s2 = sentence(rng, label), sentence(rng)
            # Real GLUE text holds unbalanced quotes and words pandas would read as missing values.
            s1 = {1: '"quoted ' + s1, 2: "NA " + s1}.get(i, s1)
            if name == "cola":
                out.append(f"gj04\t{label}\t{'' if label else '*'}\t{s1}")
            elif name == "sst2":
                out.append(f"{s1}\t{label}")
            elif name == "mrpc":
                out.append(f"{label}\t{1000 + i}\t{2000 + i}\t{s1}\t{s2}")
            elif name == "qqp":
                out.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{s1}?\t{s2}?\t{label}")
            elif name == "mnli":
                gold = ["entailment", "neutral", "contradiction"][label]
                votes = "\t".join([gold] * (5 if dev else 1))
                parses = f"( {s1} )\t( {s2} )\t(ROOT {s1})\t(ROOT {s2})"
                out.append(f"{i}\t{i}\t{i}n\tfiction\t{parses}\t{s1}\t{s2}\t{votes}\t{gold}")
            elif name in ("qnli", "rte"):
                out.append(f"{i}\t{s1}\t{s2}\t{['entailment', 'not_entailment'][label]}")
            else:  # wnli
                out.append(f"{i}\t{s1}\t{s2}\t{label}")
        return out

    headers = {
        "cola": None,
        "sst2": "sentence\tlabel",
        "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "qnli": "index\tquestion\tsentence\tlabel",
        "rte": "index\tsentence1\tsentence2\tlabel",
        "wnli": "index\tsentence1\tsentence2\tlabel",
    }
    mnli_cols = "\t".join(["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                           "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"])
    files = {"train.tsv": (n_train, False)}
    if name == "mnli":
        files.update({"dev_matched.tsv": (n_dev, True), "dev_mismatched.tsv": (n_dev // 2, True)})
    else:
        files["dev.tsv"] = (n_dev, True)
    for file, (n, dev) in files.items():
        header = headers.get(name)
        if name == "mnli":
            header = mnli_cols + ("\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5" if dev else "\tlabel1") + "\tgold_label"
        lines = rows(n, dev)
        text = "\n".join(([header] if header else []) + lines) + "\n"
        (folder / file).write_text(text, encoding="utf-8")
    return folder


GLUE_TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


def write_glue(root: Path, **kwargs) -> Path:
    for name in GLUE_TASKS:
        write_task(root, name, **kwargs)
    return root
