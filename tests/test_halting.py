"""Token-level early exit's layer step: only the active tokens are computed, the halted ones are
copied and still serve as keys and values; equal to the full layer at the active positions."""

from __future__ import annotations

import pytest
import torch

from rbert.models import load_encoder
from rbert.models.halting import halted_step
from tests.backbone_files import FAMILIES, family_batch, write_family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_halted_step_equals_the_masked_full_layer(family, tmp_path):
    encoder = load_encoder(str(write_family(tmp_path, family))).eval()
    ids, mask, types = family_batch(family)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = encoder.embed(ids, types if family != "distilbert" else None)
        bias = encoder.attention_bias(mask)
        for layer in list(encoder.layers)[:2]:
            active = (torch.rand(ids.shape, generator=gen) < 0.6) & mask.bool()
            active[0] = False  # a row with nothing left to compute
            expected = torch.where(active[..., None], layer(hidden, bias), hidden)
            got = halted_step(layer, hidden, active, bias)
            assert (got - expected).abs().max() < 1e-5
            assert torch.equal(got[~active], hidden[~active])  # copied, bit for bit
            hidden = got
        everything = mask.bool()
        assert (halted_step(layer, hidden, everything, bias)[everything]
                - layer(hidden, bias)[everything]).abs().max() < 1e-5
        assert torch.equal(halted_step(layer, hidden, torch.zeros_like(everything), bias), hidden)
