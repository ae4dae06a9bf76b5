"""rbert's one entry point: the ``rbert`` command, and ``python run.py`` in the repository.

``rbert task=sst2 model=bert`` fine-tunes, validates and tests (``conf/config.yaml``);
``rbert --config-name pretrain`` pre-trains a masked-LM BERT (``conf/pretrain.yaml``).
``mode=eval`` / ``mode=predict`` evaluate or apply a fine-tuned checkpoint; ``mode=export``
writes a fine-tuned checkpoint as a deployable early-exit folder (a pre-training one as a
Hugging Face folder); ``mode=serve`` serves an exported folder over HTTP. Every option is a
Hydra config group under ``conf/``; see README.md.

``conf/`` sits at the repository's top level; ``pip install .`` copies it into the package
(``rbert/conf``, setup.py), so that the command finds it from any folder.
"""

import importlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import rbert.launch as launch  # the rbert.run_id resolver of conf/hydra/default.yaml

log = logging.getLogger("rbert")

# mode -> module whose run(cfg) carries it out (imported late so that --help and config errors are fast).
MODES = {"train": "rbert.train", "pretrain": "rbert.pretrain", "export": "rbert.export",
         "eval": "rbert.inference.evaluate", "predict": "rbert.inference.predict", "serve": "rbert.serve"}
TASK_FREE = ("pretrain",)  # the modes of conf/pretrain.yaml only
ANY_CONFIG = ("export",)   # reads what it needs from the checkpoint: either config


def config_error(err: BaseException):
    """The ConfigError behind ``err`` (Hydra wraps errors raised while instantiating), if any."""
    from rbert.errors import ConfigError

    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None


def config_dir() -> str:
    """The installed package's ``rbert/conf``, else the source tree's top-level ``conf/``."""
    packaged = Path(__file__).parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from rbert.errors import ConfigError
    from rbert.progress import quiet_libraries

    launch.install_ddp_child_command()
    quiet_libraries()
    environment = launch.ddp_environment()
    try:
        if cfg.mode not in MODES:
            raise ConfigError(f"mode: unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
        if cfg.mode not in ANY_CONFIG and (cfg.mode in TASK_FREE) != (cfg.get("task") is None):
            raise ConfigError(f"mode={cfg.mode} needs "
                              + ("--config-name pretrain" if cfg.mode in TASK_FREE else "the default config "
                                 "(no --config-name pretrain): it works on a task"))
        results = importlib.import_module(MODES[cfg.mode]).run(cfg)
    except Exception as err:
        bad_input = config_error(err)
        if launch.in_multirun():  # one failed job of a sweep: recorded, and the sweep goes on
            message = f"error: {bad_input}" if bad_input else f"{type(err).__name__}: {err}"
            launch.record_failure(cfg.paths.output_dir, err, message)
            return None
        if bad_input is None:
            raise
        print(f"error: {bad_input}", file=sys.stderr)
        sys.exit(2)
    finally:
        launch.finish(environment)
    # For Hydra sweepers that optimise a value: the one named by the config's `objective`.
    objective = cfg.get("objective")
    return results.get(objective) if objective and isinstance(results, dict) else None


if __name__ == "__main__":
    main()
