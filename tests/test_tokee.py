"""Token-level early exit: the engine that skips work answers what the masked computation answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rbert.inference.tokee import TokenEarlyExit, ceiling, first_piece_owner, row_ceiling
from rbert.inference.token_policies import WindowEntropyExit
from rbert.models import MultiExitTokenBert, load_encoder
from tests.backbone_files import FAMILIES, write_family


def batch(seed: int = 0, rows: int = 6, width: int = 16):
    """Rows of [CLS] pieces... [SEP] padding, with words of 1-3 pieces."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    words = torch.zeros(rows, width, dtype=torch.bool)
    pieces = torch.zeros_like(words)
    for r in range(rows):
        length = int(torch.randint(5, width + 1, (1,), generator=gen)) if r else width
        ids[r, :length] = torch.randint(1000, 2000, (length,), generator=gen)
        mask[r, :length] = 1
        pieces[r, 1:length - 1] = True
        col = 1
        while col < length - 1:
            words[r, col] = True
            col += int(torch.randint(1, 4, (1,), generator=gen))
    return ids, mask, first_piece_owner(words, pieces)


def tagger(folder, seed: int = 0) -> MultiExitTokenBert:
    """A tiny tagger whose exits grow surer with depth (median word entropy 0.7 down to 0.3), so
    that words leave at several layers."""
    torch.manual_seed(seed)
    net = MultiExitTokenBert(load_encoder(str(folder)), num_labels=5).eval()
    ids, mask, owner = batch()
    words = owner == torch.arange(ids.shape[1])
    with torch.no_grad():
        for head, z, target in zip(net.exits, net(ids, mask), np.linspace(0.7, 0.3, len(net.exits))):
            low, high = 1e-3, 1e4
            for _ in range(60):
                mid = (low * high) ** 0.5
                logp = torch.log_softmax(z[words] * mid, -1)
                h = float((-(logp.exp() * logp).sum(-1) / np.log(5)).median())
                low, high = (mid, high) if h > target else (low, mid)
            head.classifier.weight.mul_(low)
            head.classifier.bias.mul_(low)
    return net


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("threshold, window", [(0.4, 0), (0.6, 1), ([0.3, 0.5, 0.7], 2)])
def test_engine_equals_the_masked_computation(family, threshold, window, tmp_path):
    net = tagger(write_family(tmp_path, family))
    ids, mask, owner = batch()
    rule = WindowEntropyExit(threshold, window)
    fast = TokenEarlyExit(net, rule)(ids, mask, None, owner)
    slow = TokenEarlyExit(net, rule, masked=True)(ids, mask, None, owner)
    words = owner == torch.arange(ids.shape[1])
    assert torch.equal(fast.exit_layer, slow.exit_layer)
    assert torch.equal(fast.logits[words].argmax(-1), slow.logits[words].argmax(-1))
    assert (fast.logits - slow.logits).abs().max() < 1e-4
    assert fast.token_layers == slow.token_layers < fast.full_token_layers
    # keys and values: every token of the sentences still running
    assert fast.token_layers <= fast.kv_token_layers == slow.kv_token_layers <= fast.full_token_layers
    # pieces of a word leave with it; padding never runs
    pieces = owner >= 0
    assert torch.equal(fast.exit_layer[pieces], fast.exit_layer.gather(1, owner.clamp_min(0))[pieces])
    assert (fast.exit_layer[mask == 0] == 0).all()
    # each row on its own (batch size 1's lean path, with and without trailing padding) answers the same
    counted = kv = 0
    for r in range(len(ids)):
        n = int(mask[r].sum())
        alone = TokenEarlyExit(net, rule)(ids[r:r + 1, :n], mask[r:r + 1, :n], None, owner[r:r + 1, :n])
        assert torch.equal(alone.exit_layer[0], fast.exit_layer[r, :n])
        assert (alone.logits[0] - fast.logits[r, :n]).abs().max() < 1e-4
        padded = TokenEarlyExit(net, rule)(ids[r:r + 1], mask[r:r + 1], None, owner[r:r + 1])
        assert torch.equal(padded.exit_layer[0], fast.exit_layer[r])
        assert (padded.logits[0] - fast.logits[r]).abs().max() < 1e-4
        assert padded.token_layers == alone.token_layers and padded.full_token_layers == alone.full_token_layers
        counted += alone.token_layers
        kv += alone.kv_token_layers
    assert counted == fast.token_layers and kv == fast.kv_token_layers


def test_extreme_thresholds_give_the_first_and_the_last_exit(tmp_path):
    net = tagger(write_family(tmp_path, "bert"))
    ids, mask, owner = batch(1)
    words = owner == torch.arange(ids.shape[1])
    with torch.no_grad():
        every = net(ids, mask)
    never = TokenEarlyExit(net, WindowEntropyExit(0.0))(ids, mask, None, owner)
    assert (never.logits[words] - every[-1][words]).abs().max() < 1e-4 and never.token_layers == never.full_token_layers
    always = TokenEarlyExit(net, WindowEntropyExit(1.0))(ids, mask, None, owner)
    assert (always.logits[words] - every[0][words]).abs().max() < 1e-4
    assert (always.exit_layer[owner >= 0] == 1).all()
    # a sentence without words (only [CLS] [SEP]) leaves at the first exit, by both paths
    empty = ids[:1, :2], mask[:1, :2], None, torch.tensor([[-1, -1]])
    for engine in (TokenEarlyExit(net, WindowEntropyExit(0.4, 1)), TokenEarlyExit(net, WindowEntropyExit(0.4, 1),
                                                                                   masked=True)):
        out = engine(*empty)
        assert out.exit_layer.tolist() == [[1, 1]] and out.token_layers == 2 and not out.logits.any()


def test_window_rule_and_ceiling():
    rule = WindowEntropyExit(0.5, window=1)
    entropy = np.array([[0.1, 0.9, 0.1, 0.1, 0.1, np.nan]])
    present = np.array([[True, True, True, True, True, False]])
    assert rule.decide(entropy, present, 0).tolist() == [[False, False, False, True, True, False]]
    assert WindowEntropyExit([0.2, 0.95]).decide(entropy, present, 1).all(where=present[0])
    assert ceiling(0.0) == 1.0 and ceiling(1.0) == pytest.approx(6.0) and ceiling(0.75) == pytest.approx(1 / 0.375)
    # with no sentence finished early the two agree; finished sentences raise the bound
    assert row_ceiling(25, 100, 100) == pytest.approx(ceiling(0.75))
    assert row_ceiling(25, 50, 100) == pytest.approx(100 / (25 + 25 / 6))
    assert row_ceiling(25, 50, 100) > ceiling(0.75)


def test_tokee_bench_tunes_on_token_layers_and_times_points(tmp_path, monkeypatch):
    import sys

    from tests.conftest import REPO
    from tests.tagging_files import write_wnut
    from tests.test_run import run_cli

    sys.path.insert(0, str(REPO))
    import bench.tokee as tokee
    from bench.runs import RunRecord

    write_wnut(tmp_path)
    common = ["task=ner_wnut17", f"data_dir={tmp_path}", "trainer.max_epochs=3", "model.optimizer.lr=3e-3",
              "eval.after_train=false", "data.batch_size=8", "data.eval_batch_size=8", "data.select_rows=12",
              "logger=none", "test=false"]
    record = RunRecord(tmp_path / "ner_wnut17.jsonl")
    for name in ("plain", "romebert"):
        run_cli(tmp_path / name, f"model={'bert' if name == 'plain' else name}", *common)
        ckpt = tmp_path / name / "checkpoints" / "best.ckpt"
        record.add({"key": name, "name": name, "seed": 42, "checkpoint": str(ckpt),
                    "per_exit": {"select": [0.5], "dev": [0.5]}})
    monkeypatch.setattr(tokee, "RESULTS", tmp_path)
    args = type("Args", (), {"plan": "ner_wnut17", "windows": [0, 2], "thresholds": [0.1, 0.5, 0.9], "max_drop": 100.0,
                             "samples": 4, "batches": 2, "repeats": 1})
    result = tokee.evaluate(record.entries()[1], args)
    assert len(result["grid"]) == 6 and all(r["token_speedup"] >= 1.0 for r in result["grid"])
    assert any("budget" in p["targets"] for p in result["points"])
    for point in result["points"]:
        assert point["dev_token_speedup"] >= 1.0 and point["dev_ceiling"] <= 6.0
        assert point["speedup_bs1"] > 0 and point["speedup_batched"] > 0 and point["speedup_bs1_onnx"] > 0
    # the plane: every TOKEE point, compared with the static and SENTEE points (none recorded here)
    monkeypatch.setattr(tokee, "RECORDS", tmp_path)
    RunRecord(tmp_path / "tokee_ner_wnut17.jsonl").add({"key": "t", "config": "romebert", "seed": 42, **result})
    rows, versus = tokee.plane("ner_wnut17")
    assert [r["kind"] for r in rows] == ["TOKEE"] * len(result["points"])
    assert len(versus) == 2 * len(rows) and all(v["TOKEE above"] for v in versus)  # nothing to beat
    # points by target over seeds: one row per target, against the plain model of the seed (dev 0.5)
    by_target = {r["target"]: r for r in tokee.over_seeds("ner_wnut17")}
    assert sorted(by_target) == sorted(t for p in result["points"] for t in p["targets"])
    for point in result["points"]:
        row = by_target[point["targets"][0]]
        assert row["seeds"] == "42" and abs(row["vs plain"] - 100 * (point["dev_metric"] - 0.5)) < 1e-9


def test_training_forward_with_halts_is_what_the_engine_computes(tmp_path):
    """``forward(halt_after=...)`` (self-sampling's training pass) with the engine's own exit layers
    gives, at each word's exit, the logits the engine answered with."""
    net = tagger(write_family(tmp_path, "bert"))
    ids, mask, owner = batch()
    result = TokenEarlyExit(net, WindowEntropyExit(0.5, 1))(ids, mask, None, owner)
    with torch.no_grad():
        every = net(ids, mask, halt_after=result.exit_layer)
        full = net(ids, mask, halt_after=torch.full_like(ids, net.exit_layers[-1]))
        plain = net(ids, mask)
    words = owner == torch.arange(ids.shape[1])
    for r, c in words.nonzero().tolist():
        layer = int(result.exit_layer[r, c])
        assert (every[net.exit_layers.index(layer)][r, c] - result.logits[r, c]).abs().max() < 1e-4
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(full, plain))


def test_self_sampling_trains_a_tagger(tmp_path):
    from tests.tagging_files import write_ewt
    from tests.test_run import run_cli

    write_ewt(tmp_path)
    run_cli(tmp_path / "run", "task=pos_ewt", "model=romebert", f"data_dir={tmp_path}", "data.batch_size=8",
            "trainer.max_epochs=3", "model.optimizer.lr=3e-3", "logger=none", "eval.after_train=false",
            "model.self_sampling={windows: [1, 2], thresholds: [0.2, 0.4], sandwich: 1}")
    import json

    from rbert.build import load_system

    results = json.loads((tmp_path / "run" / "results.json").read_text())["test"]
    assert results["test/accuracy"] > 0.6, results
    system, _, _ = load_system(str(tmp_path / "run" / "checkpoints" / "best.ckpt"))
    assert system.self_sampling.windows == [1, 2] and system.self_sampling.sandwich == 1
