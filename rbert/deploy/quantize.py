"""int8 graphs for an exported folder, with onnxruntime's own quantisation tools.

``mode=export export_quantize=int8`` runs :func:`quantize_graphs` on the freshly exported
fp32 graphs: dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``), i.e.
weights stored as int8 once, activations quantised per batch at run time, so nothing needs
calibrating and any input length works. What it quantises:

* every ``MatMul`` with a constant weight (the attention projections, the feed-forward
  layers, the exits' poolers and classifiers): int8 weights with a scale per output column
  (``per_channel``), ``MatMulInteger`` at run time. One scale per tensor cost MiniLM's SST-2
  exits up to 2.4 dev points (two of three seeds), none of it visible on the selection split
  the export re-measures on; per column every exit stayed within 0.6 (docs/benchmarks.md, 11.7);
* ``Gather`` of the word, position and token-type embedding tables: the tables are stored
  int8 (a quarter of their fp32 size; for MiniLM 47 of the model's 90 MB) and each looked-up
  row is dequantised to fp32, so the embedding *values* carry the rounding, not the compute.

LayerNorm, softmax, GELU and the residual adds stay fp32. Static quantisation (activation
ranges calibrated once on training rows) was measured and is not offered: on an AVX2 CPU it
ran slower than dynamic and cost the last exits 1.4-2.3 dev points (docs/benchmarks.md,
11.9). The export then re-measures each
exit on the int8 graphs (:func:`graph_exit_logits`) and re-picks a ``budget`` threshold on
them (rbert/export.py), and the folder records what was done (``onnx.quantization``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

QUANTIZED_OPS = ["MatMul", "Gather"]


def quantize_graphs(folder: Path, onnx_section: dict) -> dict:
    """Quantise every graph of ``onnx_section`` in place: the segments and, for a tagger, the
    token-level exit's per-layer graphs (the composed graph is dropped: the caller composes it
    again from the int8 segments); returns the section's ``quantization`` record."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # the quantiser logs a line per tensor on the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # and a warning that suggests pre-processing each time
    try:
        for graph in [*onnx_section["segments"], *onnx_section.get("halted", [])]:
            path = folder / graph["file"]
            fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
            os.close(fd)
            try:
                quantize_dynamic(path, tmp, op_types_to_quantize=QUANTIZED_OPS, weight_type=QuantType.QInt8,
                                 per_channel=True)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
    finally:
        root.setLevel(level)
    fused = onnx_section.pop("fused", None)
    if fused:
        (folder / fused["file"]).unlink(missing_ok=True)
    return {"method": "dynamic", "weights": "int8, a scale per output column", "ops": list(QUANTIZED_OPS),
            "tool": f"onnxruntime.quantization.quantize_dynamic (onnxruntime {onnxruntime.__version__})",
            "embeddings": "int8 tables, rows dequantised to fp32 after the lookup",
            "torch_runtime": "fp32 (model.safetensors is not quantised)"}


def graph_exit_logits(folder: Path, onnx_section: dict, batches) -> list[np.ndarray]:
    """Every segment's exit logits over ``batches`` (dicts of int64 arrays ``input_ids``,
    ``attention_mask``, ``token_type_ids``): each graph runs on every row (full depth), as
    ``exit_logits`` does for the PyTorch model, so a threshold sweep can run on them. A tagger's
    token logits are padded along the token axis to the longest batch, as ``exit_logits`` pads them."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(folder / s["file"]), providers=["CPUExecutionProvider"])
                for s in onnx_section["segments"]]
    first = [i.name for i in sessions[0].get_inputs()]
    out: list[list[np.ndarray]] = [[] for _ in sessions]
    for batch in batches:
        feeds = {name: batch[name] for name in first}
        for k, session in enumerate(sessions):
            hidden, logits = session.run(None, feeds)
            out[k].append(logits)
            feeds = {"hidden": hidden, "attention_mask": batch["attention_mask"]}
    if out[0][0].ndim == 3:
        width = max(z.shape[1] for z in out[0])
        out = [[np.pad(z, ((0, 0), (0, width - z.shape[1]), (0, 0))) for z in parts] for parts in out]
    return [np.concatenate(parts) for parts in out]
