r"""What a task is: files, fields, labels, metrics.

The nine GLUE tasks are defined in ``conf/task/*.yaml`` (one file each) and built into a
:class:`TaskSpec` by Hydra; ``conf/task/custom.yaml`` defines a task from any CSV, TSV or
JSON(-lines) files. Sequence-labelling tasks (``pos_ewt``, ``ner_wnut17``, ``tagging``) are
:class:`TaggingTask`\ s: one label per word. A task's ``kind`` (``sequence`` or ``tagging``)
picks the heads (:func:`rbert.build.build_system`) and the data module (``data=`` follows
``task=``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rbert.errors import ConfigError

# Metric names a task may list (all improve upwards, so checkpoints monitor with mode=max).
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
# Tagging: word accuracy; entity-level micro F1 (seqeval, CoNLL mode; BIO tasks only).
TAGGING_METRICS = ("accuracy", "f1")
TAG_SCHEMES = (None, "bio")


class Splits:
    """What sentence and tagging tasks share: which splits are trained, monitored and reported."""

    name: str
    splits: dict[str, str]
    monitor: str

    def check_splits(self) -> None:
        where = f"task {self.name}"
        if "train" not in self.splits or self.eval_splits[:1] != ["val"]:
            raise ConfigError(f"{where}: splits need 'train' and 'val' (the monitored set), got {list(self.splits)}")
        for split in self.eval_splits:
            if not split.startswith("val"):
                raise ConfigError(f"{where}: evaluation split {split!r} must be named val or val_<name>")

    @property
    def eval_splits(self) -> list[str]:
        """Evaluation sets in order; the first is the one monitored."""
        return [s for s in self.splits if s not in ("train", "test")]

    def prefixes(self, stage: str) -> list[str]:
        """Logging prefixes of the evaluation sets of ``stage`` ("val" or "test").

        GLUE test labels are hidden, so unless a labelled ``test`` split is given the test
        stage evaluates the dev sets again (``val`` -> ``test``, ``val_mm`` -> ``test_mm``).
        """
        if stage == "val":
            return self.eval_splits
        if "test" in self.splits:
            return ["test"]
        return ["test" + s[len("val"):] for s in self.eval_splits]

    @property
    def monitor_key(self) -> str:
        return f"val/{self.monitor}"


@dataclass
class TaskSpec(Splits):
    """A text classification or regression task.

    Args:
        name: short name (``sst2``), used in run names.
        text_fields: one or two text columns (canonical names, as on the hub).
        num_labels: number of classes; 1 means regression.
        labels: the label values as written in the files, in class-index order
            (``["entailment", "neutral", "contradiction"]``). ``None`` for regression,
            or for a custom task whose labels are read from its training file.
        label_field: canonical name of the label column.
        metrics: metric names (:data:`CLASSIFICATION_METRICS` or :data:`REGRESSION_METRICS`).
        monitor: the metric that picks the best checkpoint.
        splits: split -> file name in the task folder. ``train`` is trained on; every other
            key except ``test`` is an evaluation set logged under that prefix (``val``,
            ``val_mm``); ``test`` (optional) must be labelled.
        data_subdir: folder of this task under ``data_dir`` (``SST-2``).
        columns: canonical name -> column name in the local files, where they differ.
        column_names: column names for files without a header row (CoLA).
        hub: where the same task lives on the Hugging Face hub: ``{path, name, splits}`` with
            ``splits`` mapping our split names to the hub's.
    """

    name: str
    text_fields: list[str]
    num_labels: int
    metrics: list[str]
    monitor: str
    splits: dict[str, str]
    labels: list[str] | None = None
    label_field: str = "label"
    data_subdir: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    column_names: list[str] | None = None
    hub: dict | None = None

    def __post_init__(self) -> None:
        # Hydra hands over OmegaConf containers; keep plain Python types.
        self.text_fields = list(self.text_fields)
        self.metrics = list(self.metrics)
        self.splits = dict(self.splits)
        self.columns = dict(self.columns or {})
        self.labels = [str(v) for v in self.labels] if self.labels is not None else None
        self.column_names = list(self.column_names) if self.column_names is not None else None
        if self.hub is not None:
            self.hub = {k: (dict(v) if k == "splits" else v) for k, v in dict(self.hub).items()}
        where = f"task {self.name}"
        if not 1 <= len(self.text_fields) <= 2:
            raise ConfigError(f"{where}: text_fields must name one or two columns, got {self.text_fields}")
        if self.num_labels < 1:
            raise ConfigError(f"{where}: num_labels must be >= 1 (1 = regression), got {self.num_labels}")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ConfigError(f"{where}: labels {self.labels} do not match num_labels={self.num_labels}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"{where}: task.labels {self.labels} name a label twice")
        allowed = REGRESSION_METRICS if self.is_regression else CLASSIFICATION_METRICS
        for metric in self.metrics:
            if metric not in allowed:
                raise ConfigError(f"{where}: metric {metric!r} is not one of {allowed}")
        if ("f1" in self.metrics or "mcc" in self.metrics) and self.num_labels != 2:
            raise ConfigError(f"{where}: f1 and mcc are binary metrics, but num_labels={self.num_labels}")
        if self.monitor not in self.metrics:
            raise ConfigError(f"{where}: monitor {self.monitor!r} is not one of its metrics {self.metrics}")
        self.check_splits()

    kind = "sequence"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def file_column(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)


@dataclass
class TaggingTask(Splits):
    """A sequence-labelling task: one tag per word.

    Args:
        name: short name (``pos_ewt``).
        format: ``conll`` (columns), ``conllu`` or ``jsonl`` (:mod:`rbert.data.tagging_files`).
        num_labels: number of tags (the model's output size, known before any file is read).
        labels: the tags in class-index order; ``None`` reads them from the training file
            (sorted, ``O`` first).
        tag_field: where the tag is: a column number (``conll``; negative counts from the
            end), a CoNLL-U field (``upos``, ``xpos``, ...), or a JSON key.
        word_field: where the word is: a column number (``conll``) or a JSON key (``jsonl``).
        scheme: ``bio`` for entity tags (``B-x``/``I-x``/``O``: entity-level F1, valid-sequence
            decoding) or None (POS: every word is scored on its own).
        bad_bio: an ``I-x`` that follows nothing: ``error`` (one line naming file and line) or
            ``repair`` (read it as ``B-x``, counted in the log).
        metrics, monitor, splits, data_subdir: as for :class:`TaskSpec`.
        hub: ``{path, name, splits, tokens, tags}``: the same task in ``datasets`` (its
            columns of words and of tag ids).
    """

    name: str
    format: str
    num_labels: int
    metrics: list[str]
    monitor: str
    splits: dict[str, str]
    labels: list[str] | None = None
    tag_field: str | int | None = -1
    word_field: str | int | None = None
    scheme: str | None = None
    bad_bio: str = "error"
    data_subdir: str | None = None
    hub: dict | None = None

    kind = "tagging"
    is_regression = False

    def __post_init__(self) -> None:
        from rbert.data.tagging_files import FORMATS

        self.metrics = list(self.metrics)
        self.splits = dict(self.splits)
        self.labels = [str(v) for v in self.labels] if self.labels is not None else None
        if self.hub is not None:
            self.hub = {k: (dict(v) if k == "splits" else v) for k, v in dict(self.hub).items()}
        where = f"task {self.name}"
        if self.format not in FORMATS:
            raise ConfigError(f"{where}: task.format {self.format!r} is not one of {FORMATS}")
        if self.scheme not in TAG_SCHEMES:
            raise ConfigError(f"{where}: task.scheme {self.scheme!r} is not one of {TAG_SCHEMES}")
        if self.bad_bio not in ("error", "repair"):
            raise ConfigError(f"{where}: task.bad_bio must be error or repair, got {self.bad_bio!r}")
        if self.num_labels < 2:
            raise ConfigError(f"{where}: num_labels must be >= 2 tags, got {self.num_labels}")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ConfigError(f"{where}: labels {self.labels} do not match num_labels={self.num_labels}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"{where}: task.labels {self.labels} name a tag twice")
        for metric in self.metrics:
            if metric not in TAGGING_METRICS:
                raise ConfigError(f"{where}: metric {metric!r} is not one of {TAGGING_METRICS}")
        if "f1" in self.metrics and self.scheme != "bio":
            raise ConfigError(f"{where}: metric f1 is entity-level F1 and needs task.scheme=bio")
        if self.monitor not in self.metrics:
            raise ConfigError(f"{where}: monitor {self.monitor!r} is not one of its metrics {self.metrics}")
        self.check_splits()

    @property
    def entity_types(self) -> list[str]:
        """The entity types of a BIO task's tags (sorted), for per-type F1."""
        if self.scheme != "bio" or not self.labels:
            return []
        return sorted({t[2:] for t in self.labels if t[:2] in ("B-", "I-")})
