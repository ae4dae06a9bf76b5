"""A tagger outside the training code: export, the PyTorch and ONNX runtimes (same tags and
exit layers, bs=1 and batched, every family), long sentences in windows, the endpoint, and
``mode=predict`` / ``mode=export`` from a trained checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient

from rbert.deploy import EarlyExitModel, OnnxEarlyExitModel, read_spec, save
from rbert.deploy.folder import DeploySpec
from rbert.deploy.server import Limits, create_app
from rbert.inference.policies import ConfidenceExit, EntropyExit, PatienceExit, entropy, policy_to_dict
from rbert.models import MultiExitTokenBert, load_encoder, load_tokenizer
from tests.backbone_files import FAMILIES, write_family
from tests.tagging_files import ENTITIES, FILLER, write_wnut
from tests.test_run import run_cli

TAGS = ["O", "B-location", "I-location", "B-person", "I-person"]
SENTENCES = [["john", "smith", "went", "to", "new", "york"], ["paris", "lol"], ["i", "saw", "acme", "today"] * 3,
             ["with", "john", "smith", "at", "paris", "today", "lol", "i", "went"], ["to"]]


def sharpen_tokens(net: MultiExitTokenBert, ids, mask, words, target: float = 0.5) -> MultiExitTokenBert:
    """Scale each exit so that the median over sentences of their largest word entropy is
    ``target``: then SENTEE's thresholds split the sentences over several exits."""
    with torch.no_grad():
        for head, z in zip(net.exits, net(ids, mask)):
            rows, cols = np.nonzero(words)
            low, high = 1e-3, 1e4
            for _ in range(60):
                mid = (low * high) ** 0.5
                worst = np.zeros(len(ids))
                np.maximum.at(worst, rows, entropy((z * mid).numpy()[rows, cols]) / np.log(z.shape[-1]))
                low, high = (mid, high) if np.median(worst) > target else (low, mid)
            head.classifier.weight.mul_(low)
            head.classifier.bias.mul_(low)
    return net.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tagger_folder(request, tmp_path_factory):
    """An exported tiny tagger of every family (the runtime parity test runs on each)."""
    return export_tagger(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def bert_tagger(tmp_path_factory):
    """One family's, for what does not depend on the family (windows, the endpoint, TOKEE's runtime)."""
    return export_tagger(tmp_path_factory, "bert")


def export_tagger(tmp_path_factory, family: str):
    root = tmp_path_factory.mktemp(f"tagger-{family}")
    folder = write_family(root, family)
    torch.manual_seed(0)
    net = MultiExitTokenBert(load_encoder(str(folder)), num_labels=len(TAGS)).eval()
    tokenizer = load_tokenizer(str(folder))
    enc = tokenizer(SENTENCES * 4, is_split_into_words=True, padding=True, return_tensors="pt")
    words = np.zeros(enc["input_ids"].shape, dtype=bool)
    for i in range(len(enc["input_ids"])):
        seen = set()
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in seen:
                seen.add(w)
                words[i, j] = True
    sharpen_tokens(net, enc["input_ids"], enc["attention_mask"], words)
    spec = DeploySpec(task="ner", text_fields=["words"], labels=TAGS, max_length=16, exit_layers=net.exit_layers,
                      trained_exits=net.exit_layers, consulted_exits=[2, 4], style="token", pooling="none",
                      policy=policy_to_dict(EntropyExit(0.6)), kind="tagging", scheme="bio")
    return save(root / "exported", net, tokenizer, spec)  # exits 2 and 4 consulted: two graphs to export


POLICIES = [EntropyExit(0.6), EntropyExit(0.3), ConfidenceExit(0.8), PatienceExit(1)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_onnx_and_pytorch_runtimes_answer_the_same_tags_and_exits(tagger_folder, policy):
    texts = SENTENCES * 4 + ["John Smith went to New York, then Paris!"]
    pt = EarlyExitModel.from_pretrained(tagger_folder, policy=policy)
    ox = OnnxEarlyExitModel.from_pretrained(tagger_folder, policy=policy)
    batched = pt.predict(texts, batch_size=8)
    assert ox.predict(texts, batch_size=8) == batched
    assert pt.predict(texts, batch_size=1) == batched == ox.predict(texts, batch_size=1)
    for answer, text in zip(batched, texts):
        assert len(answer["tags"]) == len(answer["words"]) and set(answer["tags"]) <= set(TAGS)
        if isinstance(text, list):
            assert answer["words"] == text
        previous = "O"
        for tag in answer["tags"]:  # BIO stays valid
            assert not tag.startswith("I-") or previous[2:] == tag[2:]
            previous = tag
    if isinstance(policy, EntropyExit) and policy.threshold > 0.5:  # above the sharpened median: some leave early
        assert min(a["exit_layer"] for a in batched) < pt.spec.exit_layers[-1]


def test_long_sentences_are_windowed_not_truncated(bert_tagger):
    tagger_folder = bert_tagger
    long = (["john", "smith"] + FILLER) * 8  # 80 words, max_length 16
    model = OnnxEarlyExitModel.from_pretrained(tagger_folder)
    (answer,) = model.predict([long])
    assert answer["words"] == long and len(answer["tags"]) == 80


def test_endpoint_answers_words_and_text_and_refuses_bad_requests(bert_tagger):
    tagger_folder = bert_tagger
    app = create_app(OnnxEarlyExitModel.from_pretrained(tagger_folder), Limits(max_texts=4))
    with TestClient(app) as client:
        ok = client.post("/predict", json={"texts": ["John Smith went to Paris.", ["new", "york"]]})
        assert ok.status_code == 200, ok.text
        first, second = ok.json()["predictions"]
        assert first["words"] == ["John", "Smith", "went", "to", "Paris", "."]  # the pre-tokenizer's split
        assert second["words"] == ["new", "york"] and len(second["tags"]) == 2
        for body, message in (({"texts": [["new", 3]]}, "texts[0]: expected a string"),
                              ({"texts": [[]]}, "texts[0]: no words"), ({"texts": ["   "]}, "texts[0]: no words"),
                              ({"texts": [["a", " "]]}, "an empty word")):
            bad = client.post("/predict", json=body)
            assert bad.status_code == 422 and message in bad.json()["error"], bad.text


def test_predict_and_export_from_a_trained_tagger(tmp_path):
    write_wnut(tmp_path)
    run_cli(tmp_path / "run", "task=ner_wnut17", "model=romebert", f"data_dir={tmp_path}", "data.batch_size=8",
            "trainer.max_epochs=3", "model.optimizer.lr=3e-3", "logger=none", "eval.after_train=false", "test=false")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    words = [w for words, _ in ENTITIES for w in words] * 20  # one long sentence: windows at max_length 32
    (tmp_path / "in.jsonl").write_text(json.dumps({"tokens": words}) + "\n" + json.dumps({"tokens": ["lol"]}) + "\n")
    run_cli(tmp_path / "predict", "mode=predict", "task=ner_wnut17", f"ckpt_path={ckpt}", f"data_dir={tmp_path}",
            f"predict.input={tmp_path / 'in.jsonl'}", f"predict.output={tmp_path / 'out.conll'}",
            "data.max_length=32")
    blocks = (tmp_path / "out.conll").read_text().strip().split("\n\n")
    assert [len(b.splitlines()) for b in blocks] == [len(words), 1]
    assert [line.split("\t")[0] for line in blocks[0].splitlines()] == words
    run_cli(tmp_path / "export", "mode=export", "task=ner_wnut17", f"ckpt_path={ckpt}", f"data_dir={tmp_path}",
            f"export_dir={tmp_path / 'exported'}", "exit_policy=patience")
    pt, ox = EarlyExitModel.from_pretrained(tmp_path / "exported"), OnnxEarlyExitModel.from_pretrained(
        tmp_path / "exported")
    texts = [["john", "smith", "went", "to", "paris"], "acme at new york lol"]
    assert pt.predict(texts) == ox.predict(texts)
    assert pt.spec.tagging and pt.spec.scheme == "bio"
    # token-level exit from the command line: an exit layer per word in predict's CoNLL and the export
    token_level = ["exit_policy=window_entropy", "exit_policy.threshold=0.5", "exit_policy.window=1"]
    run_cli(tmp_path / "predict-tokee", "mode=predict", "task=ner_wnut17", f"ckpt_path={ckpt}", f"data_dir={tmp_path}",
            f"predict.input={tmp_path / 'in.jsonl'}", f"predict.output={tmp_path / 'tokee.conll'}",
            "data.max_length=32", *token_level)
    lines = (tmp_path / "tokee.conll").read_text().strip().split("\n\n")[0].splitlines()
    assert len(lines) == len(words) and all(1 <= int(line.split("\t")[2]) <= 4 for line in lines)
    run_cli(tmp_path / "export-tokee", "mode=export", "task=ner_wnut17", f"ckpt_path={ckpt}", f"data_dir={tmp_path}",
            f"export_dir={tmp_path / 'tokee'}", "export_onnx=false", *token_level)
    (answer,) = EarlyExitModel.from_pretrained(tmp_path / "tokee").predict([words])
    assert answer["words"] == words and len(answer["exit_layers"]) == len(words)
    # int8: every graph quantised (token-level exit's too), each exit re-measured in words, the budget re-picked
    run_cli(tmp_path / "export-int8", "mode=export", "task=ner_wnut17", f"ckpt_path={ckpt}", f"data_dir={tmp_path}",
            f"export_dir={tmp_path / 'int8'}", "exit_policy=budget", "exit_policy.max_drop=5", "export_quantize=int8")
    spec = read_spec(tmp_path / "int8")
    record = spec.onnx["quantization"]
    assert record["per_exit"]["metric"] == "f1" and len(record["per_exit"]["int8"]) == len(spec.consulted_exits)
    assert spec.policy_choice["on"] == "int8 graphs"
    for graph in [*spec.onnx["segments"], *spec.onnx["halted"]]:
        nodes = onnx.load(str(tmp_path / "int8" / graph["file"])).graph.node
        assert "MatMulInteger" in {node.op_type for node in nodes}, graph
    for policy in (None, {"name": "window_entropy", "threshold": 0.5, "window": 1}):
        int8 = OnnxEarlyExitModel.from_pretrained(tmp_path / "int8", policy=policy).predict(texts)
        fp32 = EarlyExitModel.from_pretrained(tmp_path / "int8", policy=policy).predict(texts)
        tags = [(x, y) for a, b in zip(int8, fp32) for x, y in zip(a["tags"], b["tags"])]
        assert [a["words"] for a in int8] == [a["words"] for a in fp32]
        assert np.mean([x == y for x, y in tags]) >= 0.9, (policy, int8, fp32)


def test_token_level_exit_runs_on_the_pytorch_runtime(bert_tagger):
    tagger_folder = bert_tagger
    from rbert.inference.policies import NoExit

    texts = SENTENCES * 2 + [(["john", "smith"] + FILLER) * 8]  # the last one in windows
    full = EarlyExitModel.from_pretrained(tagger_folder, policy=NoExit()).predict(texts)
    never = EarlyExitModel.from_pretrained(tagger_folder, policy={"name": "window_entropy", "threshold": 0.0})
    assert [a["tags"] for a in never.predict(texts)] == [a["tags"] for a in full]
    tokee = EarlyExitModel.from_pretrained(tagger_folder, policy={"name": "window_entropy", "threshold": 0.6,
                                                                  "window": 1})
    answers = tokee.predict(texts, batch_size=4)
    assert answers == tokee.predict(texts, batch_size=1)
    for answer in answers:
        assert len(answer["exit_layers"]) == len(answer["words"]) and answer["exit_layer"] == max(answer["exit_layers"])
    assert len({layer for a in answers for layer in a["exit_layers"]}) > 1  # words leave at different exits


@pytest.mark.parametrize("rule", [{"threshold": 0.6, "window": 1}, {"threshold": [0.3, 0.7], "window": 0}])
def test_token_level_exit_on_onnx_answers_what_pytorch_does(tagger_folder, rule):
    policy = {"name": "window_entropy", **rule}
    texts = SENTENCES * 2 + [(["john", "smith"] + FILLER) * 8, "John Smith went to New York, then Paris!"]
    answers = EarlyExitModel.from_pretrained(tagger_folder, policy=policy).predict(texts, batch_size=4)
    assert OnnxEarlyExitModel.from_pretrained(tagger_folder, policy=policy).predict(texts, batch_size=4) == answers
    assert len({layer for a in answers for layer in a["exit_layers"]}) > 1  # words leave at different exits


def test_onnx_refuses_token_level_exit_without_its_graphs(bert_tagger, tmp_path):
    from rbert.deploy import FolderError

    old = tmp_path / "old"
    shutil.copytree(bert_tagger, old)
    config = json.loads((old / "config.json").read_text())
    del config["rbert_early_exit"]["onnx"]["halted"]  # a folder exported before the per-layer graphs
    (old / "config.json").write_text(json.dumps(config))
    OnnxEarlyExitModel.from_pretrained(old)  # sentence-level exit still runs
    with pytest.raises(FolderError, match="token-level early exit.*needs the per-layer graphs"):
        OnnxEarlyExitModel.from_pretrained(old, policy={"name": "window_entropy", "threshold": 0.5})
