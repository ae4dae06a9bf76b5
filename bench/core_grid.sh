#!/usr/bin/env bash
# The CoRe claim (docs/benchmarks.md, section 8): from-scratch BERT-small vs CoRe on
# ../shared/data/text at the budget of experiment=core_small, one run after another (never two
# at once: the comparison is of wall-clock training time). Each run writes logs/core/<name>/;
# a run whose results.json exists is skipped, so the script can be re-run to fill gaps.
#
#   bash bench/core_grid.sh lr            # both objectives at two learning rates
#   bash bench/core_grid.sh grid 1e-3     # FFN-only relaxation, blend, an earlier switch, at CoRe's better rate
#   bash bench/core_grid.sh seeds 1e-3 1e-3 "model.switch=0.3"  # the best setting, seeds 42 and 2; baseline seed 2
#   python bench/loss_curves.py docs/img/core_small.png scratch=logs/core/scratch-lr1e-3 core=logs/core/...
set -euo pipefail
cd "$(dirname "$0")/.."
export RBERT_TEXT_DIR=${RBERT_TEXT_DIR:-../shared/data/text}

run() {  # run <name> <overrides...>
  local name=$1; shift
  local dir=logs/core/$name
  if [[ -f $dir/results.json ]]; then echo "skip $name (done)"; return; fi
  echo "== $name: $*"
  python run.py --config-name pretrain experiment=core_small "hydra.run.dir=$dir" "$@" > "$dir.log" 2>&1 \
    || { echo "   failed: see $dir.log"; return; }
  tail -n 4 "$dir.log"
}

mkdir -p logs/core
case ${1:-lr} in
  lr)
    for lr in 1e-3 2e-3; do
      run "scratch-lr$lr" model=bert_mlm model.optimizer.lr=$lr
      run "core-lr$lr" model=core model.optimizer.lr=$lr
    done ;;
  grid)
    lr=$2
    run "core-lr$lr-ffn_only" model=core model.optimizer.lr=$lr model.net.attention=softmax
    run "core-lr$lr-blend" model=core model.optimizer.lr=$lr model.transition_steps=0.1
    run "core-lr$lr-switch0.3" model=core model.optimizer.lr=$lr model.switch=0.3 ;;
  seeds)
    run "scratch-lr$2-seed2" model=bert_mlm model.optimizer.lr=$2 seed=2
    # shellcheck disable=SC2086
    run "core-lr$3-best-seed42" model=core model.optimizer.lr=$3 seed=42 $4
    # shellcheck disable=SC2086
    run "core-lr$3-best-seed2" model=core model.optimizer.lr=$3 seed=2 $4 ;;
esac
