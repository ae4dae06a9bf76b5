"""Early exit on onnxruntime: the exported graphs, run segment by segment.

:class:`OnnxEarlyExitModel` runs one exit's graph after another (the first starts from the
tokens); after each it applies the *same policy objects* as the PyTorch engine
(:mod:`rbert.inference.policies`), answers the samples that leave, drops their rows and
the padding no remaining row needs, and runs the next graph on the rest. At batch size 1,
when the policy's rule compiles to ONNX operators (entropy, confidence, fixed, none), the
same graphs run instead as one composed graph with the rule inside
(:mod:`rbert.deploy.onnx_fused`): one session call a sample instead of one an exit. The
folder holds that graph for the exported policy; another policy's is composed when the
runtime loads (with the ``onnx`` package, where it is installed).

A tagger with token-level exit (TOKEE) runs sentence by sentence: the first segment's graph
(every token, up to the first consulted exit), then one graph per layer over the columns
still running (:func:`rbert.deploy.onnx_export.export_halted`), the words walked as the
PyTorch engine's batch-size-1 path walks them (:class:`rbert.inference.word_exits.WordExits`).

The graphs run in onnxruntime (the CPU provider by default; any provider by option). The
policies decide on Python floats at batch size 1 (``decide_one``) and on the graphs' NumPy
logits batched, and the tokenizer is the folder's ``tokenizer.json`` in ``tokenizers``
(:mod:`rbert.deploy.tokenizer`): this module imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rbert.deploy.folder import DeploySpec, FolderError, read_spec
from rbert.deploy.predictor import Predictor, folder_policy
from rbert.deploy.tokenizer import FolderTokenizer
from rbert.inference.policies import POLICIES, ExitPolicy, policy_to_dict, take_rows
from rbert.inference.word_exits import WordExits, normalised_entropy


class OnnxEarlyExitModel(Predictor):
    # Each graph is its own session with its own thread pool (the Python API can share one
    # only process-wide, which then forbids every other session in the process its own pool).
    # By default a pool's threads spin for a while after a run, so the pools of the graphs
    # just run steal the cores from the one running now: at batch size 1 on 2 cores full depth
    # ran 5-6x slower. Never spinning makes every operator wait for a sleeping thread (a layer
    # 1.3x slower). So the threads spin during a run and stop when it ends
    # (docs/benchmarks.md, section 11.2).
    SESSION_CONFIG = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}

    def __init__(self, folder: str | os.PathLike, spec: DeploySpec, tokenizer, policy: ExitPolicy,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None,
                 session_config: dict[str, str] | None = None, fused: bool = True):
        """``session_config``: onnxruntime session config entries instead of
        :attr:`SESSION_CONFIG` (``{}``: onnxruntime's defaults). ``fused``: at batch size 1,
        run the composed graph when the policy compiles (it holds a second copy of the
        weights); ``False``: segment by segment at every batch size."""
        import onnxruntime as ort

        self.spec, self.tokenizer, self.policy = spec, tokenizer, policy
        if self.token_level and spec.onnx.get("segments") and spec.onnx.get("halted") is None:
            raise FolderError(f"{folder}: policy {policy.describe()} (token-level early exit) needs the per-layer "
                              "graphs of a newer export (mode=export again), or the PyTorch runtime "
                              "(rbert-serve --runtime torch)")
        policy.check(spec.num_labels, len(spec.consulted_exits))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (self.SESSION_CONFIG if session_config is None else session_config).items():
            options.add_session_config_entry(key, value)
        folder = Path(folder)

        def session(name: str, graph: bytes | None = None):
            path = folder / name
            if graph is None and not path.is_file():
                raise FolderError(f"{folder}: {name} is missing (export with ONNX: mode=export export.onnx=true)")
            try:
                return ort.InferenceSession(graph or str(path), options, providers=list(providers))
            except Exception as err:  # onnxruntime raises its own types for unreadable graphs
                raise FolderError(f"{path}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from err

        onnx = spec.onnx  # read_spec checked its files and layer ranges
        if not onnx.get("segments"):
            raise FolderError(f"{folder / 'config.json'}: rbert_early_exit.onnx lists no graphs "
                              "(exported without ONNX)")
        # The graphs to run: one per exit the policy consults. Full depth (NoExit) runs every
        # graph, since each holds its layers; only the last one's answer counts.
        self.segments = [(s.exit, session(s.file)) for s in spec.segments]
        # token-level exit's per-layer graphs: (layer, whether its exit is consulted, session)
        self.halted = [(h["layer"], h["exit"], session(h["file"])) for h in onnx.get("halted", [])
                       ] if self.token_level else []
        # The token inputs of the first graph (the exporter drops the ones a family ignores).
        self.token_inputs = [i.name for i in self.segments[0][1].get_inputs() if i.name != "attention_mask"]
        self.last = spec.consulted_exits[-1]
        for s, (_, graph) in zip(spec.segments, self.segments):
            width = graph.get_outputs()[1].shape[-1]
            if isinstance(width, int) and width != spec.num_labels:
                raise FolderError(f"{folder / s.file}: answers {width} logits; config.json has "
                                  f"{spec.num_labels} labels")
        self.fused = None  # the composed graph for batch size 1, where the policy compiles
        if fused and len(self.segments) > 1 and not spec.tagging:
            stored = onnx.get("fused")
            if stored and type(policy) is POLICIES.get(policy.name) and policy_to_dict(policy) == stored["policy"]:
                self.fused = session(stored["file"])  # the exported policy: composed at export
            else:
                graph = self._compose(folder, spec, policy)
                self.fused = graph and session(spec.segments[0].file, graph)

    @staticmethod
    def _compose(folder: Path, spec: DeploySpec, policy: ExitPolicy) -> bytes | None:
        """The composed graph for a policy other than the exported one, built now (needs the
        ``onnx`` package); None where the policy does not compile or ``onnx`` is missing."""
        try:
            from rbert.deploy.onnx_fused import compiles, fuse
        except ImportError:
            if policy.name in ("entropy", "confidence", "fixed"):
                warnings.warn(f"{folder}: batch size 1 runs segment by segment: composing one graph for "
                              f"{policy.describe()} needs the onnx package", stacklevel=3)
            return None
        if not compiles(policy):
            return None
        try:
            graph = fuse([folder / s.file for s in spec.segments], [s.exit for s in spec.segments], policy,
                         spec.num_labels)
        except ValueError as err:  # the graphs still run one by one
            warnings.warn(f"{folder}: batch size 1 runs segment by segment: {err}", stacklevel=3)
            return None
        return graph.SerializeToString()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, policy: ExitPolicy | dict | None = None,
                        providers: Sequence[str] = ("CPUExecutionProvider",),
                        threads: int | None = None, session_config: dict[str, str] | None = None,
                        fused: bool = True) -> OnnxEarlyExitModel:
        spec = read_spec(folder)
        return cls(folder, spec, FolderTokenizer.from_folder(folder), folder_policy(spec, policy, str(folder)),
                   providers, threads, session_config, fused)

    def run(self, input_ids, attention_mask, token_type_ids=None, words=None, owner=None):
        if token_type_ids is None:
            token_type_ids = np.zeros_like(input_ids)
        tokens = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        feeds = {name: tokens[name] for name in self.token_inputs}
        if self.token_level:
            if owner is None:
                raise ValueError("owner: token-level exit needs each token's word (its first piece's column)")
            return self._tokens(feeds, attention_mask, owner)
        if self.spec.tagging:
            if words is None:
                raise ValueError("words: a tagger's early exit needs the mask of the words' first pieces")
            return self._sentences(feeds, attention_mask, words.astype(bool))
        if input_ids.shape[0] == 1:
            return self._one(feeds, attention_mask)
        return self._batch(feeds, attention_mask)

    def _one(self, feeds: dict[str, np.ndarray], mask: np.ndarray):
        if self.fused is not None:
            logits, layer = self.fused.run(None, {**feeds, "attention_mask": mask})
            return logits, layer
        state = self.policy.start_one()
        for layer, session in self.segments:
            hidden, logits = session.run(None, {**feeds, "attention_mask": mask})
            feeds = {"hidden": hidden}
            if layer == self.last:
                break
            leave, state = self.policy.decide_one(logits[0].tolist(), layer, state)
            if leave:
                break
        return logits, np.array([layer], dtype=np.int64)

    def _sentences(self, feeds: dict[str, np.ndarray], mask: np.ndarray, words: np.ndarray):
        """SENTEE, as the PyTorch engine does it: a sentence leaves whole when the policy's
        ``decide_words`` trusts all its words; it answers with every token's logits there."""
        batch, width = mask.shape
        state = self.policy.start(batch)
        rows = np.arange(batch)
        out = exit_layer = None
        for layer, session in self.segments:
            hidden, logits = session.run(None, {**feeds, "attention_mask": mask})
            feeds = {"hidden": hidden}
            if out is None:
                out = np.zeros((batch, width, logits.shape[-1]), dtype=np.float32)
                exit_layer = np.zeros(batch, dtype=np.int64)
            if layer == self.last:
                leave = np.ones(len(rows), dtype=bool)
            else:
                leave, state = self.policy.decide_words(logits, words, layer, state)
            if not leave.any():
                continue
            out[rows[leave], :logits.shape[1]], exit_layer[rows[leave]] = logits[leave], layer
            if leave.all():
                break
            keep = ~leave
            state = take_rows(state, keep)
            rows, mask, words = rows[keep], mask[keep], words[keep]
            length = int(mask.sum(axis=1).max())
            feeds["hidden"] = np.ascontiguousarray(hidden[keep, :length])
            mask, words = np.ascontiguousarray(mask[:, :length]), words[:, :length]
        return out, exit_layer

    def _tokens(self, feeds: dict[str, np.ndarray], mask: np.ndarray, owner: np.ndarray):
        """TOKEE, one sentence at a time (a layer's graph takes one sentence's running columns):
        logits at each word's first piece from the exit it left at, and each token's exit layer."""
        batch, width = mask.shape
        first, session = self.segments[0]
        out = exit_layer = None
        for r in range(batch):
            length = int(mask[r].sum())
            walk = WordExits(owner[r, :length], self.policy)
            row = {name: np.ascontiguousarray(v[r:r + 1, :length]) for name, v in feeds.items()}
            hidden, logits = session.run(None, {**row, "attention_mask": np.ones((1, length), dtype=mask.dtype)})
            if out is None:
                out = np.zeros((batch, width, logits.shape[-1]), dtype=np.float32)
                exit_layer = np.zeros((batch, width), dtype=np.int64)
            exit_layer[r, :length] = first
            layer, index, graphs = first, 0, iter(self.halted)
            while True:
                if logits is not None:  # a consulted exit: the live words' turn
                    live = walk.live()
                    if not len(live):
                        break
                    z = logits[0, walk.first_col[live]]
                    leave = walk.leave(live, normalised_entropy(z), index, layer == self.last)
                    out[r, walk.first_col[live[leave]]] = z[leave]
                    index += 1
                    if walk.finished:
                        break
                layer, has_exit, graph = next(graphs)
                cols = np.flatnonzero(walk.running).astype(np.int64)
                answer = graph.run(None, {"hidden": hidden, "cols": cols})
                hidden, logits = answer[0], answer[1] if has_exit else None
                exit_layer[r, :length][walk.running] = layer
        return out, exit_layer

    def _batch(self, feeds: dict[str, np.ndarray], mask: np.ndarray):
        batch = mask.shape[0]
        state = self.policy.start(batch)
        rows = np.arange(batch)
        out = exit_layer = None
        for layer, session in self.segments:
            hidden, logits = session.run(None, {**feeds, "attention_mask": mask})
            feeds = {"hidden": hidden}
            if out is None:
                out = np.empty((batch, logits.shape[-1]), dtype=np.float32)
                exit_layer = np.zeros(batch, dtype=np.int64)
            if layer == self.last:
                out[rows], exit_layer[rows] = logits, layer
                break
            leave, state = self.policy.decide(logits, layer, state)
            if not leave.any():
                continue
            out[rows[leave]], exit_layer[rows[leave]] = logits[leave], layer
            if leave.all():
                break
            keep = ~leave
            state = take_rows(state, keep)
            rows, mask = rows[keep], mask[keep]
            length = int(mask.sum(axis=1).max())  # padding is on the right: cut what no row needs
            feeds["hidden"] = np.ascontiguousarray(hidden[keep, :length])
            mask = np.ascontiguousarray(mask[:, :length])
        return out, exit_layer
