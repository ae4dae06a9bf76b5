"""CoRe's relaxed blocks: linear attention, low-rank feed-forward, and expansion into a standard BERT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import BertConfig

from rbert.models import BertForMaskedLM, BertModel, LowRankLinear, expand_state_dict
from rbert.models.relaxed import init_low_rank_from_dense


def config(rank=8) -> BertConfig:
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.ffn_rank = rank
    return cfg


def relaxed(cls=BertModel, rank=8):
    torch.manual_seed(0)
    return cls(config(rank), attention="linear", feed_forward="low_rank").eval()


def padded_batch():
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_linear_attention_is_the_kernelised_formula():
    attention = relaxed().encoder.layer[0].attention.self
    ids, mask = padded_batch()
    hidden = torch.randn(3, 12, 32)
    q, k, v = (attention._heads(p(hidden)) for p in (attention.query, attention.key, attention.value))
    weights = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2) * mask[:, None, None, :]  # phi(q_i) . phi(k_j)
    expected = (weights / weights.sum(-1, keepdim=True)) @ v
    out = attention(hidden, mask.bool()[:, None, None, :])
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(3, 12, 32), atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_other_positions():
    model = relaxed()
    ids, mask = padded_batch()
    other = ids.clone()
    other[mask == 0] = 42  # different pad tokens
    with torch.no_grad():
        a, b = model(ids, mask).last_hidden_state, model(other, mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)


def test_linear_attention_sums_in_fp32_under_autocast():
    attention = relaxed().encoder.layer[0].attention.self
    hidden = torch.randn(2, 512, 32) * 3
    reference = attention(hidden, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(hidden, None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Only the bf16 projections differ: the error stays at bf16's resolution, not S times it.
    assert (out.float() - reference).abs().max() < 0.05


def test_low_rank_factors_and_svd_initialisation():
    layer = LowRankLinear(32, 64, config(rank=8))
    assert layer.U.shape == (64, 8) and layer.V.shape == (8, 32)
    assert torch.linalg.matrix_rank(layer.dense_weight().detach()) == 8
    dense = torch.nn.Linear(32, 64)
    full = LowRankLinear(32, 64, config(rank=32))
    full.init_from_dense(dense.weight, dense.bias)  # full rank: SVD reproduces W exactly
    x = torch.randn(5, 32)
    torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)
    layer.init_from_dense(dense.weight)  # rank 8: the best rank-8 approximation (Eckart-Young)
    s = torch.linalg.svdvals(dense.weight.detach())
    error = torch.linalg.matrix_norm(layer.dense_weight() - dense.weight, ord="fro")
    torch.testing.assert_close(error, s[8:].square().sum().sqrt(), atol=1e-5, rtol=1e-4)


def test_rank_as_a_fraction_of_the_hidden_size():
    assert LowRankLinear(32, 64, config(rank=0.25)).rank == 8
    with pytest.raises(ValueError, match="ffn_rank"):
        LowRankLinear(32, 64, config(rank=40))


def test_expansion_keeps_the_feed_forward_function_exactly():
    small = relaxed()
    full = BertModel(config()).eval()
    full.load_state_dict(expand_state_dict(small.state_dict()))  # strict: every name maps
    x = torch.randn(2, 12, 32)
    for a, b in zip(small.encoder.layer, full.encoder.layer):
        with torch.no_grad():
            torch.testing.assert_close(a.output.dense(a.intermediate(x)), b.output.dense(b.intermediate(x)),
                                       atol=1e-5, rtol=1e-5)
        assert a.attention.self.query.weight.equal(b.attention.self.query.weight)


def test_expanded_masked_lm_loads_in_transformers(tmp_path):
    small = relaxed(BertForMaskedLM)
    full = BertForMaskedLM(config()).eval()
    full.load_state_dict(expand_state_dict(small.state_dict()))
    full.save_pretrained(tmp_path)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, full(ids, mask).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no Hugging Face format"):
        small.save_pretrained(tmp_path / "relaxed")


def test_relaxing_a_dense_model_by_svd():
    dense = BertModel(config(rank=64))  # rank = the layer's smaller side: lossless
    small = BertModel(config(rank=32), attention="linear", feed_forward="low_rank")
    small.load_state_dict({k: v for k, v in dense.state_dict().items() if "dense.weight" not in k
                           or "attention" in k}, strict=False)
    init_low_rank_from_dense(small, dense.state_dict())
    x = torch.randn(2, 5, 32)
    a, b = small.encoder.layer[1], dense.encoder.layer[1]
    with torch.no_grad():
        torch.testing.assert_close(a.output.dense(a.intermediate(x)), b.output.dense(b.intermediate(x)),
                                   atol=1e-4, rtol=1e-4)
