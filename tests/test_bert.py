"""The plain-PyTorch BERT against transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from rbert.models import BertConfig, BertForSequenceClassification, BertModel, load_encoder

CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, type_vocab_size=2)


def batch(vocab: int = 99, lengths=(17, 9, 3)):
    torch.manual_seed(0)
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0 after the end
    types = (torch.arange(ids.shape[1]) > 4).long().expand_as(ids) * mask
    return ids, mask, types


def compare_hidden_states(ours, ref, mask):
    assert len(ours) == len(ref)
    valid = mask.bool()
    for layer, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max().item() <= 1e-4, f"layer {layer}"
        assert (a - b)[valid].abs().max().item() <= 1e-5, f"layer {layer} (real tokens)"


def test_matches_transformers_on_every_layer():
    hf = transformers.BertModel(transformers.BertConfig(**CONFIG)).eval()
    ours = BertModel(BertConfig(**CONFIG)).eval()
    ours.load_state_dict(hf.state_dict())  # weights load by name
    ids, mask, types = batch()
    with torch.no_grad():
        out = ours(ids, mask, types, output_hidden_states=True)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    compare_hidden_states(out.hidden_states, ref.hidden_states, mask)
    torch.testing.assert_close(ours.pooler(out.last_hidden_state[:, 0]), ref.pooler_output)


def test_layer_by_layer_equals_full_forward():
    model = BertModel(BertConfig(**CONFIG)).eval()
    ids, mask, types = batch()
    with torch.no_grad():
        full = model(ids, mask, types, output_hidden_states=True).hidden_states
        hidden, bias = model.embed(ids, types), model.attention_bias(mask)
        torch.testing.assert_close(hidden, full[0])
        for i, layer in enumerate(model.encoder.layer):
            hidden = layer(hidden, bias)
            torch.testing.assert_close(hidden, full[i + 1])
        torch.testing.assert_close(model(ids, mask, types, num_layers=2).last_hidden_state, full[2])


def test_padding_does_not_change_real_tokens():
    model = BertModel(BertConfig(**CONFIG)).eval()
    ids, mask, types = batch(lengths=(17, 5))
    with torch.no_grad():
        padded = model(ids, mask, types).last_hidden_state[1, :5]
        alone = model(ids[1:, :5], mask[1:, :5], types[1:, :5]).last_hidden_state[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_save_pretrained_loads_in_transformers_automodel(tmp_path):
    ours = BertModel(BertConfig(**CONFIG)).eval()
    ours.save_pretrained(tmp_path / "ckpt")
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temporary files left
    hf = transformers.AutoModel.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(hf, transformers.BertModel)
    ids, mask, types = batch()
    with torch.no_grad():
        out = ours(ids, mask, types, output_hidden_states=True)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    compare_hidden_states(out.hidden_states, ref.hidden_states, mask)
    # ... and our own loader reads it back, weight for weight.
    again = BertModel.from_pretrained(tmp_path / "ckpt")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_loads_task_checkpoint_with_bert_prefix(tmp_path):
    """A fine-tuned transformers classifier (``bert.*`` keys) loads, and ours reproduces its logits."""
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG, num_labels=3)).eval()
    hf.save_pretrained(tmp_path / "cls")
    encoder = BertModel.from_pretrained(tmp_path / "cls")
    ours = BertForSequenceClassification(encoder, num_labels=3).eval()
    ours.load_state_dict(hf.state_dict())  # same names: bert.*, classifier.*
    ids, mask, types = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, types), hf(input_ids=ids, attention_mask=mask,
                                                             token_type_ids=types).logits, atol=1e-5, rtol=1e-5)


def test_mean_pooling_ignores_padding():
    from rbert.models import pool

    hidden = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="attention"):
        BertModel(BertConfig(**CONFIG), attention="nope")
    with pytest.raises(ValueError, match="feed_forward"):
        BertModel(BertConfig(**CONFIG), feed_forward="nope")
    from rbert.errors import ConfigError

    with pytest.raises(ConfigError, match="backbone"):
        load_encoder(str(tmp_path / "missing"))


def test_tiny_backbone_is_small_and_random():
    a, b = load_encoder("tiny"), load_encoder("tiny")
    assert a.num_layers == 4 and a.hidden_size == 32
    query = [m.encoder.layer[0].attention.self.query.weight for m in (a, b)]
    assert not torch.equal(*query)


@pytest.mark.slow
def test_minilm_matches_transformers():
    from rbert.models.hub import load_tokenizer, resolve

    ours = load_encoder("minilm").eval()
    hf = transformers.BertModel.from_pretrained(resolve("minilm")).eval()
    assert ours.num_layers == 6 and ours.hidden_size == 384
    enc = load_tokenizer("minilm")(["a gripping, funny film", "it is long, slow and the plot makes no sense at all"],
                                   padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_hidden_states=True)
        ref = hf(**enc, output_hidden_states=True)
    compare_hidden_states(out.hidden_states, ref.hidden_states, enc["attention_mask"])
