from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.glue_files import write_glue

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep datasets' caches of test data out of the user's cache."""
    os.environ["RBERT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("RBERT_DATA_DIR", None)
    os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """Tiny copies of all nine GLUE tasks in the canonical layout and formats."""
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def shared_glue() -> Path:
    if not SHARED_GLUE.is_dir():
        pytest.skip(f"real GLUE data not found at {SHARED_GLUE}")
    return SHARED_GLUE


def task_spec(name: str, **overrides):
    """The TaskSpec of conf/task/<name>.yaml, built as Hydra would."""
    from rbert.data.tasks import TaskSpec

    fields = yaml.safe_load((REPO / "conf" / "task" / f"{name}.yaml").read_text())
    fields.pop("_target_")
    fields.update(overrides)
    return TaskSpec(**fields)
