"""Exit policies and the early-exit engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rbert.errors import ConfigError
from rbert.inference.engine import early_exit, simulate
from rbert.inference.policies import (
    ConfidenceExit,
    EntropyExit,
    ExitPolicy,
    FixedExit,
    NoExit,
    PatienceExit,
    entropy,
    entropy_one,
)
from rbert.models import MultiExitBert, load_encoder


def tiny_model(num_labels=3, exit_layers=None, pooling="mean"):
    # A seed whose random exits disagree enough for policies to leave at 3+ different layers
    # (test_policies_exit_at_a_mix_of_layers guards it).
    torch.manual_seed(2)
    model = MultiExitBert(load_encoder("tiny"), num_labels, exit_layers, pooling=pooling).eval()
    # Spread the random exits' logits so that policies make varied decisions.
    with torch.no_grad():
        for head in model.exits:
            head.classifier.weight.mul_(40)
    return model


def padded_batch(n=12):
    g = torch.Generator().manual_seed(1)
    lengths = [3 + (7 * i) % 15 for i in range(n)]
    ids = torch.randint(1000, 5000, (n, max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids * mask, mask, types * mask


def test_entropy_is_stable_and_exact():
    logits = np.array([[0.0, 0.0], [1000.0, -1000.0], [2.0, 1.0]], dtype=np.float32)
    h = entropy(logits)
    assert np.isfinite(h).all()
    assert h[0].item() == pytest.approx(math.log(2)) and h[1].item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(torch.from_numpy(logits[2]), -1)
    assert h[2].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)
    for z, expected in zip(logits.tolist(), h.tolist()):
        assert entropy_one(z) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    # the policy's own (one kernel shorter) test agrees with entropy() < threshold * ln C
    for t in [0.01, 0.5, 0.9, 0.99]:
        assert EntropyExit(t).decide(logits, 1, None)[0].tolist() == (h < t * math.log(2)).tolist()


def test_policy_decisions():
    logits = np.array([[4.0, 0.0], [0.1, 0.0]], dtype=np.float32)
    assert EntropyExit(0.5).decide(logits, 1, None)[0].tolist() == [True, False]
    assert EntropyExit(0.3, normalized=False).decide(logits, 1, None)[0].tolist() == [True, False]
    assert ConfidenceExit(0.9).decide(logits, 1, None)[0].tolist() == [True, False]
    assert FixedExit(2).decide(logits, 1, None)[0].tolist() == [False, False]
    assert FixedExit(2).decide(logits, 2, None)[0].tolist() == [True, True]
    assert NoExit().decide(logits, 1, None)[0].tolist() == [False, False]
    patience = PatienceExit(2)
    state = patience.start(2)
    decisions = []
    for step in ([[1.0, 0], [1.0, 0]], [[1.0, 0], [0, 1.0]], [[1.0, 0], [0, 1.0]]):
        leave, state = patience.decide(np.array(step), 0, state)
        decisions.append(leave.tolist())
    # sample 0 agrees at exits 2 and 3 -> leaves at exit 3; sample 1 changed its mind at exit 2
    assert decisions == [[False, False], [False, False], [True, False]]
    regression = PatienceExit(1, tolerance=0.1)
    state = regression.start(2)
    _, state = regression.decide(np.array([[1.0], [1.0]]), 1, state)
    assert regression.decide(np.array([[1.05], [1.5]]), 2, state)[0].tolist() == [True, False]


@pytest.mark.parametrize("policy", [EntropyExit(0.2), EntropyExit(0.9), EntropyExit(0.5, normalized=False),
                                    ConfidenceExit(0.6), ConfidenceExit(0.95), PatienceExit(1), PatienceExit(2),
                                    PatienceExit(1, tolerance=0.3), FixedExit(3), NoExit()],
                         ids=lambda p: p.describe())
@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_one_sample_rule_agrees_with_the_batched_rule(policy, num_labels):
    """``decide_one`` (plain Python, batch size 1) is ``decide`` on every sample, layer after layer."""
    if num_labels == 1 and not policy.regression_ok:
        return
    g = torch.Generator().manual_seed(num_labels)
    # Logits of 6 exits for 400 samples; widely spread, some huge, some tied (argmax ties).
    logits = torch.randn(6, 400, num_labels, generator=g) * torch.tensor([0.05, 1.0, 4.0, 50.0]).repeat(100)[:, None]
    logits[:, :20] = logits[:, :20].round()
    state = policy.start(400)
    batched = []
    for layer, z in enumerate(logits.numpy(), start=1):
        leave, state = policy.decide(z, layer, state)
        batched.append(leave.tolist())
    for i in range(400):
        state = policy.start_one()
        for layer, z in enumerate(logits[:, i], start=1):
            leave, state = policy.decide_one(z.tolist(), layer, state)
            assert leave == batched[layer - 1][i], (i, layer, z.tolist())


def test_a_policy_with_only_a_batched_rule_works_one_sample_at_a_time():
    class Margin(ExitPolicy):  # a user's policy: decide only
        def decide(self, logits, layer, state):
            return logits.max(axis=-1) - logits.min(axis=-1) > 0.6, state

    model = tiny_model()
    ids, mask, types = padded_batch()
    batched = early_exit(model, Margin(), ids, mask, types)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        alone = early_exit(model, Margin(), ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
        assert alone.exit_layer.item() == batched.exit_layer[i].item()
    assert batched.exit_layer.unique().numel() >= 2


def test_bad_policy_settings_are_rejected():
    with pytest.raises(ConfigError, match="normalised entropy threshold lies in"):
        EntropyExit(1.5)
    with pytest.raises(ConfigError, match="every sample would leave at the first exit"):
        EntropyExit(0.7, normalized=False).check(num_labels=2, num_exits=6)
    with pytest.raises(ConfigError, match="confidence threshold lies in"):
        ConfidenceExit(0.0)
    with pytest.raises(ConfigError, match="patience must be >= 1"):
        PatienceExit(0)
    with pytest.raises(ConfigError, match="needs a multi-exit model"):
        EntropyExit(0.1).check(num_labels=2, num_exits=1)
    with pytest.raises(ConfigError, match="regression"):
        ConfidenceExit(0.9).check(num_labels=1, num_exits=4)
    NoExit().check(num_labels=2, num_exits=1)  # fine on a single-exit model


POLICIES = [EntropyExit(0.3), EntropyExit(0.6), ConfidenceExit(0.8), PatienceExit(1), PatienceExit(2), FixedExit(2),
            NoExit()]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
@pytest.mark.parametrize("exit_layers", [None, [2, 3]])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_engine_matches_simulation_and_batch_size_one(policy, exit_layers, pooling):
    model = tiny_model(exit_layers=exit_layers, pooling=pooling)
    ids, mask, types = padded_batch()
    batched = early_exit(model, policy, ids, mask, types)
    with torch.no_grad():
        full = simulate(policy, model(ids, mask, types), model.exit_layers)
    assert torch.equal(batched.exit_layer, full.exit_layer)
    torch.testing.assert_close(batched.logits, full.logits, rtol=1e-4, atol=1e-4)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        alone = early_exit(model, policy, ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
        assert alone.exit_layer.item() == batched.exit_layer[i].item()
        torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", POLICIES[:5], ids=lambda p: p.describe())
def test_engine_consults_only_the_exits_it_is_given(policy):
    """``exit_layers`` (e.g. the trained exits): the others are never asked, as if absent."""
    model = tiny_model()
    ids, mask, types = padded_batch()
    result = early_exit(model, policy, ids, mask, types, exit_layers=[2, 4])
    with torch.no_grad():
        logits = model(ids, mask, types)
    expected = simulate(policy, [logits[1], logits[3]], [2, 4])
    assert set(result.exit_layer.tolist()) <= {2, 4}
    assert torch.equal(result.exit_layer, expected.exit_layer)
    torch.testing.assert_close(result.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_policies_exit_at_a_mix_of_layers():
    """The identity test above means something only if samples leave at different layers."""
    model = tiny_model()
    ids, mask, types = padded_batch()
    layers = {p.describe(): early_exit(model, p, ids, mask, types).exit_layer.unique().numel() for p in POLICIES[:5]}
    assert max(layers.values()) >= 3, layers


def test_engine_runs_fewer_layer_rows():
    """Samples that left are not computed any more: count rows entering each layer."""
    model = tiny_model()
    ids, mask, types = padded_batch()
    policy = max(POLICIES[:5], key=lambda p: early_exit(model, p, ids, mask, types).exit_layer.unique().numel())
    rows = []
    hooks = [layer.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
             for layer in model.bert.encoder.layer]
    result = early_exit(model, policy, ids, mask, types)
    for h in hooks:
        h.remove()
    expected = [int((result.exit_layer >= n).sum()) for n in range(1, len(rows) + 1)]
    assert rows == expected and rows[-1] < rows[0]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_engine_with_mixed_precision(device):
    model = tiny_model().to(device)
    ids, mask, types = (t.to(device) for t in padded_batch())
    with torch.autocast(device, dtype=torch.bfloat16):
        batched = early_exit(model, EntropyExit(0.6), ids, mask, types)
        full = simulate(EntropyExit(0.6), model(ids, mask, types), model.exit_layers)
        alone = [early_exit(model, EntropyExit(0.6), ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
                 for i, n in enumerate(mask.sum(dim=1).tolist())]
    agree = (batched.exit_layer == full.exit_layer).float().mean().item()
    assert agree >= 0.9  # bf16 rounding may flip a sample sitting on the threshold
    alone_layers = torch.cat([a.exit_layer for a in alone])
    assert (alone_layers == batched.exit_layer).float().mean().item() >= 0.9
    assert all(a.logits.dtype == torch.bfloat16 for a in alone)  # the bs=1 path ran under autocast
