"""Plain PyTorch models: nothing here imports Lightning or Hydra."""

from rbert.models.bert import ATTENTIONS, FEED_FORWARDS, BertConfig, BertModel
from rbert.models.classifier import BertForSequenceClassification, pool
from rbert.models.hub import load_encoder, load_tokenizer, masked_lm
from rbert.models.mlm import BertForMaskedLM
from rbert.models.multi_exit import MultiExitBert
from rbert.models.relaxed import LinearSelfAttention, LowRankLinear, expand_state_dict  # registers the relaxed blocks
from rbert.models.token_heads import BertForTokenClassification, MultiExitTokenBert

__all__ = ["ATTENTIONS", "FEED_FORWARDS", "BertConfig", "BertForMaskedLM", "BertForSequenceClassification",
           "BertForTokenClassification", "BertModel", "LinearSelfAttention", "LowRankLinear", "MultiExitBert",
           "MultiExitTokenBert", "expand_state_dict", "load_encoder", "load_tokenizer", "masked_lm", "pool"]
