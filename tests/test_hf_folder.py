"""The exported folder through ``transformers``' front door: with ``trust_remote_code`` the
folder's own modeling file runs the exits and the policy (rbert's answers); without it the
Auto classes refuse the folder rather than load a random classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from rbert.deploy import EarlyExitModel, save
from rbert.inference.policies import ConfidenceExit, EntropyExit, PatienceExit
from rbert.models import load_tokenizer
from tests.backbone_files import FAMILIES, family_batch, sharpen, spread_multi_exit, write_family
from tests.test_deploy import spec_for

TEXTS = ["a gripping , funny film", "dull", "the quick brown fox jumps over the lazy dog", "ok then", "no"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_runs_the_exits_with_trust_remote_code(family, tmp_path):
    net = sharpen(spread_multi_exit(write_family(tmp_path, family)), *family_batch(family))
    seen = set()
    for k, policy in enumerate((EntropyExit(0.6), ConfidenceExit(0.8), PatienceExit(1))):
        folder = save(tmp_path / f"m{k}", net, load_tokenizer("minilm"), spec_for(net, policy=policy), onnx=False)
        ours = EarlyExitModel.from_pretrained(folder).predict(TEXTS)
        theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
        enc = transformers.AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = theirs(**enc)
        assert out["exit_layer"].tolist() == [a["exit_layer"] for a in ours], (family, policy.describe())
        seen |= set(out["exit_layer"].tolist())
        probabilities = torch.softmax(out.logits, -1).numpy()
        want = np.array([[a["probabilities"][name] for name in ("a", "b", "c")] for a in ours])
        np.testing.assert_allclose(probabilities, want, atol=1e-4)
    assert len(seen) >= 2, seen  # texts left at different exits
    pipe = transformers.pipeline("text-classification", model=str(folder), trust_remote_code=True)
    assert [p["label"] for p in pipe(TEXTS)] == [a["label"] for a in ours]
    backbone = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    ids, mask, types = family_batch(family)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family not in ("distilbert",):
        inputs["token_type_ids"] = types
    with torch.no_grad():
        hidden = backbone(**inputs).last_hidden_state
        torch.testing.assert_close(hidden, net.bert(ids, mask, types).last_hidden_state, atol=1e-5, rtol=1e-4)


def test_without_trust_remote_code_the_auto_classes_refuse(tmp_path):
    net = sharpen(spread_multi_exit(write_family(tmp_path, "bert")), *family_batch("bert"))
    folder = save(tmp_path / "m", net, load_tokenizer("minilm"), spec_for(net), onnx=False)
    for auto in (transformers.AutoModelForSequenceClassification, transformers.AutoModel):
        with pytest.raises(ValueError, match="trust_remote_code"):
            auto.from_pretrained(folder, trust_remote_code=False)
