"""One ONNX graph for one sample: every exit's graph nested in ``If`` nodes, the policy inside.

At batch size 1 the segment-by-segment runtime pays, per consulted exit, a session call and
the wake-up of that session's sleeping threads: about a fifth of a MiniLM layer at SST-2's
~25 tokens (docs/benchmarks.md, section 11.2). This module composes the exported graphs of a
folder, unchanged, into one graph: exit k's graph, then the policy's rule on its logits as a
few ONNX operators, then ``If`` (leave: answer exit k's logits and k; else: exit k+1's graph,
and so on). One session call a sample, one thread pool awake for all of it.

Only rules that need no state across samples compile: the built-in entropy, confidence,
fixed and none policies (in float64, as in :mod:`rbert.inference.policies`). Anything else
(patience, a subclass, a policy of the user's) runs segment by segment, where the policy
object itself decides. ``mode=export`` writes the composed graph of the exported policy
(``onnx/fused.onnx``); the runtime composes another policy's in memory when it loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from rbert.inference.policies import ConfidenceExit, EntropyExit, ExitPolicy, FixedExit, NoExit


def compiles(policy: ExitPolicy) -> bool:
    """Whether :func:`fuse` can write ``policy``'s rule into the graph (its exact class only:
    a subclass may decide otherwise)."""
    return type(policy) in (EntropyExit, ConfidenceExit, FixedExit, NoExit)


def _rule(policy: ExitPolicy, logits: str, layer: int, num_labels: int, p: str) -> tuple[list, list, str]:
    """(nodes, initialisers, name of a one-element bool): whether the sample leaves at ``layer``."""
    leave = f"{p}leave"
    if isinstance(policy, (FixedExit, NoExit)):
        value = isinstance(policy, FixedExit) and layer >= policy.layer
        return [], [numpy_helper.from_array(np.array([value]), leave)], leave
    nodes = [helper.make_node("Cast", [logits], [f"{p}z"], to=TensorProto.DOUBLE)]
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}axes")
    if isinstance(policy, EntropyExit):  # H = -sum p log p, from log-softmax as entropy() does
        limit = numpy_helper.from_array(np.array(policy.limit(num_labels), dtype=np.float64), f"{p}limit")
        nodes += [helper.make_node("LogSoftmax", [f"{p}z"], [f"{p}logp"], axis=-1),
                  helper.make_node("Exp", [f"{p}logp"], [f"{p}prob"]),
                  helper.make_node("Mul", [f"{p}prob", f"{p}logp"], [f"{p}plogp"]),
                  helper.make_node("ReduceSum", [f"{p}plogp", f"{p}axes"], [f"{p}negh"], keepdims=0),
                  helper.make_node("Neg", [f"{p}negh"], [f"{p}h"]),
                  helper.make_node("Less", [f"{p}h", f"{p}limit"], [leave])]
    else:  # confidence: the top class probability reaches the threshold
        limit = numpy_helper.from_array(np.array(policy.threshold, dtype=np.float64), f"{p}limit")
        nodes += [helper.make_node("Softmax", [f"{p}z"], [f"{p}prob"], axis=-1),
                  helper.make_node("ReduceMax", [f"{p}prob", f"{p}axes"], [f"{p}top"], keepdims=0),
                  helper.make_node("GreaterOrEqual", [f"{p}top", f"{p}limit"], [leave])]
    return nodes, [axes, limit], leave


def _outputs(logits: str, layer: str) -> list:
    return [helper.make_tensor_value_info(logits, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(layer, TensorProto.INT64, None)]


def _layer(name: str, layer: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array([layer], np.int64)))


def _answer(logits: str, layer: int, p: str) -> onnx.GraphProto:
    """An ``If`` branch that answers exit ``layer``: its logits and its layer number."""
    return helper.make_graph([helper.make_node("Identity", [logits], [f"{p}logits"]), _layer(f"{p}layer", layer)],
                             f"{p}answer", [], _outputs(f"{p}logits", f"{p}layer"))


def fuse(files: Sequence[Path], exits: Sequence[int], policy: ExitPolicy, num_labels: int) -> onnx.ModelProto:
    """The graphs ``files`` (the folder's, in order; the first from the tokens, each next from
    the previous one's ``hidden_out``) as one graph ``(tokens..., attention_mask) -> (logits
    (1, labels), exit_layer (1,))`` that leaves where ``policy`` says; the last exit always
    answers. For one sample: the rule reads the batch's only row."""
    if not compiles(policy):
        raise ValueError(f"policy {policy.describe()} cannot be compiled into a graph")
    graphs = []
    for k, path in enumerate(files):
        model = onnx.load(str(path))
        if model.functions:  # torch.onnx's optimiser inlines them; a hand-made graph may not
            raise ValueError(f"{path}: holds local functions, which fuse() does not carry over")
        if k == 0:
            head = model  # its inputs, opsets and IR version are the composed graph's
            inputs = list(model.graph.input)
        graph = compose.add_prefix(model, f"s{k}/").graph
        renames = {f"s{k}/attention_mask": "attention_mask"}
        if k == 0:
            renames |= {f"s0/{i.name}": i.name for i in inputs}
        else:
            renames[f"s{k}/hidden"] = f"s{k - 1}/hidden_out"
        for node in graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
        graphs.append((list(graph.node), list(graph.initializer), f"s{k}/logits"))
    if not graphs:
        raise ValueError("no graphs to fuse")

    def body(k: int) -> tuple[list, list, str, str]:
        """Nodes and initialisers of exit k's graph and what follows it at its level (each
        graph's weights live in the branch that runs it); names of their (logits, layer)."""
        nodes, weights, logits = graphs[k]
        p = f"e{k}/"
        if k == len(graphs) - 1:
            return nodes + [_layer(f"{p}layer", exits[k])], weights, logits, f"{p}layer"
        rule, consts, leave = _rule(policy, logits, exits[k], num_labels, p)
        rest, rest_weights, rest_logits, rest_layer = body(k + 1)
        stay = helper.make_graph(rest, f"{p}stay", [], _outputs(rest_logits, rest_layer), initializer=rest_weights)
        branch = helper.make_node("If", [leave], [f"{p}logits", f"{p}layer"],
                                  then_branch=_answer(logits, exits[k], f"{p}then/"), else_branch=stay)
        return nodes + rule + [branch], weights + consts, f"{p}logits", f"{p}layer"

    nodes, initializers, logits, layer = body(0)
    graph = helper.make_graph(
        nodes + [helper.make_node("Identity", [logits], ["logits"]),
                 helper.make_node("Identity", [layer], ["exit_layer"])],
        "rbert_fused_early_exit", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_labels]),
         helper.make_tensor_value_info("exit_layer", TensorProto.INT64, [1])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=list(head.opset_import))
    model.ir_version = head.ir_version
    return model

