"""CoRe: expansion and blend, the two-phase system (schedule, optimiser hand-over), and
``model=core`` through run.py (both phases, resume on either side of the switch, export)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import transformers
from transformers import get_linear_schedule_with_warmup

from rbert.errors import ConfigError
from rbert.models import BertForMaskedLM
from rbert.models.relaxed import expand, set_blend
from rbert.systems import CoRe
from tests.test_pretrain import KEEP_STEPS, NO_DROPOUT, pretrain_cli
from tests.test_relaxed import config, padded_batch, relaxed
from tests.test_run import run_cli


def logits(model, ids, mask):
    with torch.no_grad():
        return model.eval()(ids, mask).logits


# ---------------------------------------------------------------------------- expansion and blend
def test_expanding_a_low_rank_model_keeps_its_function():
    torch.manual_seed(0)
    small = BertForMaskedLM(config(), attention="softmax", feed_forward="low_rank")
    full = expand(small)
    assert (full.bert.attention_type, full.bert.feed_forward_type) == ("softmax", "dense")
    assert not hasattr(full.config, "ffn_rank")
    ids, mask = padded_batch()
    torch.testing.assert_close(logits(full, ids, mask), logits(small, ids, mask), atol=1e-5, rtol=1e-5)


def test_blend_runs_from_the_relaxed_function_to_the_standard_one():
    small = relaxed(BertForMaskedLM)
    with torch.no_grad():  # sharp attention: at BERT's initial scale both kernels average uniformly
        for layer in small.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(30)
            layer.attention.self.key.weight.mul_(30)
    blended, standard = expand(small, attention="blend"), expand(small)
    ids, mask = padded_batch()
    set_blend(blended, 0.0)
    at_0 = logits(blended, ids, mask)
    torch.testing.assert_close(at_0, logits(small, ids, mask), atol=1e-5, rtol=1e-5)
    set_blend(blended, 1.0)
    at_1 = logits(blended, ids, mask)
    torch.testing.assert_close(at_1, logits(standard, ids, mask), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at_0, at_1, atol=1e-3)  # the switch changes the function
    # Halfway, each attention output is the mean of the two kernels'.
    layer = blended.bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    layer.mix = 0.5
    halfway = layer.attend(q, k, v, None)
    layer.mix = 0.0
    linear = layer.attend(q, k, v, None)
    layer.mix = 1.0
    torch.testing.assert_close(halfway, (linear + layer.attend(q, k, v, None)) / 2)


# ---------------------------------------------------------------------------- the system
def core(**kwargs) -> CoRe:
    kwargs = {"total_steps": 100, "switch": 0.4, "warmup_ratio": 0.1, "rewarmup_steps": 10, **kwargs}
    return CoRe(relaxed(BertForMaskedLM), torch.optim.AdamW, **kwargs)


def test_phases_and_one_schedule_over_both():
    system = core()
    assert system.stage_steps == [40, 60] and system.num_stages == 2
    assert system.monitor() == ("val/loss", "min")
    lr = lambda scheduler: [scheduler.lr_lambdas[0](s) for s in range(system.stage_steps[system.stage])]  # noqa: E731
    reference = get_linear_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1), 10, 100)
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=1)
    # Phase 1 follows the from-scratch baseline's schedule over the whole budget.
    assert lr(system.lr_scheduler(optimizer)) == [reference.lr_lambdas[0](s) for s in range(40)]
    system.set_stage(1)
    assert not system.is_relaxed and system.steps_before_stage() == 40
    phase2 = lr(system.lr_scheduler(optimizer))
    # ... phase 2 re-warms up over 10 steps to where that schedule stands, then follows it.
    assert phase2[0] == pytest.approx(reference.lr_lambdas[0](40) / 10)
    assert phase2[9:] == pytest.approx([reference.lr_lambdas[0](s) for s in range(49, 100)])


@pytest.mark.parametrize("kwargs, match", [
    ({"switch": 0}, "model.switch"), ({"switch": 100}, "model.switch"), ({"switch": 0.999}, "model.switch"),
    ({"total_steps": 1}, "total_steps"), ({"rewarmup_steps": -3}, "rewarmup_steps"),
])
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        core(**kwargs)


def test_a_standard_net_is_refused():
    with pytest.raises(ConfigError, match="relaxed"):
        CoRe(BertForMaskedLM(config()), torch.optim.AdamW, total_steps=10)


# ---------------------------------------------------------------------------- run.py
CORE = ["model=core", *NO_DROPOUT, "data.batch_size=8", "trainer.max_steps=12", "trainer.val_check_interval=3",
        "model.switch=6", "model.transition_steps=4", "model.rewarmup_steps=2", "model.optimizer.lr=2e-3"]


def test_both_phases_resume_on_either_side_of_the_switch(text_dir, tmp_path):
    proc = pretrain_cli(tmp_path / "whole", text_dir, *CORE, *KEEP_STEPS)
    assert "validation at step 9 (stage 2/2)" in proc.stdout + proc.stderr  # the run's step in the log lines
    ckpts = tmp_path / "whole" / "checkpoints"
    phase1, phase2 = ckpts / "stage1" / "step3.ckpt", ckpts / "stage2" / "step3.ckpt"
    assert torch.load(phase1, weights_only=True)["rbert_stage"] == 0
    assert torch.load(phase2, weights_only=True)["rbert_stage"] == 1
    # One data stream over both phases: phase 2's third step is the stream's ninth batch (an
    # epoch of the tiny corpus is 10 batches), not the first epoch's third again.
    position = lambda path: {k: v for k, v in torch.load(path, weights_only=True)["TextDataModule"].items()  # noqa: E731
                             if k in ("epoch", "batches")}
    assert position(ckpts / "stage1" / "step6.ckpt") == {"epoch": 0, "batches": 6}
    assert position(phase2) == {"epoch": 0, "batches": 9}
    assert position(ckpts / "stage2" / "step6.ckpt") == {"epoch": 1, "batches": 2}
    whole = torch.load(ckpts / "stage2" / "last.ckpt", weights_only=True)
    # Phase 2 is a standard BERT; its dense W came with fresh Adam moments, the rest kept theirs.
    assert "net.bert.encoder.layer.0.intermediate.dense.weight" in whole["state_dict"]
    assert not any(k.endswith((".U", ".V")) for k in whole["state_dict"])
    steps = {int(s["step"]) for s in whole["optimizer_states"][0]["state"].values()}
    assert steps == {6, 12}
    # Steps and training time run on across the switch.
    with open(tmp_path / "whole" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val/loss"]]
    assert [float(r["time/step"]) for r in rows] == [3, 6, 9, 12]
    times = [float(r["time/train_seconds"]) for r in rows]
    assert times == sorted(times)
    res = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert res["steps"] == 12
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "whole" / "hf")
    assert hf.config.num_hidden_layers == 2
    for name, ckpt in (("from_phase1", phase1), ("from_phase2", phase2)):
        pretrain_cli(tmp_path / name, text_dir, *CORE, "export_dir=null", "logger=none", f"ckpt_path={ckpt}")
        resumed = torch.load(tmp_path / name / "checkpoints" / "stage2" / "last.ckpt", weights_only=True)
        assert resumed["global_step"] == whole["global_step"]
        for key, value in whole["state_dict"].items():
            torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_fresh_optimiser_state_on_request(text_dir, tmp_path):
    pretrain_cli(tmp_path / "run", text_dir, *CORE, "model.keep_optimizer_state=false", "export_dir=null",
                 "logger=none")
    last = torch.load(tmp_path / "run" / "checkpoints" / "stage2" / "last.ckpt", weights_only=True)
    assert {int(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {6}


def test_export_expands_a_phase1_checkpoint(text_dir, glue_dir, tmp_path):
    pretrain_cli(tmp_path / "run", text_dir, *CORE, "export_dir=null", "logger=none")
    phase1 = tmp_path / "run" / "checkpoints" / "stage1" / "last.ckpt"
    out = tmp_path / "expanded"
    # One command for both kinds of checkpoint: the fine-tuning config's mode=export.
    proc = run_cli(tmp_path / "export", "mode=export", f"ckpt_path={phase1}", f"export_dir={out}", backbone=False)
    assert "phase/stage 1 of 2" in proc.stdout
    from rbert.build import load_system

    system, _, _ = load_system(str(phase1))
    assert system.is_relaxed
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, expand(system.net)(ids, mask).logits,
                                   atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out).vocab_size == hf.config.vocab_size
    # ... and fine-tunes like any backbone.
    run_cli(tmp_path / "ft", f"backbone={out}", "task=sst2", "model=romebert", f"data_dir={glue_dir}",
            "debug=limit", backbone=False)
    # A fine-tuned checkpoint is not a pre-training one.
    ft = next((tmp_path / "ft" / "checkpoints").glob("*.ckpt"))
    bad = pretrain_cli(tmp_path / "bad", text_dir, "mode=export", f"ckpt_path={ft}", f"export_dir={out}2",
                       check=False)
    assert bad.returncode == 2 and "is a fine-tuned checkpoint" in bad.stderr
