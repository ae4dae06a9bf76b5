"""LightningModules ("systems"): training objectives on top of the plain models."""

from rbert.systems.base import TaskSystem
from rbert.systems.classifier import SequenceClassifier
from rbert.systems.multi_exit import PABEE, DeeBERT, MultiExitSystem, RomeBERT

__all__ = ["PABEE", "DeeBERT", "MultiExitSystem", "RomeBERT", "SequenceClassifier", "TaskSystem"]
