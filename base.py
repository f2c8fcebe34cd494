"""
Stage 1: the base, which ExIt (exit.py, stage 2) starts from. A random transformer cannot attempt a task
or follow an "improve" request, so it first imitates the family's demonstrations, whose error model makes
it a weak instruct model (tasks.py): our stand-in for the instruct model the paper starts from, and like
it the same for every RL seed. `warm_start` finds the base of a run's settings (their `warm_start_key`):
shipped with the code in bases/TASK, cached in base_dir, or trained now (`train_base`, ~12 minutes on one
thread) and cached. A run reaches this file through runs.preflight, which hands exit.Trainer its loader
(`load`), and runs.write_results, which takes the Base row of eval.json from `evaluate_base`; the core
never imports it.

`python base.py` makes bases/TASK (`ship`): a Hugging Face directory (config.json, model.safetensors,
tokenizer; no pickle) that `python exit.py` uses instead of training it again, and that `transformers`
loads as any checkpoint. Beside the weights, base.json records:

    key          warm_start_key of the settings that made it; a run uses the base only when its own
                 settings give the same key (another --base_seed, architecture, warm-start setting or an
                 edited family gives another key, and the run warm-starts instead, saying why)
    settings     those settings, by name
    commit       the commit it was made at (dirty: the code it depends on, SHAPING, had uncommitted
                 changes), the command, torch, threads
    sha256       of model.safetensors
    evaluations  the base's held-out evaluation (the Base row: score at k = 0..K, fix and break rates) at a
                 run's default evaluation settings, for RL seeds 0..SEEDS-1 on the test and validation
                 splits, so a default run does not evaluate the base again (evaluate_base)
    check        a small evaluation (CHECK) that test_exit.py repeats on the shipped weights

Regenerate it when test_exit.py says the key is stale (the family, its demonstrations, the architecture
or the warm start changed), on one thread as the published results were made:

    OMP_NUM_THREADS=1 python base.py          # ~13 min warm start (reused from runs/base if cached) + ~5 min evaluation
"""

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import eval as eval_lib
import exit as exit_lib  # the Config ship() makes bases/ with; exit.py never imports this file
import hf
import model as model_lib
import tasks as tasks_lib
import tokenizer as tokenizer_lib

TOY_TOKENIZER = dict(kind="byte", markers=list(tasks_lib.MARKERS))  # how a checkpoint rebuilds the toy's tokenizer


def warm_start_key(cfg, family) -> str:
    """What makes a base: family, error model, demonstrations, architecture, SFT settings, seed."""
    keys = dict(task=cfg.task, error_model=family.error_model, seed=cfg.warm_seed,
                arch=[cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head],
                sft=[cfg.warm_examples, cfg.warm_steps, cfg.warm_batch, cfg.warm_lr], markers=tasks_lib.MARKERS)
    if cfg.warm_pack:  # other float sums, another base: a padded base is not reused for a packed run
        keys["sft"].append("packed")
    if tuple(family.train_difficulties) != tuple(type(family).train_difficulties):  # --difficulties, not the family's own
        keys["difficulties"] = list(family.train_difficulties)
    keys["demos"] = hashlib.sha1(json.dumps(family.demonstrations(32, cfg.warm_seed)).encode()).hexdigest()
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bases")  # bases/TASK/: made by ship()


def shipped_base(cfg, key: str, quiet: bool = False) -> str | None:
    """bases/TASK (a Hugging Face directory; base.json: the key that made it) if it has this key, else None."""
    path = os.path.join(SHIPPED, cfg.task)
    if not os.path.isfile(os.path.join(path, "base.json")):
        return None
    try:
        record = hf.read_json(os.path.join(path, "base.json"))
        shipped, rows = (record.get("key"), record.get("evaluations", [])) if isinstance(record, dict) else (None, None)
        if not isinstance(shipped, str) or not isinstance(rows, list) or not isinstance(record.get("settings", {}), dict):
            raise ValueError("no key, no list of evaluations, or settings that are not a dict")
        if shipped == key:  # before any work: the weights the run will load (not a Git LFS pointer, cut or altered)
            if sha256(os.path.join(path, "model.safetensors")) != record.get("sha256"):
                raise ValueError("its model.safetensors is not the file it hashes")
            for row in rows:  # and the Base rows it will report
                eval_lib.check_evaluation(row, "an evaluation", whole=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}/base.json is damaged ({str(e).split(';')[0]}): `git checkout {path}` restores it") from None
    if shipped != key and not quiet:
        print(f"warm start: not using the shipped base {path} (its key {shipped}, these settings' {key}: another "
              "--base_seed, architecture, warm-start setting, or an edited family)")
    return path if shipped == key else None


def encode_pair(tok, prompt: str, response: str):
    """Token ids of a compact prompt (markers -> special tokens), and of a response + end of text."""
    return tasks_lib.prompt_ids(tok, prompt), tok.encode(response) + [tok.eos_id]


def sft_batch(batch, pad_id, packed=False):
    """Demonstrations [(prompt ids, response ids)] as forward arguments, the loss on the responses only."""
    if not packed:
        idx = model_lib.right_pad([p + r for p, r in batch], pad_id)
        where = [(i, 0) for i in range(len(batch))]
        extra = {}  # causal attention: right padding is invisible to the real tokens
    else:
        idx, positions, mask, where = model_lib.pack([p + r for p, r in batch], pad_id)
        extra = dict(positions=positions, mask=mask)
    tgt = torch.full_like(idx, -100)
    for (row, at), (p, r) in zip(where, batch):
        tgt[row, at + len(p) - 1:at + len(p) + len(r) - 1] = torch.tensor(r)  # position t predicts token t + 1
    return dict(idx=idx, targets=tgt, **extra)


def warm_start(cfg, family, device, quiet=False, use_shipped=True):
    """The base of these settings, and where it is: shipped in bases/, cached in base_dir, or trained now."""
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    key = warm_start_key(cfg, family)
    mcfg = dataclasses.replace(model_lib.toy_config(tok.vocab_size), n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                               n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, intermediate_size=3 * cfg.n_embd)
    shipped = use_shipped and shipped_base(cfg, key, quiet)
    if not shipped:
        return cached_or_trained(cfg, family, mcfg, tok, key, device, quiet)
    if not quiet:  # the same weights as a warm start with these settings would train (bases/TASK/base.json)
        print(f"warm start: using the base shipped in {os.path.relpath(shipped)} (key {key})")
    return hf.load_weights(model_lib.Transformer(mcfg), shipped).to(device), tok, shipped


def cached_or_trained(cfg, family, mcfg, tok, key: str, device, quiet=False):
    """The base of `key` cached in base_dir, else trained now (train_base) and cached there."""
    path = os.path.join(cfg.base_dir, f"{cfg.task}-{key}.pt")
    if os.path.exists(path):
        try:  # the key fixed its tokenizer's markers
            ck = model_lib.load_checkpoint(path)
            if ck.get("kind", "base") != "base" or ck.get("key", key) != key:  # (caches from before kind and key: bases)
                raise ValueError(f"{path} is not the base of these settings (a {ck.get('kind')} checkpoint, key {ck.get('key')})")
            policy, _ = model_lib.policy_from_state(ck["policy"], device, lambda spec: tok, path)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:  # also: unpickles, but is no base
            why = e if isinstance(e, ValueError) else f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            raise ValueError(f"{why}; it is the cached base of these settings: delete it to warm-start anew") from None
        if not quiet:
            print(f"warm start: reusing {path}")
        return policy, tok, path
    hf.check_writable(cfg.base_dir, "--base_dir")  # before the warm start, not a base trained and lost
    policy = train_base(cfg, family, mcfg, tok, device, quiet)
    try:
        model_lib.atomic_save(dict(policy=model_lib.policy_state(policy, TOY_TOKENIZER), kind="base", key=key), path)
    except OSError as e:  # the base trained: this run uses it; only the cache is lost
        print(f"warning: {e}; this run goes on with the base it trained, the next one will train it again",
              file=sys.stderr)
        return policy, tok, path
    if not quiet:
        print(f"warm start: saved {path}")
    return policy, tok, path


def train_base(cfg, family, mcfg, tok, device, quiet=False):
    """Stage 1: supervised learning on the family's demonstrations; AdamW, warm-up then cosine decay."""
    torch.manual_seed(cfg.warm_seed)
    policy = model_lib.Transformer(mcfg).to(device)
    pairs = [encode_pair(tok, p, r) for p, r in family.demonstrations(cfg.warm_examples, seed=cfg.warm_seed)]
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.warm_lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(cfg.warm_seed)
    bar = tqdm(range(cfg.warm_steps), desc="warm start", disable=quiet, dynamic_ncols=True)
    for step in bar:
        warm = min(1.0, (step + 1) / 50)
        lr = cfg.warm_lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.warm_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [pairs[i] for i in rng.integers(0, len(pairs), cfg.warm_batch)]
        inputs = {k: t.to(device) for k, t in sft_batch(batch, tok.pad_id, cfg.warm_pack).items()}
        with model_lib.autocast(device):
            _, loss = policy(**inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return policy.eval()


def load(cfg, family, device, quiet: bool = False) -> tuple:
    """What exit.Trainer starts from: (policy, tokenizer, how a checkpoint rebuilds it, the base's path)."""
    policy, tok, path = warm_start(cfg, family, device, quiet)
    return policy, tok, TOY_TOKENIZER, os.path.abspath(path)  # absolute: eval.py may run from another folder


# -----------------------------------------------------------------------------
# The base's evaluation, the Base row of eval.json: recorded with a shipped base, else cached beside it.


def shipped_record(base_path: str) -> dict | None:
    """base.json of a base shipped with the code (bases/TASK: base.ship), None for any other base."""
    record = os.path.join(base_path, "base.json")
    return hf.read_json(record) if os.path.isfile(record) else None


def toy_base(base_path: str) -> bool:
    """A toy base (a cached .pt file, or shipped in bases/), not a real Hugging Face checkpoint (never loaded twice)."""
    return os.path.isfile(base_path) or shipped_record(base_path) is not None


def weights_fingerprint(path: str) -> list:
    """What identifies the policy at path: each file's name, size and mtime (hashing would read 20 GB); of a directory,
    every file but base.json (the tokenizer's and its chat template too: they change the prompts)."""
    files = ([path] if os.path.isfile(path)
             else sorted(os.path.join(path, n) for n in os.listdir(path) if n != "base.json"))
    return [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]


def evaluate_base(base_path: str, tok, family, device, load_policy, **settings) -> dict:
    """The base's evaluation, cached beside it keyed by settings, problems and weights: a ladder evaluates it once."""
    record = shipped_record(base_path) or {}  # its rows: of its task's problems at its difficulties, and of its weights
    own = record.get("task") == family.name and sha256(os.path.join(base_path, "model.safetensors")) == record.get("sha256") \
        and family.train_difficulties == tasks_lib.make_family(
            family.name, difficulties=record.get("settings", {}).get("difficulties", "")).train_difficulties
    for res in record.get("evaluations", []) if own else []:
        if isinstance(res, dict) and res.get("settings") == settings:
            return eval_lib.check_evaluation(res, os.path.join(base_path, "base.json"), whole=False)
    # the problems too: two realmath runs from one checkpoint with different --data files differ
    problems = [p.request for p in eval_lib.heldout_problems(family, settings["n_problems"], harder=settings["harder"],
                                                             warn=False, split=settings.get("split", "test"))]
    key = json.dumps(dict(family=family.name, problems=problems, weights=weights_fingerprint(base_path), **settings),
                     sort_keys=True)
    cache = f"{os.path.normpath(base_path)}.eval-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
    if os.path.isfile(cache):
        with contextlib.suppress(ValueError):  # a damaged cache is a miss: the base is evaluated again, the cache rewritten
            return eval_lib.check_evaluation(hf.read_json(cache), cache, whole=False)
    res = eval_lib.evaluate_policy(load_policy(base_path, device)[0], tok, family, **settings)
    with contextlib.suppress(OSError):  # a folder this process cannot write: the evaluation is not cached
        hf.write_json(res, cache)
    return res


# -----------------------------------------------------------------------------
# The shipped base: `python base.py`.


SEEDS = 5  # RL seeds whose Base evaluation is recorded: the ladder's
SETTINGS = ("task", "base_seed", "n_layer", "n_embd", "n_head", "n_kv_head", "warm_examples", "warm_steps",
            "warm_batch", "warm_lr", "warm_pack", "difficulties")  # what warm_start_key reads
CHECK = dict(n_problems=16, K=2, n_samples=1, temperature=1.0, max_new_tokens=48, seed=0, harder=False, split="test")


SHAPING = ("base.py", "model.py", "tasks.py", "tokenizer.py", "hf.py", "exit.py", "eval.py")  # what a shipped base depends on


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def git(*args) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def ship_settings(task: str) -> tuple:
    """(config, family, evaluation family) of `python exit.py --task=TASK`: the defaults and the family's
    recommended settings (runs.family_settings with nothing given)."""
    shippable = [n for n, f in tasks_lib.FAMILIES.items() if f.has_demonstrations and not f.reads_data]
    if task not in shippable:
        raise ValueError(f"--task={task}: a toy base ships for a family with demonstrations ({', '.join(shippable)})")
    cfg = exit_lib.Config(task=task, **getattr(tasks_lib.FAMILIES[task], "recommended", {}))
    family = tasks_lib.make_family(task)
    return cfg, family, tasks_lib.eval_family(cfg.eval_data, family)


def ship(task: str, out: str, seeds: int = SEEDS, quiet: bool = False) -> dict:
    """Warm-start the base of `task` at the default settings (or reuse the cache in runs/base), write it to
    out/TASK as a Hugging Face directory, evaluate it, and write base.json. Returns the record."""
    cfg, family, eval_family = ship_settings(task)
    hf.check_writable(out, "--out")  # before the warm start
    checked = dict(family=family, eval_family=eval_family)
    device = model_lib.pick_device(cfg.device)
    cache = os.path.join(cfg.base_dir, f"{task}-{warm_start_key(cfg, checked['family'])}.pt")
    reused = os.path.isfile(cache)  # trained earlier by the same warm start (the key says so)
    t0 = time.time()
    policy, tok, _ = warm_start(cfg, checked["family"], device, quiet, use_shipped=False)
    seconds = time.time() - t0
    final = os.path.join(out, task)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # written beside bases/TASK and swapped in whole: a failure or Ctrl-C leaves bases/TASK as it was
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
            task=task, key=warm_start_key(cfg, checked["family"]),
            settings={k: getattr(cfg, k) for k in SETTINGS}, commit=git("rev-parse", "HEAD"),
            dirty=bool(git("status", "--porcelain", "--", *SHAPING)),
            command=f"OMP_NUM_THREADS={torch.get_num_threads()} python base.py --task={task} --seeds={seeds}"
                    + ("" if os.path.abspath(out) == SHIPPED else f" --out={out}"),
            made=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), torch=torch.__version__,
            threads=torch.get_num_threads(), device=str(device), warm_start_seconds=round(seconds),
            reused_cache=cache if reused else None,
            sha256=sha256(os.path.join(tmp, "model.safetensors")),
            check=eval_lib.evaluate_policy(loaded, tok, checked["eval_family"], **CHECK), evaluations=evaluations)
        hf.write_json(record, os.path.join(tmp, "base.json"))
        old = f"{final}.old{os.getpid()}"  # the old one steps aside for the instant of the swap (not deleted first)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"shipped base: {final} (key {record['key']}); base row on the test split, seed 0:")
        print(eval_lib.summary_table(dict(base=evaluations[0])))
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python base.py", description="Make the base shipped with the code (bases/TASK): "
                                 "warm-start it (or reuse runs/base's cache), evaluate it, write it with base.json.")
    ap.add_argument("--task", default="exactsumfb", help="task family (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="RL seeds whose Base evaluation is recorded (default: %(default)s)")
    ap.add_argument("--out", default=SHIPPED, help="folder of the shipped bases (default: bases/)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        ship(args.task, args.out, args.seeds)
    except (ValueError, OSError) as e:  # OSError: a write refused after the check (a full disk)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {os.path.join(args.out, args.task)} is as it was", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
