"""The exported folder in ``transformers``: copied into every folder as ``modeling_rbert.py``.

The Hub's convention for an architecture ``transformers`` does not ship: ``config.json`` names
a ``model_type`` of its own and an ``auto_map`` into this file, so that

    pipeline("text-classification", model=folder, trust_remote_code=True)
    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    AutoModel.from_pretrained(folder, trust_remote_code=True)     # the backbone alone

run the model with its exits and its exit policy (or give the backbone), and without
``trust_remote_code`` the Auto classes refuse the folder instead of loading the backbone
under a freshly initialised classifier.

This file runs where rbert is not installed, so it imports only torch and transformers and
restates what it needs: the exit heads (pool, dense + tanh, linear) and the built-in exit
policies, rule for rule as ``rbert.inference.policies`` states them (rbert's tests check that
both answer alike). It computes every layer and then picks each row's exit: the answers of
rbert's runtimes, not their speed (``rbert.deploy.OnnxEarlyExitModel`` skips the layers).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class RbertEarlyExitConfig(PretrainedConfig):
    """``backbone``: the backbone family's own config (with its ``model_type``); ``heads``:
    where each exit's pooler lives; ``rbert_early_exit``: exits, pooling, policy (rbert's folder spec)."""

    model_type = "rbert_early_exit"

    def __init__(self, backbone: dict | None = None, heads: dict | None = None, **kwargs):
        self.backbone = backbone or {}
        self.heads = heads or {}
        super().__init__(**kwargs)

    def backbone_config(self) -> PretrainedConfig:
        fields = dict(self.backbone)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _backbone(config: RbertEarlyExitConfig) -> nn.Module:
    backbone = config.backbone_config()
    if config.heads.get("shared_pooler", "").startswith("bert."):
        return AutoModel.from_config(backbone)  # the exits use the backbone's own pooler
    try:
        return AutoModel.from_config(backbone, add_pooling_layer=False)
    except TypeError:  # families without the option have no pooler
        return AutoModel.from_config(backbone)


class Pooler(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)


class ExitHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, own_pooler: bool):
        super().__init__()
        self.pooler = Pooler(hidden_size) if own_pooler else None
        self.classifier = nn.Linear(hidden_size, num_labels)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def leaves(policy: dict, logits: torch.Tensor, layer: int, state: tuple) -> tuple[torch.Tensor, tuple]:
    """rbert's built-in policies on a batch of one exit's logits: (leave here, new state)."""
    name, rows = policy["name"], logits.shape[0]
    if name == "none":
        return torch.zeros(rows, dtype=torch.bool), state
    if name == "fixed":
        return torch.full((rows,), layer >= policy["layer"], dtype=torch.bool), state
    if name == "entropy":
        limit = policy["threshold"] * (math.log(logits.shape[-1]) if policy.get("normalized", True) else 1.0)
        return entropy(logits) < limit, state
    if name == "confidence":
        return torch.softmax(logits.double(), -1).amax(-1) >= policy["threshold"], state
    if name == "patience":
        previous, count = state
        if logits.shape[-1] == 1:
            prediction = logits[:, 0].double()
            same = (prediction - previous).abs() < policy.get("tolerance", 0.1)
        else:
            prediction = logits.argmax(-1).double()
            same = prediction == previous
        count = torch.where(same, count + 1, torch.zeros_like(count))
        return count >= policy["patience"], (prediction, count)
    raise ValueError(f"policy {name!r} is not one of rbert's built-in policies")


class RbertPreTrainedModel(PreTrainedModel):
    config_class = RbertEarlyExitConfig
    base_model_prefix = "bert"

    def _init_weights(self, module):  # every weight comes from the folder
        pass


class RbertEarlyExitBackbone(RbertPreTrainedModel):
    """``AutoModel``: the backbone alone (the family's own model class inside), weights by name."""

    def __init__(self, config: RbertEarlyExitConfig):
        super().__init__(config)
        self.bert = _backbone(config)
        self.post_init()

    def forward(self, *args, **kwargs):
        return self.bert(*args, **kwargs)


class RbertEarlyExitForSequenceClassification(RbertPreTrainedModel):
    """Every exit's logits, then each row's answer from the first exit the folder's policy
    trusts among the consulted ones (the last answers the rest). ``exit_layer`` says where."""

    def __init__(self, config: RbertEarlyExitConfig):
        super().__init__(config)
        spec = config.rbert_early_exit
        self.bert = _backbone(config)
        hidden, labels = self.bert.config.hidden_size, max(len(spec["labels"]), 1)
        self.exits = nn.ModuleList(ExitHead(hidden, labels, own) for own in config.heads["exit_poolers"])
        self.pooler = Pooler(hidden) if config.heads["shared_pooler"] == "pooler.dense" else None
        self.post_init()

    def shared_dense(self) -> nn.Linear:
        where = self.config.heads["shared_pooler"]
        if where == "pooler.dense":
            return self.pooler.dense
        return self.bert.pooler.dense if where == "bert.pooler.dense" else self.bert.pooler

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        spec = self.config.rbert_early_exit
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in inspect.signature(self.bert.forward).parameters:
            inputs["token_type_ids"] = token_type_ids
        states = self.bert(**inputs, output_hidden_states=True).hidden_states
        mask = attention_mask.unsqueeze(-1).to(states[0].dtype)
        rows = input_ids.shape[0]
        out = exit_layer = None
        state = (torch.full((rows,), float("nan"), dtype=torch.float64), torch.zeros(rows, dtype=torch.long))
        done = torch.zeros(rows, dtype=torch.bool)
        for layer in spec["consulted_exits"]:
            head, hidden = self.exits[spec["exit_layers"].index(layer)], states[layer]
            pooled = hidden[:, 0] if spec["pooling"] == "cls" else (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            dense = head.pooler.dense if head.pooler is not None else self.shared_dense()
            logits = head.classifier(torch.tanh(dense(pooled)))
            if out is None:
                out, exit_layer = torch.empty_like(logits), torch.zeros(rows, dtype=torch.long)
            leave, state = leaves(spec["policy"], logits.detach().cpu(), layer, state)
            if layer == spec["consulted_exits"][-1]:
                leave = torch.ones_like(leave)
            new = leave & ~done
            out[new.to(out.device)], exit_layer[new] = logits[new.to(out.device)], layer
            done |= new
        output = SequenceClassifierOutput(logits=out)
        output["exit_layer"] = exit_layer
        return output
