"""BERT encoder in plain PyTorch.

One readable file, in the spirit of Hugging Face's ``modeling_bert.py``:

* parameter names are those of ``transformers.BertModel``, so any Hugging Face BERT
  checkpoint loads by name and :meth:`BertModel.save_pretrained` writes a folder that
  ``transformers.AutoModel.from_pretrained`` reads back;
* the encoder can be run one layer at a time (:meth:`BertModel.embed`,
  :meth:`BertModel.attention_bias`, ``encoder.layer[i]``), which multi-exit training and
  early-exit inference need;
* self-attention and the feed-forward projections are pluggable through the
  :data:`ATTENTIONS` and :data:`FEED_FORWARDS` registries: softmax attention via
  ``scaled_dot_product_attention`` and dense feed-forward layers are the standard BERT;
  relaxed variants (linear attention, low-rank feed-forward) register themselves here.

Why not wrap ``transformers.BertModel``: its layer loop cannot be stopped after layer i
or continued on a sub-batch, and swapping attention/feed-forward modules means patching
its internals; see ``docs/design.md``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN

__all__ = ["ATTENTIONS", "FEED_FORWARDS", "BertConfig", "BertModel", "BertEncoderOutput", "load_by_name",
           "write_hf_folder"]

log = logging.getLogger(__name__)


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Rows 0..seq_len-1 of the position table are a slice, not a lookup; and no dropout call
        # in eval. Both are the same numbers, ~15 us sooner at batch size 1 (early exit's case).
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings.weight[:seq_len]
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.LayerNorm(x)
        return self.dropout(x) if self.training else x


class SoftmaxSelfAttention(nn.Module):
    """Standard multi-head scaled dot-product attention (``torch`` SDPA kernels)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention_bias: torch.Tensor | None) -> torch.Tensor:
        """(batch, heads, seq, head_dim) queries, keys, values -> per-head outputs, same shape."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_bias, dropout_p=self.dropout_p if self.training else 0.0
        )

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        out = self.attend(q, k, v, attention_bias)
        batch, _, seq_len, _ = out.shape
        return out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)


# name -> self-attention class taking (config); forward(hidden, attention_bias) -> hidden.
ATTENTIONS: dict[str, type[nn.Module]] = {"softmax": SoftmaxSelfAttention}

# name -> linear layer class for the two feed-forward projections, called as cls(in, out, config).
FEED_FORWARDS: dict[str, type[nn.Module]] = {}


class DenseLinear(nn.Linear):
    """The standard feed-forward projection (an ``nn.Linear``; config is unused)."""

    def __init__(self, in_features: int, out_features: int, config: BertConfig | None = None):
        super().__init__(in_features, out_features)


FEED_FORWARDS["dense"] = DenseLinear


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, attention: str):
        super().__init__()
        self.self = ATTENTIONS[attention](config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, attention_bias), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig, feed_forward: str):
        super().__init__()
        self.dense = FEED_FORWARDS[feed_forward](config.hidden_size, config.intermediate_size, config)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig, feed_forward: str):
        super().__init__()
        self.dense = FEED_FORWARDS[feed_forward](config.intermediate_size, config.hidden_size, config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertLayer(nn.Module):
    """Post-LayerNorm transformer layer: attention block, then feed-forward block."""

    def __init__(self, config: BertConfig, attention: str = "softmax", feed_forward: str = "dense"):
        super().__init__()
        self.attention = BertAttention(config, attention)
        self.intermediate = BertIntermediate(config, feed_forward)
        self.output = BertOutput(config, feed_forward)

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        hidden = self.attention(hidden, attention_bias)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, attention: str, feed_forward: str):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, attention, feed_forward) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """dense + tanh on one vector per sequence (BERT's next-sentence pooler)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(pooled))


@dataclass
class BertEncoderOutput:
    last_hidden_state: torch.Tensor
    # (embeddings, layer 1, ..., layer L) when asked for, as in transformers.
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BertModel(nn.Module):
    """BERT encoder with Hugging Face parameter names.

    ``attention`` and ``feed_forward`` pick entries of :data:`ATTENTIONS` and
    :data:`FEED_FORWARDS`; the defaults give the standard BERT.
    """

    def __init__(self, config: BertConfig, attention: str = "softmax", feed_forward: str = "dense",
                 add_pooling_layer: bool = True):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {sorted(ATTENTIONS)}")
        if feed_forward not in FEED_FORWARDS:
            raise ValueError(f"unknown feed_forward {feed_forward!r}; choose one of {sorted(FEED_FORWARDS)}")
        self.config = config
        self.attention_type = attention
        self.feed_forward_type = feed_forward
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, attention, feed_forward)
        # Masked-LM models have no pooler (as in transformers.BertForMaskedLM).
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    # ------------------------------------------------------------------ structure
    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation (truncated-normal-like N(0, 0.02), LayerNorm 1/0)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward, piece by piece
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids, token_type_ids)

    @staticmethod
    def attention_bias(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, seq) 1/0 padding mask -> boolean (batch, 1, 1, seq) SDPA mask, True = attend."""
        if attention_mask is None:
            return None
        return attention_mask.bool()[:, None, None, :]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        num_layers: int | None = None,
    ) -> BertEncoderOutput:
        """Run the embeddings and the first ``num_layers`` layers (all by default)."""
        bias = self.attention_bias(attention_mask)
        hidden = self.embed(input_ids, token_type_ids)
        states = [hidden] if output_hidden_states else None
        # islice, not layer[:n]: slicing a ModuleList builds a new module (~15 us, a cost at batch size 1)
        for layer in islice(self.encoder.layer, num_layers or self.num_layers):
            hidden = layer(hidden, bias)
            if states is not None:
                states.append(hidden)
        return BertEncoderOutput(hidden, tuple(states) if states is not None else None)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, attention: str = "softmax", feed_forward: str = "dense",
                        **hf_kwargs) -> BertModel:
        """Load any Hugging Face BERT checkpoint (hub id or local folder) by parameter name.

        ``transformers`` does the reading (hub download, sharding, ``.bin``/``.safetensors``,
        ``bert.`` prefixes of task checkpoints); the weights are then copied by name.
        """
        import transformers

        return load_by_name(transformers.BertModel, name_or_path,
                            lambda config: cls(config, attention=attention, feed_forward=feed_forward), **hf_kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` readable by ``AutoModel.from_pretrained``."""
        self.check_standard()
        tensors = {k: v for k, v in self.state_dict().items()}
        write_hf_folder(folder, self.config, "BertModel", tensors)

    def check_standard(self) -> None:
        """Only a standard BERT (softmax attention, dense feed-forward) has a Hugging Face format."""
        if (self.attention_type, self.feed_forward_type) != ("softmax", "dense"):
            raise ValueError(f"a BERT with {self.attention_type} attention and {self.feed_forward_type} feed-forward "
                             "has no Hugging Face format; expand it into a standard BERT first")


def load_by_name(hf_class, name_or_path: str | os.PathLike, build, **hf_kwargs) -> nn.Module:
    """Read a checkpoint with the ``transformers`` class ``hf_class``, then copy its weights, strictly
    by name, into ``build(config)``: an rbert model with the same module tree."""
    import transformers

    # transformers prints a many-line load report for every head the checkpoint has and the class
    # lacks (an MLM folder as a classifier's backbone: cls.predictions.*); say it in one line instead.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        hf, info = hf_class.from_pretrained(name_or_path, output_loading_info=True, **hf_kwargs)
    except RuntimeError:  # a failed load (e.g. size mismatches): again with the report, which explains it
        transformers.logging.set_verbosity(verbosity)
        hf_class.from_pretrained(name_or_path, **hf_kwargs)
        raise
    finally:
        transformers.logging.set_verbosity(verbosity)
    for kind, what in (("unexpected_keys", "not used"), ("missing_keys", "initialised at random")):
        if info.get(kind):
            log.info("%s: %s: %s", name_or_path, what, ", ".join(sorted(key_groups(info[kind]))))
    if hf.config.model_type != "bert":
        raise ValueError(f"{name_or_path}: model_type {hf.config.model_type!r} is not a BERT checkpoint")
    model = build(hf.config)
    try:
        model.load_state_dict(hf.state_dict())
    except RuntimeError as err:
        raise ValueError(f"{name_or_path}: weights do not load by name: {str(err).splitlines()[0]}") from err
    return model


def key_groups(keys) -> set[str]:
    """Parameter names shortened to their module prefix (``cls.predictions.*``) for a log line."""
    return {".".join(k.split(".")[:2]) + ".*" if k.count(".") > 1 else k for k in keys}


def write_hf_folder(folder: str | os.PathLike, config: BertConfig, architecture: str,
                    tensors: dict[str, torch.Tensor]) -> None:
    """``config.json`` + ``model.safetensors`` in the Hugging Face layout.

    Each file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written file under the final name.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict.update(architectures=[architecture], model_type="bert")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(name: str, save) -> None:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(fd)
        try:
            save(tmp)
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    write("model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write("config.json", lambda p: BertConfig.from_dict(config_dict).to_json_file(p))
