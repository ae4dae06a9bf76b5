"""Tiny random checkpoints of every backbone family, made with transformers' own classes and
saved as a user's folder would be (config.json, safetensors, a tokenizer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from rbert.models import MultiExitBert, load_encoder, load_tokenizer

VOCAB = 30522  # MiniLM's tokenizer, saved into every folder
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=160, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)

# family -> (transformers config class, model class, config fields)
FAMILIES = {
    "bert": (transformers.BertConfig, transformers.BertModel, dict(COMMON, hidden_size=32)),
    # pad_token_id 0: MiniLM's tokenizer pads with id 0 (RoBERTa's own vocabulary uses 1)
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel,
                dict(COMMON, hidden_size=32, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=0)),
    "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel,
                    dict(COMMON, hidden_size=32, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=0)),
    "distilbert": (transformers.DistilBertConfig, transformers.DistilBertModel,
                   dict(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=160,
                        pad_token_id=0)),
    # 4 applications of one shared layer; embeddings narrower than the layers
    "albert": (transformers.AlbertConfig, transformers.AlbertModel,
               dict(COMMON, hidden_size=32, embedding_size=16, num_hidden_groups=1, inner_group_num=1,
                    pad_token_id=0)),
    "electra": (transformers.ElectraConfig, transformers.ElectraModel,
                dict(COMMON, hidden_size=32, embedding_size=16, pad_token_id=0)),
}


def write_family(root: Path, family: str, seed: int = 0) -> Path:
    """A tiny random ``family`` checkpoint folder under ``root`` (made once per root)."""
    folder = root / family
    if (folder / "config.json").is_file():
        return folder
    config_class, model_class, fields = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**fields))
    with torch.no_grad():  # ALBERT/ELECTRA-style zero biases would hide mistakes: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    load_tokenizer("minilm").save_pretrained(folder)
    return folder


def family_batch(family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tests.test_inference's padded batch as ``family`` reads it: pad id 0, and one token type
    where the family has one (RoBERTa, XLM-R) or none (DistilBERT)."""
    from tests.test_inference import padded_batch

    ids, mask, types = padded_batch()
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0, as the tokenizer pads
    if family in ("roberta", "xlm-roberta", "distilbert"):
        types = torch.zeros_like(types)
    return ids, mask, types


def spread_multi_exit(folder: Path) -> MultiExitBert:
    """A 3-class multi-exit model on ``folder``'s encoder whose random exits disagree enough
    that the policies exit at a mix of layers."""
    torch.manual_seed(0)
    net = MultiExitBert(load_encoder(str(folder)), 3, pooling="mean").eval()
    with torch.no_grad():
        for head in net.exits:
            head.classifier.weight.mul_(40)
    return net


def sharpen(net: MultiExitBert, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor,
            target: float = 0.5) -> MultiExitBert:
    """Scale each exit's classifier so that its median normalised entropy on this batch is
    ``target``: random heads are either all unsure (every entropy and confidence policy sends
    every row to the last exit) or all sure (every row leaves at the first); in between, the
    thresholds 0.3 and 0.6 (confidence 0.8) split the rows over several exits, so a parity
    test really exercises leaving early, dropping rows and cutting padding."""
    from rbert.inference.policies import entropy

    with torch.no_grad():
        logits = net(ids, mask, types)
        for head, z in zip(net.exits, logits):
            low, high = 1e-3, 1e4  # entropy falls as the scale grows: bisect on a log scale
            for _ in range(60):
                mid = (low * high) ** 0.5
                h = np.median(entropy((z * mid).numpy()) / np.log(z.shape[-1]))
                low, high = (mid, high) if h > target else (low, mid)
            head.classifier.weight.mul_(low)
            head.classifier.bias.mul_(low)
    return net.eval()
