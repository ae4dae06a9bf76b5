"""rbert: efficient BERT (multi-exit fine-tuning, CoRe pre-training) as Lightning modules composed by Hydra."""

from rbert import launch  # noqa: F401  (registers the rbert.run_id resolver that conf/hydra/default.yaml uses)
