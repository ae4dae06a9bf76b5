"""The encoder interface every backbone family provides, and the checkpoint plumbing they share.

Multi-exit training, early-exit inference, fine-tuning and deployment need five things of a
backbone, and nothing else:

* ``embed(input_ids, token_type_ids)``: token ids -> the first layer's input, at the hidden
  size (ALBERT and ELECTRA project their narrower embeddings here);
* ``attention_bias(attention_mask)``: what each layer takes for padding;
* ``layers``: the layer *applications* in order, each called as ``layer(hidden, bias)``.
  ALBERT applies one shared layer group L times, so its list holds the same module L times;
  an exit after application i is an exit after "layer" i;
* ``num_layers``, ``hidden_size``, ``hidden_dropout``;
* ``pooler_dense``: the checkpoint's pooler projection (``nn.Linear``, dense + tanh on one
  vector), or None for families without one (RoBERTa, DistilBERT, ELECTRA): heads then
  make their own.

Each family is one file (``bert.py``, ``roberta.py``, ...) with Hugging Face's parameter
names for that family, so its checkpoints load by name, and one entry in
:data:`rbert.models.families.FAMILIES`. Model code raises plain ``ValueError``s; the build
layer (:mod:`rbert.models.hub`, :mod:`rbert.build`) names the config option at fault.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    # (embeddings, layer 1, ..., layer L) when asked for, as in transformers.
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Encoder(nn.Module):
    """Base class of rbert's backbones: the interface above and a forward pass built from it."""

    # The transformers class that reads this family's checkpoints, and the model_types it covers.
    hf_class: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    # The config fields of the hidden and attention dropout rates (DistilBERT names them differently).
    dropout_fields: ClassVar[tuple[str, str]] = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    # Prefixes of checkpoint weights this family leaves out (RoBERTa's unused pooler).
    ignored_keys: ClassVar[tuple[str, ...]] = ()
    # The config field that counts the layer applications (DistilBERT names it differently).
    depth_field: ClassVar[str] = "num_hidden_layers"

    config: object

    # ------------------------------------------------------------------ the interface
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def pooler_dense(self) -> nn.Linear | None:
        return None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def hidden_dropout(self) -> float:
        return float(getattr(self.config, self.dropout_fields[0]))

    @staticmethod
    def attention_bias(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, seq) 1/0 padding mask -> boolean (batch, 1, 1, seq) SDPA mask, True = attend."""
        if attention_mask is None:
            return None
        return attention_mask.bool()[:, None, None, :]

    def init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation (normal with the config's ``initializer_range``, LayerNorm 1/0),
        which every family here shares; also used for the heads put on top."""
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

    def keep_layers(self, k: int) -> None:
        """Keep the first ``k`` layer applications and drop the rest, weights included.

        Static depth: a model cut to ``k`` layers *before* fine-tuning is the baseline every
        early-exit speed-up must beat (and a product for a user who wants one fixed speed).
        The config is updated too, so ``save_pretrained`` writes a ``k``-layer checkpoint that
        ``transformers`` and rbert load as such.
        """
        if not 1 <= k <= self.num_layers:
            raise ValueError(f"cannot keep {k} layers of a {self.num_layers}-layer encoder (1..{self.num_layers})")
        del self.layers[k:]  # a ModuleList (its parameters go too) or ALBERT's list of applications
        setattr(self.config, self.depth_field, k)

    # ------------------------------------------------------------------ forward, from the interface
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                num_layers: int | None = None) -> EncoderOutput:
        """Run the embeddings and the first ``num_layers`` layer applications (all by default)."""
        bias = self.attention_bias(attention_mask)
        hidden = self.embed(input_ids, token_type_ids)
        states = [hidden] if output_hidden_states else None
        # islice, not layers[:n]: slicing a ModuleList builds a new module (~15 us, a cost at batch size 1)
        for layer in islice(self.layers, num_layers or self.num_layers):
            hidden = layer(hidden, bias)
            if states is not None:
                states.append(hidden)
        return EncoderOutput(hidden, tuple(states) if states is not None else None)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hf_kwargs) -> Encoder:
        """Load this family's Hugging Face checkpoint (hub id or folder) by parameter name."""
        import transformers

        return load_by_name(getattr(transformers, cls.hf_class), name_or_path, cls, cls.model_types,
                            cls.ignored_keys, **hf_kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` readable by ``transformers.AutoModel``."""
        write_hf_folder(folder, self.config, self.hf_class, dict(self.state_dict()))


def load_by_name(hf_class, name_or_path: str | os.PathLike, build, model_types: Sequence[str],
                 ignored_keys: Sequence[str] = (), **hf_kwargs) -> nn.Module:
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
    if hf.config.model_type not in model_types:
        raise ValueError(f"{name_or_path}: model_type {hf.config.model_type!r} is not one of {list(model_types)}")
    model = build(hf.config)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith(tuple(ignored_keys))}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{name_or_path}: weights do not load by name: {str(err).splitlines()[0]}") from err
    return model


def key_groups(keys) -> set[str]:
    """Parameter names shortened to their module prefix (``cls.predictions.*``) for a log line."""
    return {".".join(k.split(".")[:2]) + ".*" if k.count(".") > 1 else k for k in keys}


def write_hf_folder(folder: str | os.PathLike, config, architecture: str, tensors: dict[str, torch.Tensor]) -> None:
    """``config.json`` + ``model.safetensors`` in the Hugging Face layout.

    Each file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written file under the final name.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict.update(architectures=[architecture])
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
    write("config.json", lambda p: type(config).from_dict(config_dict).to_json_file(p))
