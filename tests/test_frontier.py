"""Early exit against what a user would deploy instead: static depth, the selection split, a
fine-tuned teacher, and the frontier bench's record, evaluation and report."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import transformers

from rbert.errors import ConfigError
from rbert.models import MultiExitBert, load_encoder
from tests.backbone_files import FAMILIES, family_batch, write_family
from tests.conftest import REPO, task_spec
from tests.test_run import run_cli
from tests.wandb_log import read_run


# ---------------------------------------------------------------------------- static depth
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_depth_keeps_the_first_k_layers_of_every_family(family, tmp_path):
    folder = write_family(tmp_path, family)
    full = load_encoder(str(folder)).eval()
    cut = load_encoder(str(folder), num_layers=2).eval()
    assert cut.num_layers == 2 and full.num_layers == 4
    ids, mask, types = family_batch(family)
    with torch.no_grad():
        want = full(ids, mask, types, output_hidden_states=True).hidden_states[2]
        got = cut(ids, mask, types).last_hidden_state
    torch.testing.assert_close(got, want)
    # Fewer weights, not the same weights skipped: the dropped layers are gone.
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in full.parameters()) or family == "albert"
    # Saved, it is a 2-layer checkpoint for rbert and for transformers alike.
    cut.save_pretrained(tmp_path / "cut")
    again = load_encoder(str(tmp_path / "cut")).eval()
    assert again.num_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, types).last_hidden_state, got)
        hf = transformers.AutoModel.from_pretrained(tmp_path / "cut").eval()
        kwargs = {} if family == "distilbert" else {"token_type_ids": types}
        hf_out = hf(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
    torch.testing.assert_close(hf_out[mask.bool()], got[mask.bool()], atol=1e-5, rtol=1e-4)


def test_static_depth_of_a_multi_exit_model_and_bad_values():
    net = MultiExitBert(load_encoder("tiny", num_layers=3), 2)
    assert net.exit_layers == [1, 2, 3]
    for bad in (0, 5):
        with pytest.raises(ConfigError, match="model.net.bert.num_layers: cannot keep"):
            load_encoder("tiny", num_layers=bad)


def test_albert_with_several_groups_refuses_a_cut_it_could_not_save():
    config = transformers.AlbertConfig(vocab_size=100, hidden_size=32, embedding_size=16, num_hidden_layers=4,
                                       num_hidden_groups=2, num_attention_heads=4, intermediate_size=64)
    from rbert.models.albert import AlbertModel

    model = AlbertModel(config)
    # Applications 1..4 run groups 0, 0, 1, 1; a 2-layer, 2-group config would run 0, 1.
    with pytest.raises(ValueError, match="cannot keep 2 of its 4"):
        model.keep_layers(2)
    model.keep_layers(3)  # 0, 0, 1: what a 3-layer, 2-group config runs too
    assert model.config.num_hidden_layers == 3 and len(model.layers) == 3


def test_static_depth_trains_exports_and_serves(glue_dir, tmp_path):
    """model=bert at depth 2 through run.py: trained at 2 layers, exported as a 2-layer folder
    that the deploy runtime answers from."""
    from rbert.deploy import EarlyExitModel

    run_cli(tmp_path / "run", "model=bert", "model.net.bert.num_layers=2", f"data_dir={glue_dir}",
            "trainer.max_epochs=1", "eval.after_train=false", "test=false")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(".layer.2." in k for k in state) and any(".layer.1." in k for k in state)
    run_cli(tmp_path / "export", "mode=export", f"ckpt_path={ckpt}", f"data_dir={glue_dir}",
            f"export_dir={tmp_path / 'folder'}", "export_onnx=false", "exit_policy=none")
    assert json.loads((tmp_path / "folder" / "config.json").read_text())["backbone"]["num_hidden_layers"] == 2
    answers = EarlyExitModel.from_pretrained(tmp_path / "folder").predict(["a fine film", "dull"])
    assert [a["exit_layer"] for a in answers] == [2, 2]


# ---------------------------------------------------------------------------- the selection split
def test_selection_split_is_held_out_fixed_and_validated_on(glue_dir):
    from rbert.data.glue import GlueDataModule

    def module(seed, **kw):
        dm = GlueDataModule(task_spec("sst2"), "tiny", str(glue_dir), seed=seed, select_rows=16, **kw)
        dm.setup("fit")
        return dm

    a, b = module(1), module(2, train_limit=20)
    texts = {name: {tuple(r["input_ids"]) for r in dm.splits[s]} for name, dm in (("a", a), ("b", b))
             for s in ("select",)}
    assert len(a.splits["select"]) == 16 and len(a.splits["train"]) == 64 - 16
    assert texts["a"] == texts["b"]  # the same rows whatever the run's seed and budget
    train_a = [tuple(r["input_ids"]) for r in a.splits["train"]]
    select_a = [tuple(r["input_ids"]) for r in a.splits["select"]]
    assert not set(map(id, train_a)) & set(map(id, select_a))
    assert len(b.splits["train"]) == 20
    # Validation (and the checkpoint choice) runs on the selection rows, the test stage on dev.
    assert len(a.val_dataloader()[0].dataset) == 16
    assert len(a.test_dataloader()[0].dataset) == 32
    assert len(a.selection_loader().dataset) == 16 and len(a.eval_loader(0).dataset) == 32
    with pytest.raises(ConfigError, match="data.select_rows=64 leaves no training rows"):
        module(1, train_limit=None).__class__(task_spec("sst2"), "tiny", str(glue_dir), select_rows=64).setup("fit")


def test_selection_rows_are_disjoint_from_training_rows(tmp_path):
    """Distinct sentences, so the check is by content."""
    from rbert.data.glue import GlueDataModule

    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"word{i} film\t{i % 2}\n" for i in range(50)))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"dev{i}\t{i % 2}\n" for i in range(6)))
    dm = GlueDataModule(task_spec("sst2"), "tiny", str(tmp_path), select_rows=10, train_limit=30, seed=3)
    dm.setup("fit")
    rows = {s: {tuple(r["input_ids"]) for r in dm.splits[s]} for s in ("train", "select")}
    assert len(rows["select"]) == 10 and len(rows["train"]) == 30 and not rows["train"] & rows["select"]


# ---------------------------------------------------------------------------- a fine-tuned teacher
def test_a_teacher_is_distilled_from_and_stays_out_of_the_checkpoint(glue_dir, tmp_path):
    common = [f"data_dir={glue_dir}", "trainer.max_epochs=1", "eval.after_train=false", "test=false",
              "data.train_limit=null", "data.batch_size=16", "trainer.log_every_n_steps=1"]
    run_cli(tmp_path / "plain", "model=bert", *common)
    teacher = tmp_path / "plain" / "checkpoints" / "last.ckpt"
    for model in ("bert", "romebert"):
        run_cli(tmp_path / model, f"model={model}", f"model.teacher={teacher}", *common)
        ckpt = torch.load(tmp_path / model / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert not any(k.startswith(("teacher", "_teacher")) for k in ckpt["state_dict"]), model
        assert ckpt["rbert_config"]["model"]["teacher"] == str(teacher)
        metrics = (tmp_path / model / "csv" / "metrics.csv").read_text()
        if model == "bert":
            assert "train/loss_kd" in metrics
    proc = run_cli(tmp_path / "bad", "model=bert", f"model.teacher={tmp_path / 'missing.ckpt'}", *common, check=False)
    assert proc.returncode != 0 and "model.teacher" in proc.stderr + proc.stdout

    # DeeBERT's second stage on that fine-tuned model: backbone and final exit are its weights, unchanged.
    run_cli(tmp_path / "exits", "model=deebert", f"model.init_from={teacher}", "model.stage_epochs=[0,1]", *common)
    plain = torch.load(teacher, map_location="cpu", weights_only=True)["state_dict"]
    found = sorted((tmp_path / "exits" / "checkpoints").rglob("last.ckpt"))
    assert [p.parent.name for p in found] == ["stage2"]  # the skipped stage wrote nothing
    ckpt = torch.load(found[0], map_location="cpu", weights_only=True)
    exits = ckpt["state_dict"]
    last = max(int(k.split(".")[2]) for k in exits if k.startswith("net.exits."))
    assert ckpt["rbert_stage"] == 1 and last == 3
    for key, value in plain.items():
        mine = key.replace("net.classifier.", f"net.exits.{last}.classifier.")
        torch.testing.assert_close(exits[mine], value, rtol=0, atol=0, msg=key)
    proc = run_cli(tmp_path / "bad2", "model=deebert", f"model.init_from={tmp_path / 'exits' / 'checkpoints'}",
                   "model.stage_epochs=[0,1]", *common, check=False)
    assert proc.returncode != 0 and "model.init_from" in proc.stderr + proc.stdout


def test_teacher_logits_replace_the_final_exit_as_romebert_target():
    from rbert.systems import RomeBERT
    from rbert.systems.distill import kd_term

    torch.manual_seed(0)
    task = task_spec("sst2")
    system = RomeBERT(task, MultiExitBert(load_encoder("tiny"), 2), torch.optim.AdamW, gradient_regularization=False)
    batch = {"input_ids": torch.randint(5, 100, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "token_type_ids": torch.zeros(4, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}
    system.eval()
    target = torch.tensor([[4.0, -4.0]] * 4)

    class Fixed:
        def logits(self, batch):
            return target

    system.teacher = Fixed()
    final, exits = system.loss_terms(batch)
    logits = system(batch)
    want_final = 0.1 * system.loss(logits[-1], batch["labels"]) + 0.9 * kd_term(logits[-1], target, 3.0, "mean", False)
    torch.testing.assert_close(final, want_final)
    want = sum(0.1 * system.loss(z, batch["labels"]) + 0.9 * kd_term(z, target, 3.0, "mean", False)
               for z in logits[:-1])
    torch.testing.assert_close(exits, want)


# ---------------------------------------------------------------------------- the bench's machinery
def test_run_record_skips_finished_jobs_and_survives_a_cut_line(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.runs import RunRecord, job_key

    record = RunRecord(tmp_path / "plan.jsonl")
    key = job_key("plain-s42", ["model=bert", "seed=42"])
    assert key == job_key("plain-s42", ["seed=42", "model=bert"]) != job_key("plain-s42", ["model=bert", "seed=43"])
    record.add({"key": key, "value": 1})
    with open(record.path, "a") as f:
        f.write('{"key": "cut-mid-wri')  # a line a crash cut short
    assert list(record.done()) == [key]


def test_frontier_evaluates_a_checkpoint_and_reports_the_plane(glue_dir, tmp_path, monkeypatch):
    """Tiny checkpoints through the bench's evaluation (held-out selection split, timed points
    in turns with the full-depth reference) and report (interpolation, gain, bootstrap, plot)."""
    sys.path.insert(0, str(REPO))
    import bench.frontier as frontier
    from bench import frontier_report

    common = [f"data_dir={glue_dir}", "trainer.max_epochs=2", "model.optimizer.lr=2e-3", "eval.after_train=false",
              "data.train_limit=null", "data.batch_size=16", "data.select_rows=16"]
    runs = {"plain": ["model=bert"], "static-2": ["model=bert", "model.net.bert.num_layers=2"],
            "romebert": ["model=romebert"]}
    monkeypatch.setattr(frontier_report, "RECORDS", tmp_path)
    monkeypatch.setattr(frontier_report, "BOOTSTRAP", 50)
    entries = []
    for name, overrides in runs.items():
        run_cli(tmp_path / name, *overrides, *common)
        floor = entries[0]["per_exit"]["select"][-1] if entries else None
        result, arrays = frontier.evaluate_job(tmp_path / name / "checkpoints" / "best.ckpt", floor, 1.0,
                                               samples=4, batches=1, repeats=1)
        (tmp_path / "test").mkdir(exist_ok=True)
        np.savez(tmp_path / "test" / f"{name}.npz", **arrays)
        entries.append({"key": name, "name": name, "seed": 42, "arrays": f"test/{name}.npz", **result})
        assert arrays["select_logits"].shape[1] == 16 and arrays["dev_logits"].shape[1] == 32
        assert len(result["per_exit"]["dev"]) == len(result["exit_layers"])
        for point in result["points"]:
            assert point["speedup_bs1"] > 0 and point["speedup_batched"] > 0
    static = entries[1]["points"][0]
    assert static["dev_layer_speedup"] == 2.0  # 4 layers / 2
    targets = {t for p in entries[2]["points"] for t in p["targets"]}
    assert {"1.5x", "2.0x", "4.0x"} <= targets
    plan = frontier.Plan([], runs)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    out = frontier_report.report("test", entries, plan, tmp_path / "plane.png", wandb=True)
    assert (tmp_path / "plane.png").is_file() and (tmp_path / "plane.json").is_file()
    logged = read_run(tmp_path / "wandb")["history"]
    assert any(k.startswith("frontier/plot") for k in logged) and any(k.startswith("frontier/points") for k in logged)
    comparisons = [c for c in out["comparisons"] if c["configuration"] == "romebert"]
    assert {(c["policy"], c["static"]) for c in comparisons} == {(p, "static-2") for p in POLICY_NAMES}
    modes = ("bs1", "batched")
    assert {(g["policy"], g["speed"]) for g in out["gains"]} == {(p, m) for p in POLICY_NAMES for m in modes}
    # A 4-layer tiny model on 2 epochs of 48 rows may sit at chance: then no goal is called met.
    for budget in out["budgets"]:
        chance = any(r["chance"] for r in out["points"] if r["configuration"] == "romebert")
        assert not (chance and budget["goal (>=2x bs=1, within 1 of plain)"])


POLICY_NAMES = ("entropy", "confidence", "patience")


def test_the_plane_arithmetic():
    sys.path.insert(0, str(REPO))
    from bench.frontier_report import interpolate, metric_value, paired_bootstrap

    curve = [(1.0, 86.0), (2.0, 85.0), (3.0, 82.0)]
    assert interpolate(curve, 1.5) == 85.5 and interpolate(curve, 3.5) is None
    labels = np.array([0, 1, 1, 0, 1])
    good = np.array([[2, 0], [0, 2], [0, 2], [2, 0], [0, 2]], dtype=float)
    bad = good[:, ::-1]
    assert metric_value("accuracy", good, labels) == 1.0 and metric_value("mcc", bad, labels) == -1.0
    ci = paired_bootstrap("accuracy", [(good, bad, labels)])
    assert ci["diff"] == 100.0 and ci["low"] == ci["high"] == 100.0


def test_the_lr_grid_keeps_the_default_unless_the_selection_split_says_otherwise(tmp_path, monkeypatch):
    """An lr replaces the default only when its gain on the selection split is clear of noise."""
    sys.path.insert(0, str(REPO))
    from bench import frontier_report

    monkeypatch.setattr(frontier_report, "RECORDS", tmp_path)
    monkeypatch.setattr(frontier_report, "BOOTSTRAP", 200)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    (tmp_path / "p").mkdir()

    def entry(name: str, lr: str | None, right: float) -> dict:
        """A one-exit run whose final exit answers ``right`` of the selection rows correctly."""
        correct = np.arange(len(labels)) < right * len(labels)
        pred = np.where(correct, labels, 1 - labels)
        logits = np.eye(2)[pred][None].astype(np.float32)
        np.savez(tmp_path / "p" / f"{name}.npz", select_logits=logits, select_labels=labels,
                 dev_logits=logits, dev_labels=labels)
        return {"name": name, "seed": 42, "arrays": f"p/{name}.npz", "exit_layers": [6],
                "overrides": ["model=bert", *([f"model.optimizer.lr={lr}"] if lr else [])],
                "per_exit": {"select": [float(correct.mean())], "dev": [float(correct.mean())]}}

    entries = [entry("plain", None, 0.80), entry("plain-lr5e-5", "5e-5", 0.81), entry("plain-lr2e-4", "2e-4", 0.90),
               entry("deebert", None, 0.80), entry("deebert-lr2e-4", "2e-4", 0.805), entry("static-2", None, 0.7)]
    rows = frontier_report.lr_grid(entries, "accuracy")
    chosen = {(r["objective"], r["lr"]) for r in rows if r["chosen"]}
    assert chosen == {("plain", "2e-4"), ("deebert", "default")}  # +10 points is clear; +0.5 is noise
    assert [r["lr"] for r in rows if r["objective"] == "plain"] == ["default", "5e-5", "2e-4"]
    assert rows[2]["select vs default [95% CI]"].startswith("+10.00 [")
    assert not any(r["objective"] == "static-2" for r in rows)
