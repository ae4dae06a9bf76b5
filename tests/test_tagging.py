"""Sequence labelling: readers and their quirks, bad input, word pieces, windows, BIO decoding,
seqeval agreement, parity with transformers' token classifiers, and training end to end."""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
import torch
import transformers
import yaml

from rbert.data.tagging import TaggingDataModule, encode_sentences
from rbert.data.tagging_files import Sentence, check_bio, read_conll, read_conllu, read_jsonl
from rbert.data.tasks import TaggingTask
from rbert.errors import ConfigError
from rbert.inference.words import IGNORE, bio_transitions, decode_rows, viterbi, word_windows
from rbert.metrics import EntityF1
from rbert.models import BertForTokenClassification, MultiExitTokenBert, load_encoder, load_tokenizer
from tests.backbone_files import FAMILIES, family_batch, write_family
from tests.conftest import REPO
from tests.tagging_files import POS, write_ewt, write_jsonl, write_wnut
from tests.test_run import run_cli


def tagging_task(name: str, **overrides) -> TaggingTask:
    fields = yaml.safe_load((REPO / "conf" / "task" / f"{name}.yaml").read_text())
    fields.pop("_target_"), fields.pop("defaults")
    fields.update(overrides)
    return TaggingTask(**fields)


def datamodule(task, data_dir, **kw) -> TaggingDataModule:
    dm = TaggingDataModule(task, backbone="tiny", data_dir=str(data_dir) if data_dir else None, batch_size=8, **kw)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def tag_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagging")
    write_ewt(root), write_wnut(root)
    return root


# ---------------------------------------------------------------------------- readers
def test_conllu_words_skip_ranges_and_empty_nodes(tag_dir):
    path = tag_dir / "UD_English-EWT" / "en_ewt-ud-train.conllu"
    sentences = read_conllu(path, "upos")
    assert len(sentences) == 48
    first = sentences[0]  # has a range 2-3 and an empty node 1.1
    assert "ghost" not in first.words and all(POS[w] == t for w, t in zip(first.words, first.tags))
    lines = path.read_text().splitlines()
    for word, line in zip(first.words, first.lines):
        assert lines[line - 1].split("\t")[1] == word  # line numbers point at the word's own line
    assert read_conllu(path, "xpos")[0].tags == ["XX"] * len(first.words)


def test_conll_lone_tab_separates_sentences_and_docstart_is_skipped(tag_dir, tmp_path):
    train = read_conll(tag_dir / "WNUT17" / "wnut17train.conll")
    assert len(train) == 48
    path = tmp_path / "c.txt"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
    sentences = read_conll(path, tag_column=-1)
    assert [s.words for s in sentences] == [["EU", "rejects"], ["Peter"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O"], ["B-PER"]]
    assert read_conll(path, tag_column=1)[0].tags == ["NNP", "VBZ"]


def test_jsonl_reader(tmp_path):
    sentences = read_jsonl(write_jsonl(tmp_path / "t.jsonl", n=5))
    assert len(sentences) == 5 and all(len(s.words) == len(s.tags) for s in sentences)


@pytest.mark.parametrize("text, reader, message", [
    ("a\tO\nb\tO\tX\n", read_conll, r"c\.txt:2: 3 column\(s\) where the file's first word line has 2"),
    ("a\tO\n", lambda p: read_conll(p, tag_column=5), r"c\.txt:1: task\.tag_column=5 but the file has 2"),
    ("1\tdog\tdog\tNOUN\n", read_conllu, r"c\.txt:1: 4 tab-separated column\(s\); a CoNLL-U word line has 10"),
    ("1\tdog\tdog\t_\t_\t_\t0\troot\t_\t_\n", read_conllu, r"c\.txt:1: no upos for word 'dog'"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', read_jsonl, r"c\.txt:1: 2 tokens but 1 tags"),
    ('{"tokens": "a b", "tags": []}\n', read_jsonl, r"c\.txt:1: 'tokens' must be a list of strings"),
    ("not json\n", read_jsonl, r"c\.txt:1: not JSON"),
])
def test_bad_files_name_file_and_line(tmp_path, text, reader, message):
    path = tmp_path / "c.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        reader(path)


def test_bio_errors_and_repair(tmp_path):
    bad = [Sentence(["a", "b", "c"], ["O", "I-person", "I-person"], [3, 4, 5])]
    with pytest.raises(ConfigError, match=r"f\.txt:4: I-person follows O .*task\.bad_bio=repair"):
        check_bio("f.txt", bad)
    assert check_bio("f.txt", bad, repair=True) == 1 and bad[0].tags == ["O", "B-person", "I-person"]
    with pytest.raises(ConfigError, match=r"f\.txt:7: I-group follows B-person"):
        check_bio("f.txt", [Sentence(["a", "b"], ["B-person", "I-group"], [6, 7])])
    with pytest.raises(ConfigError, match=r"f\.txt:1: tag 'PER' is not O, B-<type> or I-<type>"):
        check_bio("f.txt", [Sentence(["a"], ["PER"], [1])])


def test_a_dev_tag_that_train_lacks_names_file_and_line(tag_dir, tmp_path):
    folder = tmp_path / "WNUT17"
    folder.mkdir()
    (folder / "wnut17train.conll").write_text((tag_dir / "WNUT17" / "wnut17train.conll").read_text())
    (folder / "emerging.dev.conll").write_text("x\tO\ny\tB-animal\n")
    task = tagging_task("tagging", splits={"train": "wnut17train.conll", "val": "emerging.dev.conll"},
                        num_labels=6)
    with pytest.raises(ConfigError, match=r"emerging\.dev\.conll:2: tag 'B-animal' is not one of task tagging's 6"):
        datamodule(task, folder)


def test_tags_from_the_training_file_must_match_num_labels(tag_dir):
    task = tagging_task("tagging", splits={"train": "wnut17train.conll", "val": "emerging.dev.conll"},
                        num_labels=9)
    with pytest.raises(ConfigError, match=r"the training file has 6 tags .* but num_labels=9"):
        datamodule(task, tag_dir / "WNUT17")
    task = tagging_task("tagging", splits={"train": "wnut17train.conll", "val": "emerging.dev.conll"},
                        num_labels=6)
    datamodule(task, tag_dir / "WNUT17")
    assert task.labels[0] == "O" and task.labels[1:] == sorted(task.labels[1:])


def test_task_options_are_checked(tag_dir):
    with pytest.raises(ConfigError, match="metric f1 is entity-level F1 and needs task.scheme=bio"):
        tagging_task("pos_ewt", metrics=["f1"], monitor="f1")
    with pytest.raises(ConfigError, match="task.format 'xml'"):
        tagging_task("pos_ewt", format="xml")
    with pytest.raises(ConfigError, match=r"task.tag_field: 'pos' is not a CoNLL-U field"):
        datamodule(tagging_task("pos_ewt", tag_field="pos"), tag_dir)


# ---------------------------------------------------------------------------- pieces and windows
def test_windows_cover_every_word_once_and_fit_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        words = [[rng.randrange(100, 200) for _ in range(rng.randint(0, 4))] for _ in range(rng.randint(1, 40))]
        budget = rng.randint(4, 20)
        windows = word_windows(words, budget, unk_id=1)
        owners = [0] * len(words)
        for w in windows:
            assert len(w.pieces) <= budget and w.stop > w.start
            for offset, owned in enumerate(w.owned):
                owners[w.start + offset] += owned
                piece = w.pieces[w.first[offset]]
                assert piece == (words[w.start + offset] or [1])[0]  # a word without pieces gets unk
        assert owners == [1] * len(words)
        assert windows[0].start == 0 and windows[-1].stop == len(words)


def test_first_pieces_carry_the_labels_and_long_sentences_are_windowed():
    tokenizer = load_tokenizer("tiny")
    words = ["unbelievably", "the", "dog", "sleeps", "."] * 12
    sentence = Sentence(words, [POS.get(w, "ADV") for w in words], [1] * len(words))
    tag_ids = {t: i for i, t in enumerate(sorted(set(POS.values())))}
    rows, windowed = encode_sentences(tokenizer, [sentence], tag_ids, max_length=16)
    assert windowed == 1 and len(rows["input_ids"]) > 4
    labelled = [lab for row in rows["labels"] for lab in row if lab != IGNORE]
    assert len(labelled) == len(words)  # every word exactly once
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        assert len(ids) <= 16 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert labels[0] == labels[-1] == IGNORE
        for piece, label in zip(ids, labels):
            if label != IGNORE:
                assert not tokenizer.convert_ids_to_tokens(piece).startswith("##")
    rows, windowed = encode_sentences(tokenizer, [sentence], tag_ids, max_length=128)
    assert windowed == 0 and len(rows["input_ids"]) == 1


def test_datamodule_batches_and_selection_by_sentence(tag_dir):
    task = tagging_task("pos_ewt")
    dm = datamodule(task, tag_dir, max_length=8, select_rows=10)
    assert len(set(dm.splits["select"]["sentence"])) == 10
    assert not set(dm.splits["select"]["sentence"]) & set(dm.splits["train"]["sentence"])
    assert dm.windowed["train"] > 0
    batch = next(iter(dm.train_dataloader()))
    assert {"input_ids", "attention_mask", "labels", "sentence", "window"} <= set(batch)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_hub_path_and_its_class_label_names(monkeypatch):
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=[
                                      "O", "B-location", "I-location", "B-person", "I-person"]))})
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_dict({"tokens": [["paris", "is", "big"], ["john", "smith"]],
                                           "ner_tags": [[1, 0, 0], [3, 4]]}, features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = tagging_task("ner_wnut17")
    dm = datamodule(task, None)
    assert ("wnut_17", "train") in calls and ("wnut_17", "validation") in calls
    labels = [lab for row in dm.splits["train"]["labels"] for lab in row if lab != IGNORE]
    assert [task.labels[i] for i in labels] == ["B-location", "O", "O", "B-person", "I-person"]


def test_data_dir_defaults_per_task_kind(monkeypatch, tag_dir, glue_dir):
    from hydra import compose, initialize_config_dir

    import rbert.launch  # noqa: F401  (registers the rbert.* resolvers)

    monkeypatch.setenv("RBERT_DATA_DIR", str(glue_dir))
    monkeypatch.setenv("RBERT_TAGGING_DIR", str(tag_dir))
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        assert compose("config", ["task=pos_ewt"]).data.data_dir == str(tag_dir)
        assert compose("config", ["task=pos_ewt"]).data._target_.endswith("TaggingDataModule")
        assert compose("config", ["task=sst2"]).data.data_dir == str(glue_dir)
        assert compose("config", ["task=sst2", "data_dir=/x"]).data.data_dir == "/x"
        assert compose("config", ["task=ner_wnut17", "data_dir=/y"]).data.data_dir == "/y"


# ---------------------------------------------------------------------------- decoding and metrics
def test_viterbi_keeps_bio_valid_and_equals_argmax_when_valid():
    tags = ["O", "B-a", "I-a", "B-b", "I-b"]
    allowed, first = bio_transitions(tags)
    rng = np.random.default_rng(0)
    for _ in range(200):
        logits = rng.normal(size=(rng.integers(1, 9), len(tags))) * 3
        path = [tags[i] for i in viterbi(logits, allowed, first)]
        prev = "O"
        for tag in path:
            assert not tag.startswith("I-") or prev[2:] == tag[2:]
            prev = tag
        greedy = [tags[i] for i in logits.argmax(-1)]
        valid = all(not t.startswith("I-") or p[2:] == t[2:] for p, t in zip(["O"] + greedy, greedy))
        if valid:
            assert path == greedy
    words = np.array([[True, False, True, True]])
    out = decode_rows(rng.normal(size=(1, 4, 5)), words, None)
    assert out[0, 1] == IGNORE and (out[0, words[0]] >= 0).all()


def test_entity_f1_agrees_with_seqeval_across_windows_and_row_order():
    from seqeval.metrics import classification_report, f1_score

    task = tagging_task("ner_wnut17")
    rng = random.Random(0)
    gold, pred = [], []
    for _ in range(40):
        n = rng.randint(1, 12)
        g = [rng.choice(task.labels) for _ in range(n)]
        gold.append(g), pred.append([t if rng.random() < 0.7 else rng.choice(task.labels) for t in g])
    ids = {t: i for i, t in enumerate(task.labels)}
    # Each sentence as two windows (the second may be empty), rows in shuffled order, padded.
    rows = []
    for s, (g, p) in enumerate(zip(gold, pred)):
        cut = rng.randint(0, len(g))
        rows += [(s, 0, g[:cut], p[:cut]), (s, 1, g[cut:], p[cut:])]
    rng.shuffle(rows)
    width = 26
    target = torch.full((len(rows), width), IGNORE)
    preds = torch.full((len(rows), width), IGNORE)
    for r, (_, _, g, p) in enumerate(rows):
        for k, (gt, pt) in enumerate(zip(g, p)):
            target[r, 2 * k + 1], preds[r, 2 * k + 1] = ids[gt], ids[pt]  # every other piece: a word's first
    sentence = torch.tensor([r[0] for r in rows])
    window = torch.tensor([r[1] for r in rows])
    metric, person = EntityF1(task), EntityF1(task, "person")
    for half in (slice(0, 30), slice(30, None)):  # two batches
        for m in (metric, person):
            m.update(preds[half], target[half], sentence[half], window[half])
    assert metric.compute().item() == pytest.approx(f1_score(gold, pred))
    expected = classification_report(gold, pred, output_dict=True, zero_division=0)["person"]["f1-score"]
    assert person.compute().item() == pytest.approx(expected)


# ---------------------------------------------------------------------------- models
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_classifier_matches_transformers(family, tmp_path):
    folder = write_family(tmp_path, family)
    hf_class = {"bert": "BertForTokenClassification", "roberta": "RobertaForTokenClassification",
                "xlm-roberta": "XLMRobertaForTokenClassification", "distilbert": "DistilBertForTokenClassification",
                "albert": "AlbertForTokenClassification", "electra": "ElectraForTokenClassification"}[family]
    reference = getattr(transformers, hf_class).from_pretrained(folder, num_labels=5).eval()
    ours = BertForTokenClassification(load_encoder(str(folder)), num_labels=5).eval()
    ours.classifier.load_state_dict(reference.classifier.state_dict())
    ids, mask, types = family_batch(family)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max() < 1e-5
    multi = MultiExitTokenBert.from_classifier(ours).eval()
    with torch.no_grad():
        assert torch.equal(multi(ids, mask)[-1], got)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("model", ["bert", "romebert", "deebert", "pabee"])
def test_pos_trains_with_every_objective(model, tag_dir, tmp_path):
    run_cli(tmp_path, "task=pos_ewt", f"model={model}", f"data_dir={tag_dir}", "data.batch_size=8",
            "trainer.max_epochs=3", "model.optimizer.lr=3e-3", "logger=none", "eval.after_train=false")
    results = json.loads((tmp_path / "results.json").read_text())["test"]
    # The tiny task's tag is a function of the word: the final exit learns it.
    assert results["test/accuracy"] > 0.6, results
    if model != "bert":
        assert "test/exit_1/accuracy" in results


def test_ner_reports_entity_f1_per_type_and_static_depth_works(tag_dir, tmp_path):
    run_cli(tmp_path, "task=ner_wnut17", "model=bert", f"data_dir={tag_dir}", "data.batch_size=8",
            "trainer.max_epochs=4", "model.optimizer.lr=3e-3", "model.net.bert.num_layers=2", "logger=none",
            "eval.after_train=false")
    results = json.loads((tmp_path / "results.json").read_text())["test"]
    assert {"test/f1", "test/accuracy", "test/f1_person", "test/f1_location"} <= set(results)
    assert results["test/f1"] > 0.3, results


# ---------------------------------------------------------------------------- SENTEE
def token_batch(seed: int = 0, batch: int = 6, width: int = 14):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, width + 1, (batch,), generator=gen)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, 2000, (batch, width), generator=gen) * mask
    words = (torch.rand(batch, width, generator=gen) < 0.7) & mask.bool()
    words[:, 0] = False  # [CLS]
    return ids, mask, words


def spread_token_exits(seed: int = 0) -> MultiExitTokenBert:
    """A tiny multi-exit tagger whose exits are sharp enough that sentences leave at several layers."""
    torch.manual_seed(seed)
    net = MultiExitTokenBert(load_encoder("tiny"), num_labels=5).eval()
    with torch.no_grad():
        for i, head in enumerate(net.exits):
            head.classifier.weight.mul_(4.0 * (i + 1))
    return net


@pytest.mark.parametrize("policy_name", ["entropy", "confidence", "patience"])
def test_sentee_engine_matches_simulation_and_single_sentences(policy_name):
    from rbert.inference.engine import EarlyExit, simulate
    from rbert.inference.policies import ConfidenceExit, EntropyExit, PatienceExit

    net = spread_token_exits()
    if policy_name == "patience":  # exits that mostly agree: some sentences keep their tags
        with torch.no_grad():
            for head in net.exits:
                head.classifier.weight.mul_(0.05 / head.classifier.weight.abs().mean())
                head.classifier.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    ids, mask, words = token_batch()
    with torch.no_grad():
        every = net(ids, mask)
    # A threshold at the median of the sentences' scores at exit 2, so that some leave early.
    rows, cols = np.nonzero(words.numpy())
    from rbert.inference.policies import entropy
    ent = entropy(every[1].numpy()[rows, cols]) / np.log(5)
    worst = np.zeros(len(ids))
    np.maximum.at(worst, rows, ent)
    policy = {"entropy": EntropyExit(float(np.median(worst)) + 1e-6),
              "confidence": ConfidenceExit(0.5), "patience": PatienceExit(1)}[policy_name]
    expected = simulate(policy, every, net.exit_layers, words)
    engine = EarlyExit(net, policy)
    got = engine(ids, mask, words=words)
    assert torch.equal(got.exit_layer, expected.exit_layer)
    assert len(set(got.exit_layer.tolist())) > 1 or policy_name == "confidence"
    keep = mask.bool()
    assert (got.logits[keep] - expected.logits[keep]).abs().max() < 1e-4
    for i in range(len(ids)):  # each sentence alone, its padding cut
        n = int(mask[i].sum())
        alone = engine(ids[i:i + 1, :n], mask[i:i + 1, :n], words=words[i:i + 1, :n])
        assert alone.exit_layer.item() == got.exit_layer[i].item()
        assert (alone.logits[0] - got.logits[i, :n]).abs().max() < 1e-4


def test_frontier_evaluates_a_tagger_and_reports_the_plane(tag_dir, tmp_path, monkeypatch):
    """SENTEE on the frontier bench: per-exit metrics, timed points with the token reference,
    per-sentence counts that give back the dev metric, and the report's bootstrap on them."""
    import sys

    sys.path.insert(0, str(REPO))
    import bench.frontier as frontier
    from bench import frontier_report

    common = ["task=ner_wnut17", f"data_dir={tag_dir}", "trainer.max_epochs=3", "model.optimizer.lr=3e-3",
              "eval.after_train=false", "data.batch_size=8", "data.select_rows=12", "logger=none"]
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
        assert result["metric"] == "f1" and len(result["per_exit"]["dev"]) == len(result["exit_layers"])
        for point in result["points"]:
            stats = arrays[point["stats"]]
            assert stats.shape == (16, 3)  # dev sentences x (right, predicted, gold)
            assert frontier_report.metric_value("f1", stats, None) == pytest.approx(point["dev_metric"])
            assert point["speedup_bs1"] > 0 and point["speedup_batched"] > 0
    assert {p["policy"] for p in entries[2]["points"]} == {"entropy", "confidence", "patience"}
    out = frontier_report.report("test", entries, frontier.Plan([], runs), tmp_path / "plane.png")
    assert (tmp_path / "plane.png").is_file() and out["gains"]


def test_parity_anchor_trains_transformers_on_the_same_rows_and_reports(tag_dir, tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(REPO))
    import bench.tagging_anchor as anchor
    from bench.frontier import Plan
    from bench.runs import RunRecord

    monkeypatch.setitem(anchor.PLANS, "pos_ewt", Plan(
        ["task=pos_ewt", f"data_dir={tag_dir}", "data.select_rows=8", "trainer.max_epochs=2", "backbone=tiny",
         "model.optimizer.lr=3e-3", "data.batch_size=8"], {}))
    monkeypatch.setattr(anchor, "RECORDS", tmp_path)
    monkeypatch.setattr(anchor, "RESULTS", tmp_path)
    monkeypatch.setattr(anchor, "SUMMARIES", tmp_path)
    anchor.run(type("Args", (), {"plan": "pos_ewt", "seeds": [42]}))
    (entry,) = RunRecord(tmp_path / "tagging_anchor_pos_ewt.jsonl").entries()
    assert entry["best_epoch"] in (1, 2) and entry["dev"]["accuracy"] > 0.5 and len(entry["select_by_epoch"]) == 2
    RunRecord(tmp_path / "pos_ewt.jsonl").add({"key": "plain-s42", "name": "plain", "seed": 42, "metric": "accuracy",
                                               "per_exit": {"dev": [0.9]}, "train_seconds": 60.0})
    summary = anchor.report(type("Args", (), {"plan": "pos_ewt"}))
    assert summary["mean_diff"] == pytest.approx(90.0 - 100 * entry["dev"]["accuracy"])
