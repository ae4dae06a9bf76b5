"""Deployment: the exported folder, the Hydra-free PyTorch loader and the onnxruntime runtime
agree with the PyTorch early-exit engine, on every policy and every backbone family."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rbert.deploy import DeploySpec, EarlyExitModel, FolderError, OnnxEarlyExitModel, read_spec, save
from rbert.deploy.folder import write_folder
from rbert.inference.engine import early_exit
from rbert.inference.policies import ConfidenceExit, EntropyExit, FixedExit, NoExit, PatienceExit, policy_to_dict
from rbert.models import MultiExitBert, load_encoder, load_tokenizer
from tests.backbone_files import FAMILIES, family_batch, sharpen, spread_multi_exit, write_family
from tests.test_inference import padded_batch, tiny_model

POLICIES = [EntropyExit(0.3), EntropyExit(0.6), ConfidenceExit(0.8), PatienceExit(1), PatienceExit(2), FixedExit(2),
            NoExit()]


def spec_for(net: MultiExitBert, consulted=None, policy=None, labels=("a", "b", "c"), fields=("sentence",)):
    return DeploySpec(task="test", text_fields=list(fields), labels=list(labels), max_length=32,
                      exit_layers=list(net.exit_layers), trained_exits=list(net.exit_layers),
                      consulted_exits=list(consulted or net.exit_layers), style=net.style, pooling=net.pooling,
                      policy=policy_to_dict(policy or EntropyExit(0.3)), objective="RomeBERT")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny 4-layer, 3-class multi-exit model whose exits really disagree on the test batch
    (:func:`sharpen`), exported with every exit consulted."""
    net = sharpen(tiny_model(num_labels=3, pooling="mean"), *padded_batch())
    folder = save(tmp_path_factory.mktemp("export") / "model", net, load_tokenizer("tiny"), spec_for(net))
    return net, folder


def numpy_batch():
    ids, mask, types = padded_batch()
    return ids.numpy(), mask.numpy(), types.numpy()


def expected(net, policy, ids, mask, types, consulted=None):
    return early_exit(net, policy, torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types),
                      exit_layers=consulted)


def graph_feeds(runtime) -> list[tuple[int, int]]:
    """(rows, mask length) of every segment graph call of ``runtime`` from now on."""
    seen = []
    for _, session in getattr(runtime, "segments", []):
        run = session.run
        session.run = lambda out, feeds, run=run: seen.append(feeds["attention_mask"].shape) or run(out, feeds)
    return seen


def assert_same(runtime, net, policy, consulted=None, batch=None):
    """Batched (padding, uneven lengths) and one sample at a time: same exit layers and labels,
    logits within 1e-4; an early-exit policy leaves at two exits at least; on onnxruntime each
    later graph runs on the rows still running, cut to the longest of them."""
    ids, mask, types = batch or numpy_batch()
    want = expected(net, policy, ids, mask, types, consulted)
    if not isinstance(policy, (NoExit, FixedExit)):
        assert want.exit_layer.unique().numel() >= 2, (policy.describe(), want.exit_layer.tolist())
    seen = graph_feeds(runtime)
    logits, layers = runtime.run(ids, mask, types)
    assert layers.tolist() == want.exit_layer.tolist(), policy.describe()
    assert logits.argmax(-1).tolist() == want.logits.argmax(-1).tolist()
    np.testing.assert_allclose(logits, want.logits.numpy(), atol=1e-4, rtol=1e-4)
    if seen:  # the segment runtime (batched): rows dropped and padding cut between graphs
        exits = consulted or net.exit_layers
        graphs = seen[:len(exits)]
        for k, (rows, length) in enumerate(graphs):
            running = layers >= (exits[k - 1] + 1 if k else 1)
            assert rows == int(running.sum()) and length == int(mask[running].sum(axis=1).max()), (k, graphs)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        one_logits, one_layer = runtime.run(ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
        assert one_layer.tolist() == [want.exit_layer[i].item()], (policy.describe(), i)
        np.testing.assert_allclose(one_logits[0], want.logits[i].numpy(), atol=1e-4, rtol=1e-4)
    return want.exit_layer


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
@pytest.mark.parametrize("runtime", ["onnx", "onnx segments", "torch"])
def test_runtime_matches_the_engine_for_every_policy(policy, runtime, exported):
    """"onnx" runs one composed graph at batch size 1 where the policy compiles, "onnx
    segments" one graph an exit at every batch size."""
    net, folder = exported
    if runtime == "torch":
        model = EarlyExitModel.from_pretrained(folder, policy=policy)
    else:
        model = OnnxEarlyExitModel.from_pretrained(folder, policy=policy, fused=runtime == "onnx")
    assert_same(model, net, policy)


class StricterEntropy(EntropyExit):
    """A user's policy: a subclass may decide otherwise, so it must not be compiled."""

    def decide_one(self, logits, layer, state):
        return False, state


def test_one_sample_runs_one_composed_graph_where_the_policy_compiles(exported):
    _, folder = exported
    ids, mask, types = numpy_batch()
    n = int(mask[0].sum())
    one = (ids[:1, :n], mask[:1, :n], types[:1, :n])
    for policy, composed in ((EntropyExit(0.3), True), (ConfidenceExit(0.8), True), (FixedExit(2), True),
                             (NoExit(), True), (PatienceExit(1), False), (StricterEntropy(0.3), False)):
        model = OnnxEarlyExitModel.from_pretrained(folder, policy=policy)
        assert (model.fused is not None) == composed, policy.describe()
        calls = []
        for _, session in model.segments:
            run = session.run
            session.run = lambda out, feeds, run=run, calls=calls: calls.append(1) or run(out, feeds)
        model.run(*one)
        assert (not calls) == composed, policy.describe()
        calls.clear()
        model.run(ids, mask, types)  # batched: always segment by segment
        assert calls, policy.describe()
    assert OnnxEarlyExitModel.from_pretrained(folder, fused=False).fused is None


def test_the_parity_above_covers_a_mix_of_exit_layers(exported):
    """Every early-exit policy of the parity test splits the batch over several exits."""
    net, _ = exported
    ids, mask, types = numpy_batch()
    mixes = {p.describe(): expected(net, p, ids, mask, types).exit_layer.unique().numel() for p in POLICIES[:5]}
    assert min(mixes.values()) >= 2 and max(mixes.values()) >= 3, mixes


def test_exported_policy_answers_by_default_and_rows_are_dropped(exported):
    net, folder = exported
    assert OnnxEarlyExitModel.from_pretrained(folder).policy.describe() == EntropyExit(0.3).describe()
    model = OnnxEarlyExitModel.from_pretrained(folder, policy=PatienceExit(1))
    seen = []
    for _, session in model.segments:  # count the rows each graph runs on
        run = session.run
        session.run = lambda out, feeds, run=run: seen.append(feeds["attention_mask"].shape[0]) or run(out, feeds)
    ids, mask, types = numpy_batch()
    _, layers = model.run(ids, mask, types)
    assert seen == [int((layers >= n).sum()) for n in range(1, len(seen) + 1)] and seen[-1] < seen[0]


def test_pabee_style_with_cls_pooling_and_a_subset_of_exits(tmp_path):
    torch.manual_seed(0)
    net = sharpen(MultiExitBert(load_encoder("tiny"), 2, style="pabee", pooling="cls"), *padded_batch())
    folder = save(tmp_path / "m", net, load_tokenizer("tiny"), spec_for(net, [2, 3, 4], labels=("n", "y")))
    assert [s.exit for s in read_spec(folder).segments] == [2, 3, 4]
    for policy in (PatienceExit(1), EntropyExit(0.5)):  # patience(1) can leave at 3 (exits 2 and 3 agree)
        for fused in (True, False):
            runtime = OnnxEarlyExitModel.from_pretrained(folder, policy=policy, fused=fused)
            layers = assert_same(runtime, net, policy, [2, 3, 4])
            assert set(layers.tolist()) <= {2, 3, 4}


def test_predict_answers_label_probabilities_and_exit_layer(exported):
    net, folder = exported
    texts = ["a fine film", "dull", "the quick brown fox jumps over the lazy dog, twice over", "ok"]
    onnx = OnnxEarlyExitModel.from_pretrained(folder).predict(texts, batch_size=3)
    torch_answers = EarlyExitModel.from_pretrained(folder).predict(texts)
    assert len(onnx) == len(texts)
    for a, b in zip(onnx, torch_answers):
        assert set(a) == {"label", "probabilities", "exit_layer"}
        assert a["label"] == b["label"] == max(a["probabilities"], key=a["probabilities"].get)
        assert a["exit_layer"] == b["exit_layer"] and 1 <= a["exit_layer"] <= 4
        assert abs(sum(a["probabilities"].values()) - 1) < 1e-6
        assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-4 for k in a["probabilities"])
    with pytest.raises(ValueError, match=r"texts\[1\]: expected a string"):
        OnnxEarlyExitModel.from_pretrained(folder).predict(["fine", ["a", "pair"]])


def test_pairs_and_regression(tmp_path):
    torch.manual_seed(0)
    net = MultiExitBert(load_encoder("tiny"), 1).eval()
    folder = save(tmp_path / "m", net, load_tokenizer("tiny"),
                  spec_for(net, policy=PatienceExit(2, tolerance=0.5), labels=(), fields=("sentence1", "sentence2")))
    answers = OnnxEarlyExitModel.from_pretrained(folder).predict([["a man sings", "a person sings"], ["x", "y"]])
    assert [set(a) for a in answers] == [{"score", "exit_layer"}] * 2
    with pytest.raises(ValueError, match=r"texts\[0\]: expected a list of 2 strings \(sentence1, sentence2\)"):
        EarlyExitModel.from_pretrained(folder).predict(["only one"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_and_runs_on_onnxruntime(family, tmp_path):
    """Per family and policy, on onnxruntime (the composed graph at batch size 1 for entropy
    and confidence, one graph an exit for patience and batched), batched and one sample at a
    time: the engine's exits, labels and logits, with rows leaving at several exits; the
    PyTorch runtime on the folder's weights; and a subset of exits consulted."""
    batch = family_batch(family)
    net = sharpen(spread_multi_exit(write_family(tmp_path, family)), *batch)
    batch = tuple(t.numpy() for t in batch)
    folder = save(tmp_path / "export", net, load_tokenizer("minilm"), spec_for(net, policy=EntropyExit(0.6)))
    for policy in (EntropyExit(0.6), ConfidenceExit(0.8), PatienceExit(1)):
        assert_same(OnnxEarlyExitModel.from_pretrained(folder, policy=policy), net, policy, batch=batch)
    policy = EntropyExit(0.6)
    assert_same(EarlyExitModel.from_pretrained(folder), net, policy, batch=batch)
    subset = save(tmp_path / "subset", net, load_tokenizer("minilm"), spec_for(net, [2, 4]))
    assert read_spec(subset).consulted_exits == [2, 4]
    policy = EntropyExit(0.6)
    assert_same(OnnxEarlyExitModel.from_pretrained(subset, policy=policy, fused=False), net, policy, [2, 4], batch)


# ---------------------------------------------------------------------------- the folder is data
def test_single_exit_classifier_exports_as_its_final_exit(tmp_path):
    from rbert.models import BertForSequenceClassification

    torch.manual_seed(0)
    classifier = BertForSequenceClassification(load_encoder("tiny"), 2, pooling="mean").eval()
    net = MultiExitBert.from_classifier(classifier).eval()
    ids, mask, types = map(torch.from_numpy, numpy_batch())
    with torch.no_grad():
        torch.testing.assert_close(net(ids, mask, types)[-1], classifier(ids, mask, types))
    folder = save(tmp_path / "m", net, load_tokenizer("tiny"), spec_for(net, policy=NoExit(), labels=("n", "y")))
    logits, layers = OnnxEarlyExitModel.from_pretrained(folder).run(*numpy_batch())
    assert set(layers.tolist()) == {4}
    with torch.no_grad():
        np.testing.assert_allclose(logits, classifier(ids, mask, types).numpy(), atol=1e-4, rtol=1e-4)


def test_export_is_all_or_nothing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FolderError, match="exists and is not an empty folder"):
        write_folder(tmp_path / "full", lambda folder: None)

    def interrupted(folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(tmp_path / "new", interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no half-written folder, no temporary one


def test_the_folder_gets_the_users_umask(exported, tmp_path):
    """Not the 0700 / 0600 of temporary files: a server running as another user reads it."""
    import os

    old = os.umask(0o022)
    try:
        folder = write_folder(tmp_path / "m", lambda f: ((f / "sub").mkdir(), (f / "sub" / "w").write_text("x")))
        modes = {p.name: p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}
    finally:
        os.umask(old)
    assert modes == {"m": 0o755, "sub": 0o755, "w": 0o644}
    _, exported_folder = exported
    assert all(p.stat().st_mode & 0o044 for p in exported_folder.rglob("*"))  # config.json, safetensors too


def corrupt(folder, tmp_path, edit):
    """A copy of an exported folder with config.json's rbert section edited."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.pop("rbert_early_exit"), "no rbert_early_exit section"),
    (lambda c: c["rbert_early_exit"].update(format=9), "format = 9"),
    (lambda c: c["rbert_early_exit"].update(consulted_exits=[3, 2]), "consulted_exits = \\[3, 2\\]"),
    (lambda c: c["rbert_early_exit"].update(consulted_exits=[1, 2]), "must end with the final exit"),
    (lambda c: c["rbert_early_exit"].update(max_length="long"), "max_length = 'long'"),
    (lambda c: c["rbert_early_exit"].update(policy={"name": "os.system", "command": "true"}),
     "policy: policy name 'os.system' is not one of"),
    (lambda c: c["rbert_early_exit"].update(policy={"_target_": "os.system", "name": "entropy", "x": 1}),
     "policy: policy entropy: .*unexpected keyword"),
    (lambda c: c["backbone"].update(model_type="gpt2"), "backbone.model_type 'gpt2' is not one of"),
    (lambda c: c["rbert_early_exit"].update(labels=["a", "a", "b"]), "distinct class names"),
    (lambda c: c["rbert_early_exit"]["onnx"]["segments"][0].update(file="../../etc/passwd"),
     "segments\\[0\\].file = '../../etc/passwd': expected a file name inside the folder"),
    (lambda c: c["rbert_early_exit"]["onnx"]["segments"][1].update(file="/tmp/x.onnx"), "segments\\[1\\].file"),
    (lambda c: c["rbert_early_exit"]["onnx"]["segments"][1].update(first=1), "expected the graph after layer 1"),
    (lambda c: c["rbert_early_exit"]["onnx"]["segments"].pop(), "segments end at layers \\[1, 2, 3\\]"),
    (lambda c: c["rbert_early_exit"]["onnx"].pop("segments"), "onnx.segments = None"),
], ids=["no-section", "format", "order", "final", "type", "unknown-policy", "target", "family", "labels",
        "onnx-escape", "onnx-absolute", "onnx-ranges", "onnx-missing-exit", "onnx-no-segments"])
def test_bad_folders_are_refused_in_one_line(edit, message, exported, tmp_path):
    _, folder = exported
    copy = corrupt(folder, tmp_path, edit)
    # The ONNX runtime never builds the PyTorch model, so the family matters to the other only.
    for cls in (EarlyExitModel,) if "model_type" in message else (EarlyExitModel, OnnxEarlyExitModel):
        with pytest.raises((FolderError, ValueError), match=message) as err:
            cls.from_pretrained(copy)
        assert "\n" not in str(err.value)


def test_unreadable_files_are_refused(exported, tmp_path):
    import shutil

    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(FolderError, match="config.json: not valid JSON"):
        EarlyExitModel.from_pretrained(copy)
    shutil.copy(folder / "config.json", copy / "config.json")
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FolderError, match="model.safetensors"):
        EarlyExitModel.from_pretrained(copy)
    (copy / "onnx" / "exit_2.onnx").write_bytes(b"garbage")
    with pytest.raises(FolderError, match="exit_2.onnx: onnxruntime cannot load it"):
        OnnxEarlyExitModel.from_pretrained(copy)
    # config.json saying 2 labels for graphs that answer 3 logits
    edited = corrupt(folder, tmp_path / "labels", lambda c: c["rbert_early_exit"].update(labels=["x", "y"]))
    with pytest.raises(FolderError, match="exit_1.onnx: answers 3 logits; config.json has 2 labels"):
        OnnxEarlyExitModel.from_pretrained(edited)


def test_the_onnx_runtime_and_its_server_need_neither_torch_nor_transformers(exported):
    """Load, answer at batch size 1 (the stored composed graph) and batched, build the app:
    none of the training stack (nor ``onnx``, 2.4 s of imports) comes in."""
    _, folder = exported
    code = ("import sys\n"
            "from rbert.deploy import OnnxEarlyExitModel\n"
            "from rbert.deploy.server import create_app\n"
            f"model = OnnxEarlyExitModel.from_pretrained({str(folder)!r})\n"
            "assert model.fused is not None\n"
            "print(model.predict(['a fine film'])[0]['label'], len(model.predict(['a', 'b c', 'd e f'])))\n"
            "create_app(model)\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'pytorch_lightning', "
            "'lightning', 'hydra', 'omegaconf', 'onnx', 'datasets'})\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[1] == "3"


def test_the_folder_holds_the_composed_graph_of_its_policy(exported, monkeypatch):
    _, folder = exported
    spec = read_spec(folder)
    assert spec.onnx["fused"] == {"file": "onnx/fused.onnx", "policy": policy_to_dict(EntropyExit(0.3))}
    assert (folder / "onnx" / "fused.onnx").is_file()

    def no_composing(*args):
        raise AssertionError("composed at load")

    monkeypatch.setattr(OnnxEarlyExitModel, "_compose", staticmethod(no_composing))
    assert OnnxEarlyExitModel.from_pretrained(folder).fused is not None  # read from the folder
    with pytest.raises(AssertionError, match="composed at load"):  # another threshold: composed now
        OnnxEarlyExitModel.from_pretrained(folder, policy=EntropyExit(0.31))


@pytest.mark.parametrize("tokenizer", ["tiny", "minilm"])
def test_the_folder_tokenizer_gives_what_transformers_gives(tokenizer, tmp_path):
    """``tokenizers`` alone on tokenizer.json: the ids, token types and masks of the fast
    tokenizer training used, for texts, pairs, and texts over the length (longest first)."""
    from transformers import AutoTokenizer

    from rbert.deploy import FolderTokenizer

    load_tokenizer(tokenizer).save_pretrained(tmp_path)
    ours, theirs = FolderTokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    long = " ".join(["a rather long and winding sentence"] * 12)
    singles = [("a fine film",), ("Ünïcode, punctuation... and  spaces!",), (long,), ("x",)]
    pairs = [("a fine film", "a dull one"), (long, "short"), ("short", long), (long, long)]
    for rows in (singles, pairs):
        got = ours(rows, 24)
        want = theirs(*zip(*rows), truncation=True, max_length=24, padding=True, return_tensors="np")
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} of {rows}")
        assert ours.lengths(rows) == [len(x) for x in theirs(*zip(*rows), truncation=False)["input_ids"]]


@pytest.mark.slow
def test_minilm_on_real_sst2_dev(shared_glue, tmp_path):
    """MiniLM with (untrained, spread) exits after every layer, on the real SST-2 dev sentences:
    the ONNX runtime (segment by segment, and one composed graph at bs=1 for entropy) and the
    Hydra-free loader answer as the PyTorch engine does."""
    from bench.deploy_speed import dev_set

    torch.manual_seed(0)
    net = MultiExitBert(load_encoder("minilm"), 2, pooling="mean").eval()
    with torch.no_grad():
        for head in net.exits:
            head.classifier.weight.mul_(40)
    spec = spec_for(net, policy=PatienceExit(1), labels=("0", "1"))
    spec.max_length = 128
    folder = save(tmp_path / "m", net, load_tokenizer("minilm"), spec)
    texts, _ = dev_set(shared_glue)
    for policy in (PatienceExit(1), EntropyExit(0.5)):
        onnx = OnnxEarlyExitModel.from_pretrained(folder, policy=policy)
        engine = EarlyExitModel.from_pretrained(folder, policy=policy)
        assert (onnx.fused is not None) == isinstance(policy, EntropyExit)
        seen = set()
        for bs in (32, 1):
            for start in range(0, 256 if bs > 1 else 32, bs):
                enc = onnx.encode(texts[start:start + bs])
                args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
                want = early_exit(net, policy, *map(torch.from_numpy, args))
                seen |= set(want.exit_layer.tolist())
                for runtime in (onnx, engine):
                    logits, layers = runtime.run(*args)
                    assert layers.tolist() == want.exit_layer.tolist(), policy.describe()
                    np.testing.assert_allclose(logits, want.logits.numpy(), atol=1e-4, rtol=1e-4)
        assert len(seen) > 1, policy.describe()  # the comparison covers several exit layers


def test_one_model_is_safe_to_call_from_several_threads(exported):
    """The server checks lengths on its event loop while a worker thread encodes a batch: both
    use the one tokenizer, which Hugging Face's fast tokenizers do not allow at once
    ("Already borrowed"), so the runtimes must serialise it."""
    from concurrent.futures import ThreadPoolExecutor

    _, folder = exported
    model = OnnxEarlyExitModel.from_pretrained(folder)
    texts = ["a fine film", "the quick brown fox jumps over the lazy dog, twice over", "ok"] * 4

    def work(i: int):
        return model.lengths(texts) if i % 2 else model.predict(texts, batch_size=5)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(400)))
    assert all(r == results[1] for r in results[1::2])
    assert all([a["label"] for a in r] == [a["label"] for a in results[0]] for r in results[::2])


def test_full_depth_graph_answers_like_the_final_exit(exported, tmp_path):
    """The plain baseline of bench/deploy_speed.py: the embeddings, every layer and the final exit
    in one graph."""
    import onnxruntime as ort

    from rbert.deploy.onnx_export import export_full_depth

    net, _ = exported
    export_full_depth(net, tmp_path / "full.onnx")
    ids, mask, types = numpy_batch()
    feeds = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    logits = ort.InferenceSession(str(tmp_path / "full.onnx")).run(None, feeds)[1]
    result = expected(net, NoExit(), ids, mask, types)
    np.testing.assert_allclose(logits, result.logits.numpy(), atol=1e-4, rtol=0)
