"""Every backbone family behind the one encoder interface: parity with transformers, multi-exit
training, early exit, and one-line errors for families rbert does not run."""

from __future__ import annotations

import pytest
import torch
import transformers

from rbert.errors import ConfigError
from rbert.inference.engine import early_exit, simulate
from rbert.inference.policies import ConfidenceExit, EntropyExit, FixedExit, PatienceExit
from rbert.models import MultiExitBert, load_encoder
from rbert.models.families import FAMILIES as RBERT_FAMILIES
from tests.backbone_files import FAMILIES, family_batch, spread_multi_exit, write_family
from tests.test_run import results, run_cli


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def test_every_family_is_registered():
    assert set(FAMILIES) == set(RBERT_FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_states_match_transformers(family, family_root):
    folder = write_family(family_root, family)
    ours = load_encoder(str(folder)).eval()
    assert type(ours) is RBERT_FAMILIES[family]
    theirs = transformers.AutoModel.from_pretrained(folder).eval()
    ids, mask, types = family_batch(family)
    kwargs = {} if family == "distilbert" else {"token_type_ids": types}
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs).hidden_states
        got = ours(ids, mask, None if family == "distilbert" else types, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 5  # embeddings + 4 layer applications
    keep = mask.bool()
    for layer, (a, b) in enumerate(zip(got[1:], expected[1:]), start=1):
        err = (a - b)[keep].abs().max().item()  # padded positions are not compared: nobody reads them
        assert err < 1e-5, f"{family} layer {layer}: max abs error {err}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_early_exit_engine_matches_every_exit_evaluated(family, family_root):
    model = spread_multi_exit(write_family(family_root, family))
    ids, mask, types = family_batch(family)
    for policy in (EntropyExit(0.5), ConfidenceExit(0.8), PatienceExit(1), FixedExit(2)):
        batched = early_exit(model, policy, ids, mask, types)
        with torch.no_grad():
            full = simulate(policy, model(ids, mask, types), model.exit_layers)
        assert torch.equal(batched.exit_layer, full.exit_layer), (family, policy.describe())
        torch.testing.assert_close(batched.logits, full.logits, rtol=1e-4, atol=1e-4)
        n = int(mask[0].sum())
        alone = early_exit(model, policy, ids[:1, :n], mask[:1, :n], types[:1, :n])
        assert alone.exit_layer.item() == batched.exit_layer[0].item()


def test_albert_exits_are_per_application_of_the_shared_layer(family_root):
    bert = load_encoder(str(write_family(family_root, "albert")))
    assert bert.num_layers == 4 and len({id(layer) for layer in bert.layers}) == 1
    model = MultiExitBert(bert, 2)
    assert model.exit_layers == [1, 2, 3, 4]


# Every family and every objective once (the objectives see only the encoder interface, which
# the family tests above hold to transformers; a full cross of 12 runs cost CI ~2 minutes).
@pytest.mark.parametrize(("family", "model"), [("roberta", "romebert"), ("distilbert", "deebert"),
                                               ("albert", "pabee"), ("electra", "romebert")])
def test_multi_exit_training_runs_on_every_family(family, model, family_root, glue_dir, tmp_path):
    folder = write_family(family_root, family)
    run_cli(tmp_path / "run", f"backbone={folder}", f"model={model}", f"data_dir={glue_dir}",
            "debug=limit", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2", "eval.timing_samples=4", "eval.timing_batches=1",
            "eval.timing_repeats=1", backbone=False)
    test = results(tmp_path / "run")["test"]
    assert {"test/exit_1/accuracy", "test/exit_4/accuracy"} <= set(test)


def test_unsupported_family_gets_one_line_naming_backbone(tmp_path, glue_dir):
    folder = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(
        folder)
    with pytest.raises(ConfigError, match=r"backbone: .* is a 'gpt2' checkpoint; rbert runs the families bert, "
                                          r"roberta"):
        load_encoder(str(folder))
    proc = run_cli(tmp_path / "run", f"backbone={folder}", f"data_dir={glue_dir}", backbone=False, check=False)
    assert proc.returncode == 2
    assert "error: backbone:" in proc.stderr and "Traceback" not in proc.stderr


def test_relaxed_kernels_are_bert_only(family_root):
    with pytest.raises(ConfigError, match="has no linear attention"):
        load_encoder(str(write_family(family_root, "distilbert")), attention="linear")
