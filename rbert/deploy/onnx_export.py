"""ONNX graphs of a multi-exit model, cut where the runtime may drop samples.

One graph per consulted exit: the layers since the previous consulted exit and that exit's
head, ``(hidden, attention_mask) -> (hidden, logits)``; the first graph starts from the
tokens, ``(input_ids[, token_type_ids], attention_mask) -> (hidden, logits)``, with the
embeddings inside (a graph of its own would cost every sample one more session call, which
at batch size 1 is a tenth of a layer's time). Between two graphs the runtime has the hidden
states in hand, so it can answer the samples that leave and run the next graph on the
others only, as the PyTorch engine does between layers. Batch and sequence axes are
dynamic. Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), opset
:data:`OPSET`.

A tagger also gets token-level early exit's graphs (:func:`export_halted`): one per layer
after the first consulted exit, ``(hidden, cols) -> hidden_out[, logits]``, which computes
the layer for the columns ``cols`` of one sentence (keys and values for all of its tokens:
:func:`rbert.models.halting.halted_step`), so that a word that left costs that layer nothing.

The graphs are built from the encoder interface (``embed``, ``attention_bias``,
``layers``), so every backbone family exports the same way; ALBERT's shared layer is
exported once per application.
"""

from __future__ import annotations

import logging
import warnings
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from rbert.models.classifier import pool
from rbert.models.halting import ActiveTokens, halted_step
from rbert.models.multi_exit import MultiExitBert
from rbert.models.token_heads import MultiExitTokenBert

OPSET = 18
EXPORTER = f"torch.onnx.export(dynamo=True), opset {OPSET}, torch {torch.__version__.split('+')[0]}"


class Segment(nn.Module):
    """Layers ``first..exit`` (1-based) and the exit after layer ``exit``."""

    def __init__(self, net: MultiExitBert, first: int, exit: int):
        super().__init__()
        self.bert, self.first, self.exit = net.bert, first, exit
        self.head = net.exits[net.exit_layers.index(exit)]
        self.tokens = isinstance(net, MultiExitTokenBert)  # a tagger's exit: logits for every token
        self.shared_dense = None if self.tokens else net.shared_dense
        self.pooling = None if self.tokens else net.pooling

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.bert.attention_bias(attention_mask)
        for layer in islice(self.bert.layers, self.first - 1, self.exit):
            hidden = layer(hidden, bias)
        if self.tokens:
            return hidden, self.head(hidden)
        return hidden, self.head(pool(hidden, attention_mask, self.pooling), self.shared_dense)


class FirstSegment(Segment):
    """The embeddings, then layers ``1..exit`` and that exit."""

    def __init__(self, net: MultiExitBert, exit: int):
        super().__init__(net, 1, exit)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(self.bert.embed(input_ids, token_type_ids), attention_mask)


class HaltedLayer(nn.Module):
    """Layer ``layer`` (1-based) of one sentence for its running tokens ``cols`` (ascending), and
    the exit after it, if that exit is consulted (logits for every token: a few multiply-adds
    a token, so the runtime needs no second graph to read the words it asks about)."""

    def __init__(self, net: MultiExitTokenBert, layer: int, exit: bool):
        super().__init__()
        self.layer = next(islice(net.bert.layers, layer - 1, layer))
        self.head = net.exits[net.exit_layers.index(layer)] if exit else None

    def forward(self, hidden: torch.Tensor, cols: torch.Tensor):
        hidden = halted_step(self.layer, hidden, ActiveTokens.of_row(cols), None)
        return hidden if self.head is None else (hidden, self.head(hidden))


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            shapes: tuple | None = None) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = shapes or tuple({0: batch, 1: seq} for _ in args)
    # The exporter reports each pass on stdout and warns about optional operator sets
    # (torchvision's), and onnx_ir logs each pass; an export that fails still raises.
    for name in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, verbose=False,
                          external_data=False)


def _export_segment(net: MultiExitBert, first: int, exit: int, path: Path) -> None:
    # Example inputs of batch 2, sequence 8: neither 0 nor 1, which torch.export would specialise.
    ids = torch.full((2, 8), 5, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    if first == 1:
        _export(FirstSegment(net, exit), (ids, types, mask), path, ["input_ids", "token_type_ids", "attention_mask"],
                ["hidden_out", "logits"])
    else:
        _export(Segment(net, first, exit), (net.bert.embed(ids, types), mask), path, ["hidden", "attention_mask"],
                ["hidden_out", "logits"])


@torch.no_grad()
def export_full_depth(net: MultiExitBert, path: Path) -> None:
    """One graph of the embeddings, every layer and the final exit: what a model without early
    exit would ship; the plain full-depth baseline of ``bench/deploy_speed.py``."""
    _export_segment(net.eval(), 1, net.exit_layers[-1], path)


@torch.no_grad()
def export_onnx(net: MultiExitBert, consulted: list[int], folder: Path, policy: dict | None = None) -> dict:
    """Write ``onnx/exit_<layer>.onnx`` for each consulted exit into ``folder``; returns the
    ``onnx`` section of the folder's config.

    With the exported ``policy`` (as config.json stores it) and a rule that compiles, also
    ``onnx/fused.onnx``, the composed batch-size-1 graph of :mod:`rbert.deploy.onnx_fused`:
    built here, the runtime needs no ``onnx`` package (2.4 s of imports) to start. It holds a
    second copy of the weights.
    """
    net = net.eval()
    (folder / "onnx").mkdir(parents=True, exist_ok=True)
    segments, first = [], 1
    for layer in consulted:
        name = f"onnx/exit_{layer}.onnx"
        _export_segment(net, first, layer, folder / name)
        segments.append({"file": name, "first": first, "exit": layer})
        first = layer + 1
    section = {"opset": OPSET, "exporter": EXPORTER, "segments": segments}
    if isinstance(net, MultiExitTokenBert):
        section["halted"] = export_halted(net, consulted, folder)
    if policy is not None:
        write_fused(folder, section, policy, net.exits[0].classifier.out_features)
    return section


@torch.no_grad()
def export_halted(net: MultiExitTokenBert, consulted: list[int], folder: Path) -> list[dict]:
    """``onnx/halted_<layer>.onnx`` for each layer after the first consulted exit (the layers
    up to it run every token, in the first segment's graph); returns their entries for the
    ``onnx`` section. They hold a second copy of those layers' weights."""
    hidden = torch.randn(1, 8, net.bert.hidden_size)
    cols = torch.tensor([1, 2, 4, 6, 7])  # neither 0 nor 1 long, nor as long as the sentence: kept symbolic
    shapes = ({1: torch.export.Dim("seq")}, {0: torch.export.Dim("active")})
    entries = []
    for layer in range(consulted[0] + 1, consulted[-1] + 1):
        name, exit = f"onnx/halted_{layer}.onnx", layer in consulted
        _export(HaltedLayer(net, layer, exit).eval(), (hidden, cols), folder / name, ["hidden", "cols"],
                ["hidden_out", "logits"] if exit else ["hidden_out"], shapes)
        entries.append({"file": name, "layer": layer, "exit": exit})
    return entries


def write_fused(folder: Path, section: dict, policy: dict, num_labels: int) -> None:
    """``onnx/fused.onnx`` from the section's segment graphs for ``policy`` (as config.json
    stores it), recorded in ``section``; nothing where the rule does not compile or there is
    one graph only."""
    import onnx

    from rbert.deploy.onnx_fused import compiles, fuse
    from rbert.inference.policies import policy_from_dict

    section.pop("fused", None)
    rule, segments = policy_from_dict(policy), section["segments"]
    if compiles(rule) and len(segments) > 1:
        graph = fuse([folder / s["file"] for s in segments], [s["exit"] for s in segments], rule, num_labels)
        onnx.save(graph, str(folder / "onnx" / "fused.onnx"))
        section["fused"] = {"file": "onnx/fused.onnx", "policy": dict(policy)}
