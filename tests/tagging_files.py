"""Write tiny tagging folders in the exact formats of ../shared/data/tagging.

Each word's tag follows from the word itself (``the`` is DET, ``paris`` is a location, ...),
so a model can learn the tiny tasks, and the files carry the real files' quirks: CoNLL-U
comments, multi-word token ranges and empty nodes; WNUT's lone-tab sentence separators.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POS = {"the": "DET", "a": "DET", "dog": "NOUN", "cat": "NOUN", "park": "NOUN", "runs": "VERB", "sleeps": "VERB",
       "quickly": "ADV", "in": "ADP", "big": "ADJ", ".": "PUNCT", "and": "CCONJ"}
# Entities: (words, type); everything else is O.
ENTITIES = [(["paris"], "location"), (["new", "york"], "location"), (["john", "smith"], "person"),
            (["acme"], "corporation")]
FILLER = ["i", "saw", "went", "to", "with", "today", "lol", "at"]


def pos_sentence(rng: random.Random, n: int | None = None) -> list[str]:
    return rng.choices(list(POS), k=n or rng.randint(3, 10))


def ner_sentence(rng: random.Random, n: int | None = None) -> list[tuple[str, str]]:
    out = []
    while len(out) < (n or rng.randint(4, 10)):
        if rng.random() < 0.3:
            words, kind = rng.choice(ENTITIES)
            out += [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]
        else:
            out.append((rng.choice(FILLER), "O"))
    return out


def conllu_block(words: list[str], sent_id: str, contraction: bool) -> str:
    lines = [f"# sent_id = {sent_id}", f"# text = {' '.join(words)}"]
    for i, word in enumerate(words, start=1):
        if contraction and i == 2:  # a multi-word token range over words 2-3
            lines.append(f"2-3\t{words[1]}{words[2]}\t_\t_\t_\t_\t_\t_\t_\t_")
        lines.append(f"{i}\t{word}\t{word}\t{POS[word]}\tXX\t_\t0\tdep\t_\t_")
        if contraction and i == 1:  # an empty node, not a word
            lines.append("1.1\tghost\tghost\tNOUN\tNN\t_\t_\t_\t0:dep\t_")
    return "\n".join(lines) + "\n\n"


def write_ewt(root: Path, n_train: int = 48, n_dev: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "UD_English-EWT"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("en_ewt-ud-train.conllu", n_train), ("en_ewt-ud-dev.conllu", n_dev)):
        blocks = ["# newdoc id = tiny\n"]
        for i in range(n):
            blocks.append(conllu_block(pos_sentence(rng), f"s{i}", contraction=i % 5 == 0))
        (folder / name).write_text("".join(blocks))
    return folder


def write_wnut(root: Path, n_train: int = 48, n_dev: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "WNUT17"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, separator in (("wnut17train.conll", n_train, "\t\n"), ("emerging.dev.conll", n_dev, "\n")):
        text = "".join("".join(f"{w}\t{t}\n" for w, t in ner_sentence(rng)) + separator for _ in range(n))
        (folder / name).write_text(text)
    return folder


def write_jsonl(path: Path, n: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pairs = ner_sentence(rng)
        rows.append(json.dumps({"tokens": [w for w, _ in pairs], "tags": [t for _, t in pairs]}))
    path.write_text("\n".join(rows) + "\n")
    return path
