"""Backbone families: a checkpoint's ``model_type`` (from its config.json) -> rbert's encoder class.

Adding a family is one file with its :class:`~rbert.models.encoder.Encoder` (Hugging Face's
parameter names for that family) and one entry here.
"""

from __future__ import annotations

from rbert.models.albert import AlbertModel
from rbert.models.bert import BertModel
from rbert.models.distilbert import DistilBertModel
from rbert.models.electra import ElectraModel
from rbert.models.encoder import Encoder
from rbert.models.roberta import RobertaModel, XLMRobertaModel

FAMILIES: dict[str, type[Encoder]] = {
    "bert": BertModel,
    "roberta": RobertaModel,
    "xlm-roberta": XLMRobertaModel,
    "distilbert": DistilBertModel,
    "albert": AlbertModel,
    "electra": ElectraModel,
}
