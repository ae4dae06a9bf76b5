"""CoRe's relaxed BERT blocks, and the expansion of a relaxed BERT into a standard one.

Importing this module registers, in :mod:`rbert.models.bert`'s registries,

* ``ATTENTIONS["linear"]``: linear attention (Katharopoulos et al., 2020) with the feature
  map phi(x) = elu(x) + 1 on queries and keys, per head:
  ``out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)``.
  Cost is linear in the sequence length (O(S d^2) instead of O(S^2 d)). The parameters are
  softmax attention's (``query``, ``key``, ``value``), so phase 2 keeps them as they are.
* ``FEED_FORWARDS["low_rank"]``: a feed-forward projection W = U V of rank
  ``config.ffn_rank``, with no bias or nonlinearity between U and V; the bias (``bias``,
  as in ``nn.Linear``) and BERT's GELU stay where they are.

:func:`expand` (via :func:`expand_state_dict`) turns a relaxed model into a standard BERT
(W <- U V, exactly); attention needs no conversion, only the switch to softmax, which
changes the function (CoRe phase 2 retrains from there). ``ATTENTIONS["blend"]`` mixes the
two kernels, for a gradual switch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from rbert.models.bert import ATTENTIONS, FEED_FORWARDS, SoftmaxSelfAttention


class LinearSelfAttention(SoftmaxSelfAttention):
    """Multi-head linear attention; same projections (and parameter names) as softmax attention.

    Padded keys are zeroed *after* the feature map: phi(0) = 1, so zeroing the projected key
    before it would still give a padded position weight. The sums run in fp32, also under
    autocast: a sum of S positive terms overflows or loses precision in half precision.
    """

    eps = 1e-6

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention_bias: torch.Tensor | None) -> torch.Tensor:
        dtype = v.dtype  # the projections' (autocast's) dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = F.elu(q.float()) + 1, F.elu(k.float()) + 1, v.float()
            if attention_bias is not None:  # (batch, 1, 1, seq) True = attend -> (batch, 1, seq, 1)
                k = k * attention_bias.transpose(-1, -2).to(k.dtype)
            kv = k.transpose(-1, -2) @ v                                   # (batch, heads, d, d)
            normaliser = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)  # (batch, heads, seq, 1)
            out = (q @ kv) / (normaliser + self.eps)
        return out.to(dtype)


class BlendedSelfAttention(SoftmaxSelfAttention):
    """``(1 - mix) * linear + mix * softmax`` attention over the same projections.

    CoRe's optional smooth switch: phase 2 ramps ``mix`` from 0 (the relaxed model's
    function) to 1 (a standard BERT) instead of swapping the kernel in one step. At
    ``mix`` 0 or 1 only one kernel runs, so after the ramp it costs what softmax costs.
    The parameters are softmax attention's, so the model saves as a standard BERT.
    """

    eps = LinearSelfAttention.eps

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.mix = 1.0  # set by the training system at every step of the ramp

    def attend(self, q, k, v, attention_bias):
        if self.mix >= 1:
            return super().attend(q, k, v, attention_bias)
        linear = LinearSelfAttention.attend(self, q, k, v, attention_bias)
        if self.mix <= 0:
            return linear
        return torch.lerp(linear, super().attend(q, k, v, attention_bias), self.mix)


def ffn_rank(config: BertConfig, in_features: int, out_features: int) -> int:
    """``config.ffn_rank``: an int, or a fraction of the hidden size (0.25 = d/4); default d/4."""
    rank = getattr(config, "ffn_rank", None) or 0.25
    if isinstance(rank, float) and rank <= 1:
        rank = max(1, round(rank * config.hidden_size))
    if not 1 <= int(rank) <= min(in_features, out_features):
        raise ValueError(f"ffn_rank={rank} must lie in 1..{min(in_features, out_features)}")
    return int(rank)


class LowRankLinear(nn.Module):
    """y = x (U V)^T + b, with U (out x r) and V (r x in): W = U V of rank r."""

    def __init__(self, in_features: int, out_features: int, config: BertConfig):
        super().__init__()
        rank = ffn_rank(config, in_features, out_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        # N(0, std) factors whose product has BERT's initial scale: std(W) = sqrt(r) std_U std_V.
        std = math.sqrt(config.initializer_range / math.sqrt(rank))
        self.U = nn.Parameter(torch.randn(out_features, rank) * std)
        self.V = nn.Parameter(torch.randn(rank, in_features) * std)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Truncated SVD of a dense W: the best rank-r approximation, split evenly (U sqrt(S), sqrt(S) V^T)."""
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[: self.rank].sqrt()
        self.U.copy_(u[:, : self.rank] * root)
        self.V.copy_(root[:, None] * vh[: self.rank])
        if bias is not None:
            self.bias.copy_(bias)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


ATTENTIONS["linear"] = LinearSelfAttention
ATTENTIONS["blend"] = BlendedSelfAttention
FEED_FORWARDS["low_rank"] = LowRankLinear


def expand_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A relaxed model's state dict as a standard BERT's: every ``*.U`` / ``*.V`` pair becomes
    ``*.weight = U @ V`` (computed in fp64, stored in the factors' dtype); all else is kept."""
    out = {}
    for key, value in state.items():
        if key.endswith(".U"):
            prefix = key[: -len("U")]
            out[prefix + "weight"] = (value.double() @ state[prefix + "V"].double()).to(value.dtype)
        elif not key.endswith(".V"):
            out[key] = value
    return out


def expand(relaxed: nn.Module, attention: str = "softmax") -> nn.Module:
    """CoRe's expansion: the standard model (dense feed-forward, ``attention``) with a relaxed
    model's weights (W <- U V; attention keeps its projections). Works for any rbert model
    built as ``cls(config, attention=..., feed_forward=...)`` (``BertModel``, ``BertForMaskedLM``)."""
    config = BertConfig.from_dict({k: v for k, v in relaxed.config.to_dict().items() if k != "ffn_rank"})
    model = type(relaxed)(config, attention=attention, feed_forward="dense")
    model.load_state_dict(expand_state_dict(relaxed.state_dict()))
    first = next(relaxed.parameters())
    return model.to(device=first.device, dtype=first.dtype).train(relaxed.training)


def set_blend(model: nn.Module, mix: float) -> None:
    """Set the softmax share of every :class:`BlendedSelfAttention` in ``model``."""
    for module in model.modules():
        if isinstance(module, BlendedSelfAttention):
            module.mix = float(mix)


def init_low_rank_from_dense(relaxed: nn.Module, dense_state: dict[str, torch.Tensor]) -> None:
    """SVD-initialise every :class:`LowRankLinear` of ``relaxed`` from the dense weights of a
    standard model with the same module tree (e.g. to relax a pretrained BERT)."""
    for name, module in relaxed.named_modules():
        if isinstance(module, LowRankLinear):
            module.init_from_dense(dense_state[f"{name}.weight"], dense_state.get(f"{name}.bias"))
