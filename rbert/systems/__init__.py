"""LightningModules ("systems"): training objectives on top of the plain models."""

from rbert.systems.base import BaseSystem, TaskSystem
from rbert.systems.classifier import SequenceClassifier
from rbert.systems.core import CoRe
from rbert.systems.mlm import MaskedLM
from rbert.systems.multi_exit import PABEE, DeeBERT, MultiExitSystem, RomeBERT

__all__ = ["PABEE", "BaseSystem", "CoRe", "DeeBERT", "MaskedLM", "MultiExitSystem", "RomeBERT", "SequenceClassifier",
           "TaskSystem"]
