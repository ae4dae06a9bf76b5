"""LightningModules ("systems"): training objectives on top of the plain models."""

from rbert.systems.base import TaskSystem
from rbert.systems.classifier import SequenceClassifier

__all__ = ["SequenceClassifier", "TaskSystem"]
