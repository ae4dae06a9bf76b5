"""Multi-exit models and the RomeBERT / DeeBERT / PABEE objectives."""

from __future__ import annotations

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rbert.models import MultiExitBert, load_encoder
from rbert.systems import PABEE, DeeBERT, RomeBERT
from rbert.systems.multi_exit import project_conflict
from tests.conftest import task_spec

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


def make_batch(n: int = 8, seq: int = 12, regression: bool = False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, seq - i % 5:] = 0
    labels = torch.rand(n, generator=g) * 5 if regression else torch.arange(n) % 2
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels}


def net(style="highway", pooling="mean", num_labels=2, exit_layers=None, dropout=0.0):
    torch.manual_seed(0)
    return MultiExitBert(load_encoder("tiny", dropout=dropout), num_labels, exit_layers, style, pooling)


def attach_trainer(system):
    """A Trainer that is not running: enough for hooks that ask it for the strategy."""
    system.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    system.log_dict = lambda *a, **k: None
    return system


def test_exit_styles_and_layers():
    highway, pabee = net("highway"), net("pabee")
    assert highway.exit_layers == [1, 2, 3, 4]
    # highway: own pooler per internal exit, initialised from the backbone's; the last exit uses the backbone's
    assert all(h.pooler is not None for h in highway.exits[:-1]) and highway.exits[-1].pooler is None
    torch.testing.assert_close(highway.exits[0].pooler.dense.weight, highway.bert.pooler.dense.weight)
    assert all(h.pooler is None for h in pabee.exits)
    subset = net(exit_layers=[2])
    assert subset.exit_layers == [2, 4]  # the last layer always has an exit
    logits = subset(**{k: v for k, v in make_batch().items() if k != "labels"})
    assert [z.shape for z in logits] == [(8, 2), (8, 2)]
    with pytest.raises(ValueError, match="exit_layers"):
        net(exit_layers=[0, 9])


def test_exit_logits_match_a_backbone_cut_at_that_layer():
    model = net().eval()
    batch = make_batch()
    with torch.no_grad():
        all_logits = model(batch["input_ids"], batch["attention_mask"])
        for i, layer in enumerate(model.exit_layers):
            hidden = model.bert(batch["input_ids"], batch["attention_mask"], num_layers=layer).last_hidden_state
            torch.testing.assert_close(model.exit_logits(i, hidden, batch["attention_mask"]), all_logits[i])


def test_pabee_loss_is_layer_weighted():
    system = PABEE(task_spec("sst2"), net("pabee"), ADAMW).eval()
    batch = make_batch()
    logits = system(batch)
    expected = sum((i + 1) * F.cross_entropy(z, batch["labels"]) for i, z in enumerate(logits)) / 10
    torch.testing.assert_close(system.training_loss(batch)[0], expected)


@pytest.mark.parametrize(("regression", "kd_reduction"), [(False, "mean"), (False, "batchmean"), (True, "mean")])
def test_romebert_self_distillation_loss(regression, kd_reduction):
    task = task_spec("stsb" if regression else "sst2")
    system = RomeBERT(task, net(num_labels=task.num_labels), ADAMW, temperature=3.0, gamma=0.9,
                      gradient_regularization=False, kd_reduction=kd_reduction).eval()
    batch = make_batch(regression=regression)
    logits, y = system(batch), batch["labels"]
    teacher = logits[-1]
    if regression:
        ce = lambda z: F.mse_loss(z.squeeze(-1), y)  # noqa: E731
        kd = lambda z: F.mse_loss(z.squeeze(-1), teacher.squeeze(-1))  # noqa: E731
    else:
        ce = lambda z: F.cross_entropy(z, y)  # noqa: E731
        p_t = F.softmax(teacher / 3, -1)
        # KL per sample, averaged over the batch (batchmean), or over batch x classes as the
        # reference's nn.KLDivLoss() does (mean): C = 2 times weaker on SST-2.
        per_class = 1 if kd_reduction == "batchmean" else task.num_labels
        kd = lambda z: 9 * (p_t * (p_t.log() - F.log_softmax(z / 3, -1))).sum(-1).mean() / per_class  # noqa: E731
    expected = ce(teacher) + sum(0.1 * ce(z) + 0.9 * kd(z) for z in logits[:-1])
    torch.testing.assert_close(system.training_loss(batch)[0], expected, rtol=1e-5, atol=1e-6)
    # The teacher is detached: the distillation terms send no gradient into the final exit.
    joint = RomeBERT(task, net(num_labels=task.num_labels), ADAMW, self_distillation=False,
                     gradient_regularization=False).eval()
    logits = joint(batch)
    torch.testing.assert_close(joint.training_loss(batch)[0], sum(ce(z) for z in logits))


def test_projection_removes_only_conflicts():
    g_a = torch.tensor([1.0, 0.0])
    out = project_conflict(g_a, torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out["g_m"], torch.tensor([0.0, 1.0]))
    assert out["projected"] == 1 and out["angle"].item() == pytest.approx(135.0)
    out = project_conflict(g_a, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out["g_m"], torch.tensor([1.0, 1.0]))
    assert out["projected"] == 0


@pytest.mark.parametrize(("anchor", "conflict"), [("final", False), ("exits", False), ("final", True)])
def test_gradient_regularization_step(anchor, conflict, monkeypatch):
    """After backward + the GR hook, .grad is g_A + proj(g_M) on layers 1..L-1 weights, the plain sum elsewhere."""
    # At random init the two gradients are nearly orthogonal (dot ~1e-9, either sign): steer the
    # exit terms towards the final term (no conflict) or against it (the projection must happen).
    terms, sign = RomeBERT.loss_terms, -3 if conflict else 3
    monkeypatch.setattr(RomeBERT, "loss_terms", lambda self, b: (lambda f, e: (f, e + sign * f))(*terms(self, b)))
    system = attach_trainer(RomeBERT(task_spec("sst2"), net(), ADAMW, anchor=anchor).eval())
    reference = RomeBERT(task_spec("sst2"), copy.deepcopy(system.net), ADAMW, anchor=anchor).eval()
    batch = make_batch()
    assert {id(p) for p in system.gr_params} == {
        id(p) for layer in system.net.bert.encoder.layer[:3] for n, p in layer.named_parameters()
        if n.endswith("weight") and p.ndim == 2}

    loss, _ = system.training_loss(batch)
    loss.backward()
    system.on_before_optimizer_step(None)

    # The same by hand, on a copy.
    final, exits = reference.loss_terms(batch)
    a, m = (final, exits) if anchor == "final" else (exits, final)
    params = list(reference.net.parameters())
    g_a = torch.autograd.grad(a, params, retain_graph=True, allow_unused=True)
    g_m = torch.autograd.grad(m, params, allow_unused=True)
    zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    names = [n for n, _ in reference.net.named_parameters()]
    regularised = {n for n, p in system.net.named_parameters() if any(p is q for q in system.gr_params)}
    flat_a = torch.cat([zero(g, p).flatten() for n, g, p in zip(names, g_a, params) if n in regularised])
    flat_m = torch.cat([zero(g, p).flatten() for n, g, p in zip(names, g_m, params) if n in regularised])
    dot = flat_a @ flat_m
    assert (dot < 0) == conflict
    if dot < 0:
        flat_m = flat_m - dot / (flat_a @ flat_a) * flat_a
    got = torch.cat([p.grad.flatten() for n, p in system.net.named_parameters() if n in regularised])
    torch.testing.assert_close(got, flat_a + flat_m, rtol=1e-4, atol=1e-7)
    for name, p, ga, gm in zip(names, system.net.parameters(), g_a, g_m):
        if name not in regularised and p.grad is not None:
            torch.testing.assert_close(p.grad, zero(ga, p) + zero(gm, p), rtol=1e-4, atol=1e-7)


def test_gradient_regularization_skips_an_overflowed_anchor_gradient():
    """fp16: the separate g_A pass may overflow where the total does not; .grad must stay finite and untouched."""
    system = attach_trainer(RomeBERT(task_spec("sst2"), net(), ADAMW).eval())
    loss, _ = system.training_loss(make_batch())
    loss.backward()
    before = [p.grad.clone() for p in system.gr_params]
    system._g_anchor[0].fill_(float("inf"))
    system.on_before_optimizer_step(None)
    assert system._g_anchor is None  # consumed, not carried into the next step
    for p, g in zip(system.gr_params, before):
        assert torch.equal(p.grad, g) and torch.isfinite(p.grad).all()


def test_deebert_stages_freeze_the_right_parts():
    system = DeeBERT(task_spec("sst2"), net(), ADAMW)
    trainable = lambda: {n for n, p in system.net.named_parameters() if p.requires_grad}  # noqa: E731
    assert all(n.startswith(("bert.", "exits.3.")) for n in trainable())
    system.set_stage(1)
    assert trainable() and all(n.startswith(("exits.0.", "exits.1.", "exits.2.")) for n in trainable())
    assert system.monitor() is None
    batch = make_batch()
    logits = system.eval()(batch)
    torch.testing.assert_close(system.training_loss(batch)[0],
                               sum(F.cross_entropy(z, batch["labels"]) for z in logits[:-1]))
