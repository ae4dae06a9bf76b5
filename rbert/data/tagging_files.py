"""Sequence-labelling files -> sentences of (word, tag): CoNLL columns, CoNLL-U, JSON lines.

Every reader returns :class:`Sentence` objects that remember where they came from, so a bad
line is reported as ``file:line`` in one line, and nothing is dropped silently.

* **CoNLL columns** (WNUT-17, CoNLL-2003): one word a line, columns separated by tabs (or,
  without a tab, by spaces), an empty line between sentences. A line of whitespace only
  also separates sentences (WNUT-17's train file uses a lone tab); ``-DOCSTART-`` lines are
  not words. Every word line must have as many columns as the file's first.
* **CoNLL-U** (Universal Dependencies): parsed with ``conllu`` per sentence block. Multi-word
  token ranges (``3-4``) and empty nodes (``8.1``) are not words to tag: the syntactic words
  inside a range are. Each word line must have the format's 10 columns (``conllu`` itself
  would accept fewer and fill them with nothing).
* **JSON lines**: ``{"tokens": [...], "tags": [...]}`` per line (the key names are options).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rbert.errors import ConfigError

FORMATS = ("conll", "conllu", "jsonl")
CONLLU_FIELDS = ("form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")


@dataclass
class Sentence:
    """Words and their tags (None where the file has none: a request), and each word's line."""

    words: list[str]
    tags: list[str] | None
    lines: list[int]  # 1-based line of each word (JSON lines: the sentence's line)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_conll(path: Path, tag_column: int | None = -1, word_column: int = 0) -> list[Sentence]:
    """A CoNLL column file. ``tag_column`` (0-based, negative from the end) holds the tag;
    None reads words only (a file to tag)."""
    sentences, words, tags, lines = [], [], [], []
    width = None

    def close():
        if words:
            sentences.append(Sentence(list(words), list(tags) if tag_column is not None else None, list(lines)))
        words.clear(), tags.clear(), lines.clear()

    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            close()
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        if columns[0] == "-DOCSTART-":
            close()
            continue
        if width is None:
            width = len(columns)
            for option, column in (("word_column", word_column), ("tag_column", tag_column)):
                if column is not None and not -width <= column < width:
                    raise ConfigError(f"{path}:{number}: task.{option}={column} but the file has {width} column(s)")
        if len(columns) != width:
            raise ConfigError(f"{path}:{number}: {len(columns)} column(s) where the file's first word line has "
                              f"{width}")
        word = columns[word_column].strip()
        if not word:
            raise ConfigError(f"{path}:{number}: empty word in column {word_column}")
        words.append(word)
        lines.append(number)
        if tag_column is not None:
            tags.append(columns[tag_column].strip())
    close()
    return sentences


def read_conllu(path: Path, field: str | None = "upos") -> list[Sentence]:
    """A CoNLL-U file; ``field`` names the column that holds the tag (``upos``, ``xpos``, ...)."""
    import conllu

    if field is not None and field not in CONLLU_FIELDS:
        raise ConfigError(f"task.tag_field: {field!r} is not a CoNLL-U field ({', '.join(CONLLU_FIELDS)})")
    sentences = []
    block: list[tuple[int, str]] = []

    def close():
        word_lines = [number for number, line in block if not line.startswith("#")]
        if not word_lines:
            block.clear()
            return
        try:
            (tokens,) = conllu.parse("\n".join(line for _, line in block) + "\n\n")
        except conllu.exceptions.ParseException as err:
            raise ConfigError(f"{path}:{block[0][0]}: cannot parse this sentence ({err})") from None
        words, tags, lines = [], [], []
        for token, number in zip(tokens, word_lines):
            if not isinstance(token["id"], int):  # a multi-word range or an empty node
                continue
            words.append(token["form"])
            lines.append(number)
            if field is not None:
                tag = token[field]
                if tag is None or tag == "_":
                    raise ConfigError(f"{path}:{number}: no {field} for word {token['form']!r}")
                tags.append(str(tag))
        sentences.append(Sentence(words, tags if field is not None else None, lines))
        block.clear()

    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            close()
            continue
        if not line.startswith("#") and len(line.split("\t")) != 10:
            raise ConfigError(f"{path}:{number}: {len(line.split(chr(9)))} tab-separated column(s); a CoNLL-U "
                              "word line has 10")
        block.append((number, line))
    close()
    return sentences


def read_jsonl(path: Path, words_key: str = "tokens", tags_key: str | None = "tags") -> list[Sentence]:
    """JSON lines, one sentence each: a list of words and (``tags_key``) a list of tags as long."""
    sentences = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON ({err.msg})") from None
        keys = [words_key] + ([tags_key] if tags_key is not None else [])
        for key in keys:
            if not isinstance(row, dict) or not isinstance(row.get(key), list) or not all(
                    isinstance(v, str) for v in row[key]):
                raise ConfigError(f"{path}:{number}: {key!r} must be a list of strings")
        words, tags = row[words_key], row[tags_key] if tags_key is not None else None
        if tags is not None and len(tags) != len(words):
            raise ConfigError(f"{path}:{number}: {len(words)} {words_key} but {len(tags)} {tags_key}")
        if any(not w.strip() for w in words):
            raise ConfigError(f"{path}:{number}: an empty word in {words_key!r}")
        if words:
            sentences.append(Sentence(words, tags, [number] * len(words)))
    return sentences


def check_bio(path: Path | str, sentences: list[Sentence], repair: bool = False) -> int:
    """BIO tags: an ``I-x`` must follow ``B-x`` or ``I-x``. Raise on the first that does not, naming
    file and line, or (``repair``) make it ``B-x`` (as seqeval's default mode reads it anyway)
    and return how many were changed."""
    changed = 0
    for sentence in sentences:
        previous = "O"
        for i, tag in enumerate(sentence.tags or []):
            if not (tag == "O" or tag[:2] in ("B-", "I-")):
                raise ConfigError(f"{path}:{sentence.lines[i]}: tag {tag!r} is not O, B-<type> or I-<type> "
                                  "(task.scheme=bio)")
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                if not repair:
                    raise ConfigError(f"{path}:{sentence.lines[i]}: {tag} follows {previous} (an I- tag must "
                                      "follow B- or I- of its type; task.bad_bio=repair reads it as B-)")
                tag = sentence.tags[i] = "B-" + tag[2:]
                changed += 1
            previous = tag
    return changed


def read_sentences(path: Path, format: str, tag_field, word_field=None) -> list[Sentence]:
    """One file in ``format`` (:data:`FORMATS`)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if format == "conll":
        return read_conll(path, None if tag_field is None else int(tag_field),
                          0 if word_field is None else int(word_field))
    if format == "conllu":
        return read_conllu(path, tag_field)
    if format == "jsonl":
        return read_jsonl(path, word_field or "tokens", tag_field)
    raise ConfigError(f"task.format: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
