from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.glue_files import write_glue

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
SHARED_TEXT = REPO.parent / "shared" / "data" / "text"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep datasets' caches of test data out of the user's cache."""
    os.environ["RBERT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("RBERT_DATA_DIR", None)
    os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _grad_mode_is_left_alone():
    """A test (or the code it calls) that switches autograd off globally breaks tests run after
    it, far from the cause; fail the culprit instead."""
    import torch

    yield
    assert torch.is_grad_enabled(), "this test left autograd switched off (torch.set_grad_enabled(False))"


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """Tiny copies of all nine GLUE tasks in the canonical layout and formats."""
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """Raw text in the layout of ../shared/data/text (one paragraph a line, a blank line between documents)."""
    root = tmp_path_factory.mktemp("text")
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly box a jaded king".split()
    for k, name in enumerate(("train.txt", "valid.txt", "wikitext-2/valid.txt")):
        docs = []
        for d in range(8 if name == "train.txt" else 3):
            paragraphs = [" ".join(words[(d + p + i + k) % len(words)] for i in range(90)) for p in range(3)]
            docs.append("\n".join(paragraphs))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n\n".join(docs) + "\n")
    return root


@pytest.fixture(scope="session")
def shared_glue() -> Path:
    if not SHARED_GLUE.is_dir():
        pytest.skip(f"real GLUE data not found at {SHARED_GLUE}")
    return SHARED_GLUE


@pytest.fixture(scope="session")
def romebert_ckpt(glue_dir, tmp_path_factory) -> Path:
    """A tiny fine-tuned RomeBERT checkpoint (sst2), trained once for every module that needs one."""
    from tests.test_run import run_cli

    run_dir = tmp_path_factory.mktemp("romebert")
    run_cli(run_dir, "model=romebert", f"data_dir={glue_dir}", "data.batch_size=16", "data.train_limit=null",
            "trainer.max_epochs=4", "model.optimizer.lr=2e-3", "logger=none", "test=false", "eval.after_train=false")
    return run_dir / "checkpoints" / "best.ckpt"


def task_spec(name: str, **overrides):
    """The TaskSpec of conf/task/<name>.yaml, built as Hydra would."""
    from rbert.data.tasks import TaskSpec

    fields = yaml.safe_load((REPO / "conf" / "task" / f"{name}.yaml").read_text())
    fields.pop("_target_")
    fields.update(overrides)
    return TaskSpec(**fields)
