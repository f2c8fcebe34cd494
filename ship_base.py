"""
The base shipped with the code: bases/TASK/, made by this script and nothing else.

The paper starts every run from one instruct model and varies only the RL seed. Our stand-in for that
model is the warm-started toy (exit.warm_start), so it ships like one: a Hugging Face directory
(config.json, model.safetensors, tokenizer; no pickle) that `python exit.py` uses instead of training it
again, and that `transformers` loads as any checkpoint. Beside the weights, base.json records:

    key          exit.warm_start_key of the settings that made it; a run uses the base only when its own
                 settings give the same key (another --base_seed, architecture, warm-start setting or an
                 edited family gives another key, and the run warm-starts instead, saying why)
    settings     those settings, by name
    commit       the commit it was made at (dirty: exit.py, model.py or tasks.py had uncommitted changes),
                 the command, torch, threads
    sha256       of model.safetensors
    evaluations  the base's held-out evaluation (the Base row: score at k = 0..K, fix and break rates) at a
                 run's default evaluation settings, for RL seeds 0..SEEDS-1 on the test and validation
                 splits, so a default run does not evaluate the base again (eval.evaluate_base)
    check        a small evaluation (CHECK) that test_exit.py repeats on the shipped weights

Regenerate it when test_exit.py says the key is stale (the family, its demonstrations, the architecture
or the warm start changed), on one thread as the published results were made:

    OMP_NUM_THREADS=1 python ship_base.py          # ~13 min warm start (reused from runs/base if cached) + ~5 min evaluation
"""

import argparse
import dataclasses
import datetime
import hashlib
import os
import shutil
import subprocess
import sys
import time

import torch

import eval as eval_lib
import exit as exit_lib
import hf
import model as model_lib
import runs

SEEDS = 5  # RL seeds whose Base evaluation is recorded: the ladder's
SETTINGS = ("task", "base_seed", "n_layer", "n_embd", "n_head", "n_kv_head", "warm_examples", "warm_steps",
            "warm_batch", "warm_lr", "warm_pack", "difficulties")  # what warm_start_key reads
CHECK = dict(n_problems=16, K=2, n_samples=1, temperature=1.0, max_new_tokens=48, seed=0, harder=False, split="test")


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def git(*args) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def ship(task: str, out: str, seeds: int = SEEDS, quiet: bool = False) -> dict:
    """Warm-start the base of `task` at the default settings (or reuse the cache in runs/base), write it to
    out/TASK as a Hugging Face directory, evaluate it, and write base.json. Returns the record."""
    cfg = runs.parse_args([f"--task={task}"])[0]
    checked = runs.preflight(cfg, quiet=True)
    device = model_lib.pick_device(cfg.device)
    cache = os.path.join(cfg.base_dir, f"{task}-{exit_lib.warm_start_key(cfg, checked['family'])}.pt")
    reused = os.path.isfile(cache)  # trained earlier by the same warm start (the key says so)
    t0 = time.time()
    policy, tok, _ = exit_lib.warm_start(cfg, checked["family"], device, quiet, use_shipped=False)
    seconds = time.time() - t0
    final = os.path.join(out, task)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_hf(policy, tok, tmp, dtype=torch.float32, temperature=cfg.eval_temperature)
    # what a run will load: the directory, read back; its weights must be the trained ones, bit for bit
    loaded = hf.load_hf(tmp, device)[0]
    for (name, a), b in zip(policy.state_dict().items(), loaded.state_dict().values()):
        if not torch.equal(a, b):
            raise RuntimeError(f"{tmp}: {name} did not survive the round trip through safetensors")
    evaluations = []
    for split in ("test", "val"):
        for seed in range(seeds):
            settings = eval_lib.eval_settings(dataclasses.asdict(dataclasses.replace(cfg, seed=seed, eval_split=split)))
            if not quiet:
                print(f"evaluating the base: {split} split, seed {seed}", flush=True)
            evaluations.append(eval_lib.evaluate_policy(loaded, tok, checked["eval_family"], **settings))
    record = dict(
        task=task, key=exit_lib.warm_start_key(cfg, checked["family"]),
        settings={k: getattr(cfg, k) for k in SETTINGS}, commit=git("rev-parse", "HEAD"),
        dirty=bool(git("status", "--porcelain", "--", "exit.py", "model.py", "tasks.py")),  # the code that makes it
        command=f"OMP_NUM_THREADS={torch.get_num_threads()} python ship_base.py --task={task}",
        made=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), torch=torch.__version__,
        threads=torch.get_num_threads(), device=str(device), warm_start_seconds=round(seconds),
        reused_cache=cache if reused else None,
        sha256=sha256(os.path.join(tmp, "model.safetensors")),
        check=eval_lib.evaluate_policy(loaded, tok, checked["eval_family"], **CHECK), evaluations=evaluations)
    eval_lib.write_json(record, os.path.join(tmp, "base.json"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if not quiet:
        print(f"shipped base: {final} (key {record['key']}); base row on the test split, seed 0:")
        print(eval_lib.summary(dict(base=evaluations[0])))
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description="Make the base shipped with the code (bases/TASK). " + __doc__.split("\n\n")[1])
    ap.add_argument("--task", default=exit_lib.Config.task, help="task family (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="RL seeds whose Base evaluation is recorded (default: %(default)s)")
    ap.add_argument("--out", default=exit_lib.SHIPPED, help="folder of the shipped bases (default: bases/)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        ship(args.task, args.out, args.seeds)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
