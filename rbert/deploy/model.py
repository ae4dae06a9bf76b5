"""An exported early-exit model in PyTorch, without Hydra or Lightning.

    from rbert.deploy import EarlyExitModel
    model = EarlyExitModel.from_pretrained("exported/")
    model.predict(["a gripping, funny film", "dull"])
    # [{"label": "1", "probabilities": {"0": 0.03, "1": 0.97}, "exit_layer": 2}, ...]

:func:`save` writes such a folder from a multi-exit model (``mode=export`` calls it with a
fine-tuned checkpoint's model); the family comes back from config.json's ``model_type``
and the weights load strictly by name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rbert.deploy.folder import SECTION, DeploySpec, FolderError, read_config, read_spec, write_folder
from rbert.deploy.predictor import Predictor, folder_policy
from rbert.deploy.tokenizer import FolderTokenizer
from rbert.inference.engine import EarlyExit
from rbert.inference.policies import ExitPolicy
from rbert.models.encoder import write_hf_folder
from rbert.models.multi_exit import MultiExitBert
from rbert.models.token_heads import MultiExitTokenBert
from rbert.report import write_json

ARCHITECTURE = "RbertEarlyExitForSequenceClassification"
TAGGER = "RbertEarlyExitForTokenClassification"  # no transformers face yet: rbert's runtimes only
MODEL_TYPE = "rbert_early_exit"


def save(out: str | os.PathLike, net: MultiExitBert, tokenizer, spec: DeploySpec, onnx: bool = True,
         after_onnx: Callable[[Path, DeploySpec], None] | None = None) -> Path:
    """Write ``net`` (in eval mode), its tokenizer and ``spec`` as an exported folder, with the
    ONNX graphs of :mod:`rbert.deploy.onnx_export` unless ``onnx=False``; all or nothing.
    ``after_onnx(folder, spec)`` may rework the graphs and the spec before config.json is
    written (``export_quantize``)."""
    net = net.eval()

    def fill(folder: Path) -> None:
        if onnx:
            from rbert.deploy.onnx_export import export_onnx

            # A tagger's sentence-level rule looks at every word: no composed bs=1 graph for it.
            spec.onnx = export_onnx(net, spec.consulted_exits, folder, None if spec.tagging else spec.policy)
            if after_onnx is not None:
                after_onnx(folder, spec)
        write_hf_folder(folder, net.bert.config, TAGGER if spec.tagging else ARCHITECTURE, dict(net.state_dict()))
        write_json(folder / "config.json", folder_config(net, spec))  # the backbone's config, wrapped
        if not spec.tagging:
            shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), folder / "modeling_rbert.py")
        tokenizer.save_pretrained(folder)

    return write_folder(out, fill)


def heads(net: MultiExitBert) -> dict:
    """Where each exit's pooler lives, for the folder's ``transformers`` face (modeling_rbert.py)."""
    if net.pooler is not None:
        shared = "pooler.dense"
    else:  # the backbone's own: BERT's pooler.dense, ALBERT's pooler
        shared = next(name for name, p in net.named_parameters() if p is net.bert.pooler_dense.weight)[:-len(".weight")]
    return {"shared_pooler": shared, "exit_poolers": [head.pooler is not None for head in net.exits]}


def folder_config(net: MultiExitBert, spec: DeploySpec) -> dict:
    """config.json: a model type of its own with an ``auto_map`` into the folder's
    modeling_rbert.py (the Hub's convention for custom architectures, so that ``transformers``
    runs the exits with ``trust_remote_code`` and refuses the folder without it), the
    backbone's config under ``backbone``, the labels, and the ``rbert_early_exit`` section.
    A tagger's folder has no ``auto_map`` (rbert's runtimes run it; ``transformers`` refuses it)."""
    if spec.tagging:
        config = {"model_type": MODEL_TYPE, "architectures": [TAGGER], "backbone": net.bert.config.to_dict(),
                  SECTION: asdict(spec), "id2label": dict(enumerate(spec.labels)),
                  "label2id": {name: i for i, name in enumerate(spec.labels)}}
        config["id2label"] = {str(k): v for k, v in config["id2label"].items()}
        return config
    config = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
              "auto_map": {"AutoConfig": "modeling_rbert.RbertEarlyExitConfig",
                           "AutoModel": "modeling_rbert.RbertEarlyExitBackbone",
                           "AutoModelForSequenceClassification": f"modeling_rbert.{ARCHITECTURE}"},
              "backbone": net.bert.config.to_dict(), "heads": heads(net), SECTION: asdict(spec)}
    if not spec.regression:
        config["id2label"] = {str(i): name for i, name in enumerate(spec.labels)}
        config["label2id"] = {name: i for i, name in enumerate(spec.labels)}
    return config


def load_net(folder: str | os.PathLike, spec: DeploySpec) -> MultiExitBert:
    """The multi-exit model of an exported folder: its family from ``model_type``, weights by name."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from rbert.models.families import FAMILIES

    folder = Path(folder)
    backbone = dict(read_config(folder).get("backbone") or {})
    family = backbone.pop("model_type", None)
    if family not in FAMILIES:
        raise FolderError(f"{folder / 'config.json'}: backbone.model_type {family!r} is not one of {list(FAMILIES)}")
    try:
        config = AutoConfig.for_model(family, **backbone)
    except (TypeError, ValueError) as err:
        raise FolderError(f"{folder / 'config.json'}: backbone: {str(err).splitlines()[0]}") from err
    try:
        encoder = FAMILIES[config.model_type](config)
        if spec.tagging:
            net = MultiExitTokenBert(encoder, spec.num_labels, spec.exit_layers)
        else:
            net = MultiExitBert(encoder, spec.num_labels, spec.exit_layers, spec.style, spec.pooling)
    except ValueError as err:
        raise FolderError(f"{folder / 'config.json'}: {err}") from err
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FolderError(f"{folder}: no model.safetensors")
    try:
        net.load_state_dict(load_file(weights))
    except (RuntimeError, OSError) as err:  # OSError / SafetensorError: a truncated or foreign file
        raise FolderError(f"{weights}: weights do not fit config.json: {str(err).splitlines()[0]}") from err
    except Exception as err:  # safetensors' own error type for a corrupt header
        raise FolderError(f"{weights}: not a readable safetensors file: {err}") from err
    return net.eval()


class EarlyExitModel(Predictor):
    """The PyTorch early-exit engine (:class:`~rbert.inference.engine.EarlyExit`) on an exported folder."""

    def __init__(self, net: MultiExitBert, tokenizer, spec: DeploySpec, policy: ExitPolicy,
                 device: str | torch.device = "cpu"):
        self.net, self.tokenizer, self.spec, self.policy = net.to(device), tokenizer, spec, policy
        self.device = torch.device(device)
        policy.check(spec.num_labels, len(spec.consulted_exits))
        if self.token_level:  # TOKEE: each word leaves on its own, the engine skips its later work
            from rbert.inference.tokee import TokenEarlyExit

            self.engine = TokenEarlyExit(net, policy, self.consulted)
        else:
            self.engine = EarlyExit(net, policy, self.consulted)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, policy: ExitPolicy | dict | None = None,
                        device: str | torch.device = "cpu") -> EarlyExitModel:
        """Load an exported folder; ``policy`` replaces the exported one (e.g. ``NoExit()``: full depth)."""
        spec = read_spec(folder)
        net = load_net(folder, spec)
        return cls(net, FolderTokenizer.from_folder(folder), spec, folder_policy(spec, policy, str(folder)), device)

    def run(self, input_ids, attention_mask, token_type_ids=None, words=None, owner=None):
        def tensor(a):
            return None if a is None else torch.from_numpy(a).to(self.device)

        if self.token_level:
            result = self.engine(tensor(input_ids), tensor(attention_mask), tensor(token_type_ids), tensor(owner))
            return result.logits.float().cpu().numpy(), result.exit_layer.cpu().numpy().astype(np.int64)
        result = self.engine(tensor(input_ids), tensor(attention_mask), tensor(token_type_ids), tensor(words))
        return result.logits.float().cpu().numpy(), result.exit_layer.cpu().numpy().astype(np.int64)
