"""The exported folder: what an early-exit model needs to run without Hydra or Lightning.

Layout (Hugging Face's, for a custom architecture):

* ``config.json``: ``model_type`` rbert_early_exit with an ``auto_map`` into
  ``modeling_rbert.py`` (so ``transformers`` runs it with ``trust_remote_code``, and refuses
  it without), the backbone's own config under ``backbone`` (its ``model_type`` picks the
  family), the labels as ``id2label``, and an ``rbert_early_exit`` section: the exits, their
  style and pooling, which exits the objective trained and which the runtime consults, the
  exit policy with its threshold (chosen at export time), the text fields and the maximum length;
* ``model.safetensors``: the multi-exit model's weights, by name; ``modeling_rbert.py``;
* the tokenizer's files;
* ``onnx/``: one graph per consulted exit, the first with the embeddings; a tagger's also one
  graph per later layer for token-level exit (see :mod:`rbert.deploy.onnx_export`).

A folder is data handed in by a user: :func:`read_spec` checks every field it reads and
names the file and field at fault; no name in it is ever imported or instantiated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SECTION = "rbert_early_exit"
FORMAT = 3  # 3: a model type of its own, the backbone's config under "backbone"; 2: embeddings in the first graph


class FolderError(ValueError):
    """An exported folder that cannot be used; the message names the file and field."""


@dataclass
class Segment:
    """One ONNX graph: layers ``first..exit`` (1-based) and the exit at ``exit``."""

    file: str
    first: int
    exit: int


@dataclass
class DeploySpec:
    """The ``rbert_early_exit`` section of config.json."""

    task: str
    text_fields: list[str]
    labels: list[str]            # class names in index order; [] for a regression
    max_length: int              # tokens; the tokenizer truncates (the server refuses) longer texts
    exit_layers: list[int]       # every exit of the model (1-based layer numbers)
    trained_exits: list[int]     # the exits the objective trained
    consulted_exits: list[int]   # the exits the runtime consults (the last one answers the rest)
    style: str
    pooling: str
    policy: dict                 # rbert.inference.policies.policy_to_dict
    objective: str = ""
    policy_choice: dict | None = None  # a budget's choice on the dev set, when there was one
    kind: str = "sequence"       # sequence: a label per text; tagging: a tag per word (SENTEE early exit)
    scheme: str | None = None    # tagging: "bio" (answers keep BIO sequences valid) or None
    onnx: dict = field(default_factory=dict)  # {"opset", "exporter", "segments": [Segment], "fused"?}
    format: int = FORMAT

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def tagging(self) -> bool:
        return self.kind == "tagging"

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def segments(self) -> list[Segment]:
        return [Segment(**s) for s in self.onnx.get("segments", [])]


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FolderError(f"{folder}: no config.json: not an exported rbert model (mode=export writes one)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FolderError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(config, dict) or not isinstance(config.get(SECTION), dict):
        raise FolderError(f"{path}: no {SECTION} section: a Hugging Face model, not an exported rbert "
                          "early-exit model (python run.py mode=export ckpt_path=<fine-tuned .ckpt>)")
    return config


def read_spec(folder: str | os.PathLike) -> DeploySpec:
    """The folder's :class:`DeploySpec`, every field checked."""
    path = Path(folder) / "config.json"
    data = dict(read_config(folder)[SECTION])

    def get(name: str, kind: type | tuple, check: Callable[[object], bool] = lambda v: True, what: str = ""):
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int or not check(value):
            raise FolderError(f"{path}: {SECTION}.{name} = {value!r}: expected {what or kind}")
        return value

    def layers(name: str) -> list[int]:
        return get(name, list, lambda v: bool(v) and all(isinstance(x, int) and x >= 1 for x in v)
                   and v == sorted(set(v)), "a non-empty ascending list of layer numbers")

    if data.get("format") != FORMAT:
        raise FolderError(f"{path}: {SECTION}.format = {data.get('format')!r}; this rbert reads format {FORMAT} "
                          "(export the checkpoint again: python run.py mode=export ...)")
    spec = DeploySpec(
        task=get("task", str), objective=str(data.get("objective", "")),
        text_fields=get("text_fields", list, lambda v: len(v) in (1, 2) and all(isinstance(x, str) for x in v),
                        "one or two field names"),
        labels=get("labels", list, lambda v: len(v) != 1 and all(isinstance(x, str) for x in v)
                   and len(set(v)) == len(v), "distinct class names ([] for a regression)"),
        max_length=get("max_length", int, lambda v: v >= 8, "an integer >= 8"),
        exit_layers=layers("exit_layers"), trained_exits=layers("trained_exits"),
        consulted_exits=layers("consulted_exits"),
        style=get("style", str), pooling=get("pooling", str),
        policy=get("policy", dict, lambda v: isinstance(v.get("name"), str), "a policy with a name"),
        policy_choice=data.get("policy_choice"), onnx=get("onnx", dict, what="a dict (may be empty)"),
        kind=data.get("kind", "sequence"), scheme=data.get("scheme"))
    if spec.kind not in ("sequence", "tagging") or spec.scheme not in (None, "bio"):
        raise FolderError(f"{path}: {SECTION}.kind / scheme = {spec.kind!r} / {spec.scheme!r}: expected sequence "
                          "or tagging, and null or bio")
    if not set(spec.consulted_exits) <= set(spec.exit_layers):
        raise FolderError(f"{path}: {SECTION}.consulted_exits {spec.consulted_exits} are not all among "
                          f"exit_layers {spec.exit_layers}")
    if spec.consulted_exits[-1] != spec.exit_layers[-1]:
        raise FolderError(f"{path}: {SECTION}.consulted_exits must end with the final exit ({spec.exit_layers[-1]})")
    if spec.onnx:
        check_onnx(Path(folder), spec)
    return spec


def check_onnx(folder: Path, spec: DeploySpec) -> None:
    """The ``onnx`` section: files inside the folder, one graph per consulted exit, each starting
    where the previous one ended."""
    where = f"{folder / 'config.json'}: {SECTION}.onnx"

    def inside(name: object, field: str) -> None:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise FolderError(f"{where}.{field} = {name!r}: expected a file name inside the folder")

    segments = spec.onnx.get("segments")
    if not isinstance(segments, list):
        raise FolderError(f"{where}.segments = {segments!r}: expected a list of graphs")
    first = 1
    for i, s in enumerate(segments):
        if not isinstance(s, dict) or set(s) != {"file", "first", "exit"}:
            raise FolderError(f"{where}.segments[{i}] = {s!r}: expected {{file, first, exit}}")
        inside(s["file"], f"segments[{i}].file")
        if s["first"] != first or not isinstance(s["exit"], int) or s["exit"] < first:
            raise FolderError(f"{where}.segments[{i}]: layers {s['first']!r}..{s['exit']!r}; expected the "
                              f"graph after layer {first - 1} to start at layer {first}")
        first = s["exit"] + 1
    if [s["exit"] for s in segments] != spec.consulted_exits:
        raise FolderError(f"{where}.segments end at layers {[s['exit'] for s in segments]}, not at "
                          f"consulted_exits {spec.consulted_exits}")
    halted = spec.onnx.get("halted")
    if halted is not None:  # a tagger's per-layer graphs for token-level exit
        layers = list(range(spec.consulted_exits[0] + 1, spec.consulted_exits[-1] + 1))
        if not isinstance(halted, list) or not all(isinstance(h, dict) and set(h) == {"file", "layer", "exit"}
                                                   for h in halted):
            raise FolderError(f"{where}.halted = {halted!r}: expected a list of {{file, layer, exit}}")
        if [h["layer"] for h in halted] != layers or any(h["exit"] != (h["layer"] in spec.consulted_exits)
                                                         for h in halted):
            raise FolderError(f"{where}.halted: layers {[h['layer'] for h in halted]}; expected {layers}, "
                              "with exit true where an exit is consulted")
        for i, h in enumerate(halted):
            inside(h["file"], f"halted[{i}].file")
    fused = spec.onnx.get("fused")
    if fused is not None:
        if not isinstance(fused, dict) or set(fused) != {"file", "policy"} or not isinstance(fused["policy"], dict):
            raise FolderError(f"{where}.fused = {fused!r}: expected {{file, policy}}")
        inside(fused["file"], "fused.file")


def write_folder(out: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write an exported folder all at once: ``fill`` writes into a temporary sibling folder,
    which is renamed to ``out`` only when complete, so an interrupted export leaves nothing
    half-written under ``out``. ``out`` must not exist yet, or be empty."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FolderError(f"{out} exists and is not an empty folder; choose another export folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        fill(tmp)
        with_umask(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def with_umask(folder: Path) -> None:
    """Permissions as any saved model gets them (0755 / 0644 under the usual umask): the
    temporary folder is created 0700, and files written through a temporary file 0600,
    which a server running as another user could not read."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; put it back at once
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
