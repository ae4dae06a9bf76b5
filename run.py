"""rbert's one entry point: ``python run.py task=sst2 model=bert`` trains, validates, tests.

Every option is a Hydra config group under ``conf/``; see README.md.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("rbert")


def config_error(err: BaseException):
    """The ConfigError behind ``err`` (Hydra wraps errors raised while instantiating), if any."""
    from rbert.errors import ConfigError

    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported late so that --help and config errors are fast.
    from rbert.errors import ConfigError
    from rbert.inference.evaluate import evaluate, predict
    from rbert.train import run

    try:
        if cfg.mode == "eval":
            evaluate(cfg)
            return None
        if cfg.mode == "predict":
            predict(cfg)
            return None
        if cfg.mode != "train":
            raise ConfigError(f"mode: unknown mode {cfg.mode!r}; choose train, eval or predict")
        results = run(cfg)
    except Exception as err:
        bad_input = config_error(err)
        if bad_input is None:
            raise
        print(f"error: {bad_input}", file=sys.stderr)
        sys.exit(2)
    # For Hydra sweepers that optimise a value: the monitored test metric.
    return results.get(f"test/{cfg.task.monitor}")


if __name__ == "__main__":
    main()
