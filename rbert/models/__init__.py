"""Plain PyTorch models: nothing here imports Lightning or Hydra."""

from rbert.models.bert import ATTENTIONS, FEED_FORWARDS, BertConfig, BertModel
from rbert.models.classifier import BertForSequenceClassification, pool
from rbert.models.hub import load_encoder, load_tokenizer
from rbert.models.multi_exit import MultiExitBert

__all__ = ["ATTENTIONS", "FEED_FORWARDS", "BertConfig", "BertModel", "BertForSequenceClassification",
           "MultiExitBert", "load_encoder", "load_tokenizer", "pool"]
