"""A thin Hydra sweeper on current Optuna (``hydra/sweeper=rbert_optuna``).

Why rbert ships its own: the ``hydra-optuna-sweeper`` releases on PyPI (1.2.0, 1.3.0) pin
``optuna<3``, which current Python, SQLAlchemy and Optuna's own storages have left behind.
This plugin keeps that plugin's search-space syntax (Hydra's override grammar, so its
configs carry over) and does only what rbert needs: ask Optuna for a batch of trials, run
them with Hydra's launcher (a local loop, or SLURM with ``hydra/launcher=slurm``), tell it
the values the jobs return (``objective``: a validation metric), and write the best trial.

    hydra:
      sweeper:
        direction: maximize          # or minimize (an MLM loss)
        n_trials: 20
        n_jobs: 1                    # trials launched together
        params:
          model.optimizer.lr: tag(log, interval(1e-5, 3e-4))   # a float range, log-uniform
          model.gamma: interval(0.3, 0.95)                       # uniform
          model.temperature: choice(1.0, 2.0, 3.0)               # categorical
          data.batch_size: range(16, 65, step=16)                # integers 16, 32, 48, 64

A job that fails or returns no value is a failed trial; the study goes on. Sweep overrides
on the command line (``model.gamma=interval(0.5,0.9)``) add to, or replace, ``params``.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


# Hydra imports plugin modules without registering them in sys.modules, so this module must
# not use postponed annotations (dataclasses would look the module up).
@dataclass
class RbertOptunaSweeperConf:
    _target_: str = "hydra_plugins.rbert_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    direction: str = "maximize"      # maximize | minimize the value each job returns
    n_trials: int = 20
    n_jobs: int = 1                  # trials per launched batch
    sampler: str = "tpe"             # tpe | random
    seed: int | None = None          # the sampler's seed
    study_name: str | None = None
    storage: str | None = None       # e.g. sqlite:///optuna.db to resume a study; None: in memory
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="rbert_optuna", node=RbertOptunaSweeperConf,
                             provider="rbert")


def distribution(override: Override):
    """The Optuna distribution of one search-space entry in Hydra's override grammar."""
    import optuna.distributions as d

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):  # start, stop (exclusive), step
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return d.IntDistribution(value.start, value.stop - value.step, step=value.step)
        return d.FloatDistribution(value.start, value.stop, step=value.step)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params.{key}: {override.input_line!r} is not a search space; "
                     "use choice(...), range(...), interval(...) or tag(log, interval(...))")


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, sampler: str, seed: int | None,
                 study_name: str | None, storage: str | None, params: dict[str, str]):
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction must be maximize or minimize, got {direction!r}")
        if sampler not in ("tpe", "random"):
            raise ValueError(f"hydra.sweeper.sampler must be tpe or random, got {sampler!r}")
        self.direction, self.n_trials, self.n_jobs = direction, int(n_trials), max(1, int(n_jobs))
        self.sampler, self.seed, self.study_name, self.storage = sampler, seed, study_name, storage
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def search_space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """(name -> distribution, the fixed overrides every trial gets)."""
        parser = OverridesParser.create()
        space = {key: distribution(parser.parse_override(f"{key}={value}")) for key, value in self.params.items()}
        fixed = []
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override)
            else:
                fixed.append(override.input_line)
        if not space:
            raise ValueError("hydra.sweeper.params is empty: nothing to search")
        return space, fixed

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        space, fixed = self.search_space(arguments)
        sampler = (optuna.samplers.TPESampler(seed=self.seed) if self.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=self.seed))
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                    direction=self.direction, load_if_exists=self.storage is not None)
        log.info("Optuna study %s: %d trials, %s %s over %s", study.study_name, self.n_trials, self.direction,
                 self.config.get("objective", "the returned value"), ", ".join(space))
        launched = 0
        while launched < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - launched))]
            batch = [tuple(fixed + [f"{name}={value}" for name, value in trial.params.items()]) for trial in trials]
            self.validate_batch_is_legal(batch)
            for trial, ret in zip(trials, self.launcher.launch(batch, initial_job_idx=launched)):
                value = ret.return_value if ret.status == JobStatus.COMPLETED else None
                if isinstance(value, int | float) and math.isfinite(value):
                    study.tell(trial, float(value))
                else:
                    log.warning("trial %d returned %r: counted as failed", trial.number, value)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            launched += len(trials)
        self.write_results(study)

    def write_results(self, study) -> None:
        done = [t for t in study.trials if t.value is not None]
        results = {"name": "optuna", "direction": self.direction, "trials": len(study.trials),
                   "completed": len(done)}
        if done:
            best = study.best_trial
            results.update(best_value=float(best.value), best_params=dict(best.params), best_trial=best.number)
            log.info("best trial %d: %s = %s with %s", best.number, self.config.get("objective"), best.value,
                     best.params)
        out = Path(self.config.hydra.sweep.dir) / "optimization_results.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(results, sort_keys=False))
