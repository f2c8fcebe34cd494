"""
The run around the method: the command line, the checks made before any work, the run folder (one run
per folder, locked, never overwritten), resume and Ctrl-C. exit.main enters here and nowhere else; a
reader of the method can skip this file. Several processes and real checkpoints: scale.py.
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time

import torch
from tqdm import tqdm

import base as base_lib
import eval as eval_lib
import exit as exit_lib
import hf
import model as model_lib
import scale
import tasks as tasks_lib
import tokenizer as tokenizer_lib

Config = exit_lib.Config


# -----------------------------------------------------------------------------
# The command line: --key=value pairs into the one Config, every value checked before any work.


BOOLS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)


def _parse_value(name, typ, text):
    try:
        return BOOLS[text.lower()] if typ is bool else typ(text)
    except (KeyError, ValueError):
        expects = "a bool (true/false)" if typ is bool else typ.__name__
        raise ValueError(f"--{name} expects {expects}, got {text!r}") from None


def config_help() -> str:
    lines = ["usage: python exit.py [--key=value ...]   (a bare --flag sets a bool to true)", ""]
    for f in dataclasses.fields(Config):
        lines.append(f"  {f'--{f.name}={f.default}':<26} {f.type.__name__:<5} {f.metadata['help']}")
    return "\n".join(lines)


def parse_args(argv) -> tuple[Config, set]:
    """--key=value pairs -> (Config, the set of keys given). Unknown keys or bad values -> ValueError."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(fields)}")
        if key in values:  # the last one silently winning hides a typo in a long command line
            raise ValueError(f"--{key} is given twice; give it once")
        typ = fields[key].type
        if not eq and typ is not bool:
            raise ValueError(f"--{key} needs a value: --{key}=...")
        values[key] = _parse_value(key, typ, text if eq else "true")  # a bare --flag sets a bool to true
    cfg = Config(**{**family_settings(values), **values})
    return (cfg if cfg.resume else check_config(cfg)), set(values)  # resume: checked merged with its checkpoint's


TOY_ONLY = {"n_layer", "n_embd", "n_head", "n_kv_head", "warm_examples", "warm_steps", "warm_batch", "warm_lr",
            "warm_pack", "base_seed", "base_dir"}  # what builds the toy's base; --init brings its own
EQ6 = {"div_minmax", "div_clip", "div_mean"}
INERT = dict(grpo={"buffer_size", "min_size", "replay_prob", "kappa", "admission", "children", "p_div"} | EQ6,
             curriculum={"children", "p_div"} | EQ6, improve={"p_div"} | EQ6, diverge=EQ6, exit=set())  # §5.2's rungs


def check_given(cfg: Config, given: set, quiet: bool = False):
    """Given settings that cannot apply: the toy's base settings with --init are an error; INERT ones, a warning."""
    clash = sorted(given & TOY_ONLY) if cfg.init else []
    if clash:
        raise ValueError(f"--{', --'.join(clash)}: settings of the warm-started toy, which --init replaces "
                         "(the checkpoint brings its own architecture); drop them")
    inert = sorted(given & (INERT.get(cfg.method, set()) | ({"ref_every", "ref_alpha"} if cfg.beta == 0 else set())))
    if inert and not quiet:
        print(f"warning: --{', --'.join(inert)} change(s) nothing under --method={cfg.method}"
              + (" with --beta=0" if {"ref_every", "ref_alpha"} & set(inert) else ""), file=sys.stderr)


def family_settings(given: dict) -> dict:
    """The task family's recommended settings (TaskFamily.recommended) for every key not given."""
    family = tasks_lib.FAMILIES.get(given.get("task", Config.task))
    rec = {k: v for k, v in getattr(family, "recommended", {}).items() if k not in given}
    if "buffer_size" in given and "min_size" in rec:  # B_min goes with N: keep the recommended proportion
        rec["min_size"] = max(1, given["buffer_size"] * rec["min_size"] // family.recommended["buffer_size"])
    return rec


# the settings that name one of a few options (FAMILIES itself: a family registered later counts)
CHOICES = dict(method=exit_lib.METHODS, task=tasks_lib.FAMILIES, children=("all", "one"), eval_split=("test", "val"),
               admission=("score", "fifo"), dtype=exit_lib.DTYPES)


def check_config(cfg: exit_lib.Config) -> exit_lib.Config:
    """Every setting checked before any work: a bad one is a ValueError that names it."""
    def need(ok, msg):
        if not ok:
            raise ValueError(f"config: {msg}")
    for f in dataclasses.fields(cfg):  # --lr=inf trains to NaN weights; --kappa=nan samples nothing sensible
        v = getattr(cfg, f.name)
        need(not isinstance(v, float) or math.isfinite(v), f"{f.name} must be a finite number, got {v}")
    for k, options in CHOICES.items():
        need(getattr(cfg, k) in options, f"{k} must be one of {tuple(options)}, got {getattr(cfg, k)!r}")
    need(not (cfg.eval_split == "val" and cfg.eval_data), "--eval_data is a test file: it has no validation "
         "split; for --eval_split=val drop --eval_data (the validation tenth of --data is used)")
    family = tasks_lib.FAMILIES[cfg.task]
    need(family.reads_data == bool(cfg.data), f"--data=FILE goes with --task=realmath (a family that reads its "
         f"problems from a file), and such a family needs it (--task={cfg.task})")
    need(family.has_demonstrations or bool(cfg.init), f"--task={cfg.task} needs --init=HF_DIR: it has no "
         "demonstrations to warm-start from")
    if cfg.difficulties:
        tasks_lib.parse_difficulties(cfg.difficulties, cfg.task)  # raises a config error naming the bad text
    need(cfg.base_seed >= -1, f"base_seed must be >= 0, or -1 for --seed's, got {cfg.base_seed}")
    need(max(cfg.seed, cfg.base_seed) < 2 ** 62, "seed and base_seed must be < 2**62 (torch's generators take 64 bits)")
    need(not (cfg.div_minmax and cfg.div_mean), "--div_minmax and --div_mean are two forms of Eq. 6: give one")
    need(cfg.group_size >= 2, "group_size must be >= 2 (GRPO compares rollouts within a group)")
    for k in ("iters", "tasks_per_iter", "epochs", "max_new_tokens", "buffer_size", "min_size", "ref_every",
              "warm_steps", "warm_batch", "warm_examples", "log_every", "ckpt_every", "eval_samples", "eval_every_problems"):
        need(getattr(cfg, k) >= 1, f"{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("replay_prob", "p_div", "ref_alpha"):
        need(0.0 <= getattr(cfg, k) <= 1.0, f"{k} must be in [0, 1], got {getattr(cfg, k)}")
    for k in ("lr", "warm_lr", "clip_eps", "grad_clip"):
        need(getattr(cfg, k) > 0, f"{k} must be > 0, got {getattr(cfg, k)}")
    for k in ("seed", "beta", "kappa", "div_clip", "eval_temperature", "micro_batch", "show_every", "eval_problems",
              "eval_every", "eval_k", "weight_decay"):
        need(getattr(cfg, k) >= 0, f"{k} must be >= 0, got {getattr(cfg, k)}")
    need(cfg.min_size <= cfg.buffer_size, f"min_size ({cfg.min_size}) must be <= buffer_size ({cfg.buffer_size})")
    need(cfg.temperature > 0, "temperature must be > 0 in training: GRPO learns from the differences between "
                               "a group's G sampled rollouts, and greedy decoding (0) makes them identical, so "
                               "every advantage would be 0 and nothing would ever be updated")
    need(not cfg.eval_data or family.reads_data, "--eval_data=FILE goes with --task=realmath")
    if not cfg.init:  # the toy's shape (a checkpoint brings its own)
        need(min(cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd) >= 1,
             "n_layer, n_head, n_kv_head and n_embd must be >= 1")
        need(cfg.n_embd % cfg.n_head == 0 and (cfg.n_embd // cfg.n_head) % 2 == 0,
             f"n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head}) with an even quotient "
             "(the head width, which rotary embeddings split in halves)")
        need(cfg.n_head % cfg.n_kv_head == 0,
             f"n_head ({cfg.n_head}) must be a multiple of n_kv_head ({cfg.n_kv_head}) (grouped-query attention)")
    try:
        model_lib.pick_device(cfg.device)
    except ValueError as e:
        need(False, str(e))
    return cfg


# -----------------------------------------------------------------------------
# The run: exit.main's steps around the method (exit.train, exit.final_evaluation): `run`, `finish`,
# `write_results`.


@contextlib.contextmanager
def run(argv):
    """Parse and check the command line, lock the run folder, yield the Trainer (fresh or resumed); a bad
    input is one line `error: ...` and exit code 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(config_help())
        raise SystemExit(0)
    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # kill outside the RL loop: as Ctrl-C
    try:
        cfg, given = parse_args(argv)
        if "WORLD_SIZE" in os.environ:  # data parallel, under torchrun only
            scale.dist_init(cfg)
        check_given(cfg, given, quiet=not scale.is_main())
        recommended = family_settings({k: getattr(cfg, k) for k in given} | {"task": cfg.task})
        if recommended and not cfg.resume and scale.is_main():
            print(f"{cfg.task}: the family's recommended settings: "
                  + " ".join(f"--{k}={v}" for k, v in recommended.items()) + " (set any of them to override)")
        check_out_dir(cfg)
        with folder_lock(cfg.out_dir):  # held until eval.json is written
            trainer = start(cfg, given)
            yield trainer
    except (ValueError, RuntimeError, OSError, KeyboardInterrupt) as e:
        raise SystemExit(failed(e, getattr(locals().get("trainer"), "saved", None)))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if torch.distributed.is_initialized() and not scale.dist_end():  # data parallel: done; rank 0 reports
        return
    t = trainer.timing
    other = trainer.elapsed - t["sampling"] - t["update"] - t["buffer"]
    print(f"time: warm start {t['warm_start']:.0f}s, RL {trainer.elapsed:.0f}s (sampling {t['sampling']:.0f}s, update "
          f"{t['update']:.0f}s, buffer {t['buffer']:.0f}s, other {other:.0f}s), evaluation {t.get('evaluation', 0):.0f}s")
    print(f"done: {trainer.iter} iterations in {trainer.elapsed:.0f}s of RL; run folder {trainer.cfg.out_dir}\n"
          f"next: `python eval.py {trainer.cfg.out_dir}` (plots, the curriculum's lineage, one improvement chain), "
          f"`python hf.py {trainer.cfg.out_dir}` (a Hugging Face export)")


def write_results(trainer, res: dict | None):
    """eval.json (rank 0): the policy's evaluation (exit.final_evaluation), its base's (base.evaluate_base) and
    the task diversity of what it trained on (Tables 2, 7); the table."""
    if res is None or not trainer.is_main:
        return
    cfg, t0 = trainer.cfg, time.time()
    settings = eval_lib.eval_settings(dataclasses.asdict(cfg))
    embedder = trainer.base_policy() if base_lib.toy_base(trainer.base_path) else None  # the frozen base embeds
    load = lambda path, device: (embedder if embedder is not None else trainer.base_policy(),)  # a toy base: loaded once
    base = base_lib.evaluate_base(trainer.base_path, trainer.tok, trainer.eval_family, trainer.device, load, **settings)
    diversity = eval_lib.run_diversity(trainer.seen["ids"], embedder)
    hf.write_json(dict(policy=res, base=base, **({"diversity": diversity} if diversity else {})),
                  os.path.join(cfg.out_dir, "eval.json"))
    print(eval_lib.summary_table(dict(base=base, **{cfg.method: res})))
    if diversity:
        print(f"task diversity of the instances trained on ({diversity['n']} of them): mean pairwise cosine distance "
              f"{diversity['cosine']:.4f}, L2 {diversity['l2']:.3f}")
    trainer.timing["evaluation"] += time.time() - t0


def failed(e: BaseException, saved: int | None) -> int:
    """What `run` prints for an error that stops a run, and its exit code: 2 a bad input, 1 out of memory, a lost
    rank or a refused write, 130 Ctrl-C or kill outside the RL loop (warm start, evaluation), or a second one."""
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError)):
        # under torchrun a rank that exits stops the others (torchrun ends them); the message says which rank
        print(f"error{f' (rank {scale.rank()})' if scale.world_size() > 1 else ''}: {e}", file=sys.stderr)
        return 2
    intact = f"ckpt.pt at iteration {saved}" if saved else "its last checkpoint, if it has one"
    if isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e):
        print(f"\nerror: out of memory ({str(e).splitlines()[0][:200]}): lower --tasks_per_iter, --group_size or "
              f"--max_new_tokens, or set --micro_batch; the run folder keeps {intact} (--resume continues it)",
              file=sys.stderr)
        return 1
    if isinstance(e, RuntimeError):  # data parallel: a collective failed because another rank is gone (killed, crashed)
        if scale.world_size() == 1:
            raise e
        why = str(e).splitlines()[0].split(". ")[0][:200]  # gloo's first sentence
        print(f"\nerror (rank {scale.rank()}): another rank stopped ({why}); the run folder keeps {intact} "
              "(continue with --resume)", file=sys.stderr)
        return 1
    if isinstance(e, OSError):  # the machine refused a write: disk full, read-only
        print(f"\nerror: {e}; the run folder keeps {intact} (continue with --resume once the cause is gone)",
              file=sys.stderr)
        return 1
    print("\ninterrupted: stopped at once; the run folder keeps its last checkpoint, if it has one "
          "(continue with --resume)", file=sys.stderr)
    return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def start(cfg: Config, given: set = frozenset(), quiet: bool = False) -> exit_lib.Trainer:
    """The Trainer of a run whose folder this process holds, config.json written (resume: log cut back, set_aside)."""
    if scale.is_main():  # what a writer killed with -9 left: half a checkpoint
        remove_stale_tmp(cfg.out_dir)
    trainer = prepare(cfg, given, quiet or not scale.is_main())  # data parallel: rank 0 prints and writes the folder
    cfg = trainer.cfg
    scale.barrier()  # data parallel: every rank has checked (and read) the folder before rank 0 writes to it
    if scale.is_main():
        hf.write_json(dict(dataclasses.asdict(cfg), world_size=scale.world_size(),
                           policy=dataclasses.asdict(trainer.policy.config)), os.path.join(cfg.out_dir, "config.json"))
        if cfg.resume:
            truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), trainer.iter)
            if trainer.iter < cfg.iters:  # it trains on: what describes the checkpoint's policy now goes aside
                set_aside(cfg.out_dir, trainer.iter, quiet)
    return trainer


def set_aside(out_dir: str, done: int, quiet: bool = False):
    """A resume that trains past iteration `done` moves what eval.py and hf.py wrote of that iteration's policy
    (evaluations, chains, comparisons, plots, the hf/ export) into out_dir/iterDONE/: kept, never mistaken (by
    eval.py, which reuses an evaluation it finds) for the policy the folder's ckpt.pt will hold."""
    names = sorted({n for n in run_artifacts(out_dir) if n not in ("ckpt.pt", "config.json", "log.jsonl")}
                   | {n for n in os.listdir(out_dir) if n.endswith((".png", "chain.txt"))})
    if names:
        dest = os.path.join(out_dir, f"iter{done}")
        os.makedirs(dest, exist_ok=True)
        for n in names:  # the same names there are of the same policy: ckpt.pt was at `done` then too
            shutil.rmtree(os.path.join(dest, n), ignore_errors=True)
            os.replace(os.path.join(out_dir, n), os.path.join(dest, n))
        if not quiet:
            print(f"note: {', '.join(names)} describe(s) the policy at iteration {done}, which this resume trains "
                  f"on from: moved to {dest}", file=sys.stderr)


def finish(trainer, stop: list):
    """After the RL loop: stopped by a signal, exit 130 (its checkpoint is written)."""
    if trainer.any_rank(len(stop)):
        print(f"\ninterrupted after iteration {trainer.iter}: checkpoint written; continue with --resume")
        raise SystemExit(130)


def train(cfg: Config, given: set = frozenset(), quiet: bool = False) -> exit_lib.Trainer:
    """Stage 1 + stage 2 of a run as a library call (tests, notebooks), holding the run folder's lock: the
    trainer at the end, its checkpoint written; no final evaluation."""
    check_out_dir(cfg)
    with folder_lock(cfg.out_dir):
        trainer = start(cfg, given, quiet)
        with stop_signals() as stop:
            exit_lib.train(trainer, stop)
        finish(trainer, stop)
        return trainer


RESUMABLE_OVERRIDES = {"iters", "resume", "out_dir", "device", "log_every", "show_every", "ckpt_every", "grad_checkpoint",
                       "eval_problems", "eval_k", "eval_samples", "eval_temperature", "eval_harder", "eval_data",
                       "eval_every", "eval_every_problems", "eval_split"}


def prepare(cfg: Config, given: set = frozenset(), quiet: bool = False) -> exit_lib.Trainer:
    """A Trainer, fresh or resumed from out_dir/ckpt.pt. Resuming never silently starts afresh."""
    # absolute paths: eval.py may evaluate the run, and a resume continue it, from another folder
    cfg = dataclasses.replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in ("data", "init", "eval_data")
                                      if getattr(cfg, k)})
    if cfg.resume:
        return resume(cfg, given, quiet)
    check_config(cfg)  # again for a library call (runs.train(exit.Config(...))), which parse_args did not check
    found = run_artifacts(cfg.out_dir)
    if found:
        hint = "pass --resume to continue it" if "ckpt.pt" in found else "it has no ckpt.pt to --resume from"
        raise FileExistsError(f"{cfg.out_dir} already holds a run ({', '.join(found)}): {hint}, or choose another "
                              "--out_dir (a fresh run never replaces a run's files)")
    scale.check_world(cfg)
    return build(cfg, quiet)


EVAL_KEYS = ("eval_problems", "eval_k", "eval_samples", "eval_temperature", "eval_split", "eval_harder", "eval_data")
CURVE_KEYS = ("eval_k", "eval_temperature", "eval_split", "eval_every_problems", "eval_data")  # what a point measures


def check_meaning(out_dir: str, done: int, old: Config, new: dict):
    """A resumed run stays the run it was: a larger --iters extends it, but --iters below the iterations it
    has run, other evaluation settings once it has an eval.json, or other settings of its --eval_every points
    once it has one, would rewrite what its files say."""
    if new.get("iters", old.iters) < done:
        raise ValueError(f"--iters={new['iters']}: the run in {out_dir} has run {done} iterations, and a run is never "
                         "cut back (a larger --iters extends it)")
    changed = {k: (getattr(old, k), v) for k, v in new.items() if k in EVAL_KEYS and getattr(old, k) != v}
    if changed and os.path.isfile(os.path.join(out_dir, "eval.json")):
        raise ValueError(f"{out_dir} is evaluated (eval.json) with " + ", ".join(f"{k}={a!r}" for k, (a, _) in changed.items())
                         + "; --resume with " + ", ".join(f"--{k}={b}" for k, (_, b) in changed.items())
                         + " would replace that evaluation with another: evaluate it at other settings with "
                         f"`python eval.py {out_dir} --split=... --k=... --problems=...` (written beside eval.json)")
    curve = {k: (getattr(old, k), v) for k, v in new.items() if k in CURVE_KEYS and getattr(old, k) != v}
    if curve and any("heldout_k0" in e for e in read_log(out_dir) if e["iter"] <= done):  # points at the old settings
        raise ValueError(f"{out_dir}/log.jsonl holds held-out points (--eval_every) measured with "
                         + ", ".join(f"{k}={a!r}" for k, (a, _) in curve.items()) + "; --resume with "
                         + ", ".join(f"--{k}={b}" for k, (_, b) in curve.items())
                         + " would join points of another evaluation into one curve: resume with the same settings")


REMOVED = dict(rank_temperature=0.0, staleness_coef=0.0)  # settings of earlier versions (PLR's extensions), at "off"


def resume(cfg: Config, given: set, quiet: bool) -> exit_lib.Trainer:
    """The run in out_dir, from its ckpt.pt, with the checkpoint's settings (those in RESUMABLE_OVERRIDES may
    be given anew)."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ck = model_lib.load_checkpoint(ckpt_path)
    missing = [k for k in ("config", "iter", "optimizer", "buffer", "rng") if k not in ck]
    if ck.get("kind") != "run" or missing or not isinstance(ck["config"], dict):
        raise ValueError(f"{ckpt_path} is not a run checkpoint" + (f" (it has no {', '.join(missing)})" if missing else ""))
    saved = ck["config"]
    clash = {k: (saved[k], getattr(cfg, k)) for k in given - RESUMABLE_OVERRIDES
             if k in saved and saved[k] != getattr(cfg, k)}
    if clash:
        raise ValueError("--resume with settings that differ from the checkpoint's: "
                         + ", ".join(f"{k} (checkpoint {a!r}, given {b!r})" for k, (a, b) in clash.items()))
    saved = {k: v for k, v in saved.items() if not (k in REMOVED and v == REMOVED[k])}  # off: they changed nothing
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = set(saved) - set(types)
    if unknown:
        raise ValueError(f"{ckpt_path} has config keys this version does not know: {sorted(unknown)}")
    wrong = sorted(k for k, v in saved.items() if type(v) is not types[k] and not (types[k] is float and type(v) is int))
    if wrong:
        raise ValueError(f"{ckpt_path} has config values of the wrong type: " + ", ".join(f"{k}={saved[k]!r}" for k in wrong))
    new = {k: getattr(cfg, k) for k in given & RESUMABLE_OVERRIDES}
    check_meaning(cfg.out_dir, ck["iter"], Config(**saved), new)
    cfg = dataclasses.replace(Config(**saved), **new)
    cfg.resume = True
    check_config(cfg)
    check_resume_folder(cfg.out_dir, ck)
    scale.check_world(cfg)
    saved_world = ck.get("world_size", 1)
    if saved_world != scale.world_size() and scale.is_main() and not quiet:  # data parallel
        print(f"warning: {ckpt_path} was trained on {saved_world} process(es), this run has {scale.world_size()}: it "
              "continues the same curriculum on the same global batches, but not bit-exactly (the gradient "
              "is summed in another order, so the weights drift apart by float rounding and later samples "
              f"may differ); run with --nproc_per_node={saved_world} to continue it exactly", file=sys.stderr)
    trainer = build(cfg, quiet)
    try:
        trainer.load_state_dict(ck)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"{ckpt_path} does not match this run ({type(e).__name__}: {e})") from None
    return trainer


def build(cfg: Config, quiet: bool) -> exit_lib.Trainer:
    """exit.Trainer, or scale.ScaleTrainer where a setting needs more, after the checks before any work."""
    checked = preflight(cfg, quiet)
    if scale.is_main() and not cfg.init:
        remove_stale_tmp(cfg.base_dir)
    return (scale.ScaleTrainer if scale.needed(cfg) else exit_lib.Trainer)(cfg, checked, quiet)


# -----------------------------------------------------------------------------
# Checks made before any work, so that a bad input is an error in seconds, not a traceback after the warm start.


TRAIN_POOL = 5000  # problems in a run's training pool, drawn once by preflight


def preflight(cfg: Config, quiet: bool = False) -> dict:
    """Everything the run will need, checked before the base loads (data, problems, --init, context); returns
    the family, the evaluation family, the training pool and the base's loader for the Trainer."""
    family = tasks_lib.make_family(cfg.task, cfg.data, cfg.difficulties)
    efam = tasks_lib.eval_family(cfg.eval_data, family)
    train_pool = family.sample("train", TRAIN_POOL, seed=cfg.seed)  # a ValueError naming the difficulties if too few
    heldout = eval_lib.heldout_problems(efam, cfg.eval_problems, harder=cfg.eval_harder, warn=not quiet,
                                        split=cfg.eval_split) if cfg.eval_problems else []
    if cfg.eval_every:  # the held-out slice of every --eval_every point, during training
        heldout += eval_lib.heldout_problems(efam, cfg.eval_every_problems, warn=False, split=cfg.eval_split)
    if cfg.init:
        tok, max_len = check_init(cfg, quiet)
    else:
        tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
        max_len = model_lib.toy_config(tok.vocab_size).max_seq_len
    if tok is not None and not family.multi_turn:
        style = tasks_lib.prompt_style(tok)
        check_context(tok, style, max_len, cfg.max_new_tokens, {p.request: p for p in train_pool},
                      family, "--data" if cfg.data else "the task")
        check_context(tok, style, max_len, cfg.max_new_tokens, {p.request: p for p in heldout},
                      efam, "--eval_data" if cfg.eval_data else "--data" if cfg.data else "the held-out set")
    return dict(family=family, eval_family=efam, train_pool=train_pool,
                base=functools.partial(base_lib.load, cfg, family))  # stage 1: base.py


def check_init(cfg: Config, quiet: bool) -> tuple:
    """--init: a Hugging Face directory's config.json and tokenizer (-> tokenizer, context length),
    or an exit checkpoint file (None, None: it is checked when it loads)."""
    if not os.path.isdir(cfg.init):
        if not os.path.isfile(cfg.init):
            raise FileNotFoundError(f"--init={cfg.init}: no such checkpoint file or Hugging Face directory")
        return None, None
    config_file = os.path.join(cfg.init, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--init={cfg.init}: no config.json (not a Hugging Face checkpoint directory)")
    config = hf.read_json(config_file)
    max_len = hf.config_from_hf(config, where=config_file).max_seq_len
    if not hf._has_tokenizer_files(cfg.init):
        raise ValueError(f"{cfg.init}: no tokenizer files; --init needs a checkpoint with its tokenizer")
    tok = hf.load_tokenizer(cfg.init)
    if tasks_lib.prompt_style(tok) == "chat" and not tok.has_chat_template and not quiet:
        print(f"warning: {cfg.init}: the tokenizer has no chat template, so prompts are plain "
              "'user: ... assistant: ' text, which an instruct model was not trained on", file=sys.stderr)
    return tok, max_len


FEEDBACK_SLACK = 8  # tokens: another answer's feedback ("sum 11, 40 short") is longer than p.target's ("sum 51, exact")


def check_context(tok, style, max_len, max_new_tokens, problems: dict, family, what: str):
    """Every problem's longest prompt plus a completion must fit the context (model.generate refuses more): a step's
    holds an answer of up to max_new_tokens and its feedback (on p.target here, + FEEDBACK_SLACK for another's)."""
    for p in problems.values():
        extra = max_new_tokens - len(tok.encode(p.target)) + FEEDBACK_SLACK  # the longest answer in p.target's place
        n = max(len(tasks_lib.encode_prompt(tok, family, p, None if m == "base" else p.target, m, style))
                + (0 if m == "base" else extra) for m in tasks_lib.MODES)
        if n + max_new_tokens > max_len:
            line = f", line {p.data['line']}" if isinstance(p.data, dict) and "line" in p.data else ""
            raise ValueError(f"{what}{line}: the longest prompt of problem {p.id} (an improve or diverge step, whose "
                             f"answer may be max_new_tokens={max_new_tokens} tokens) is {n} tokens, which with a "
                             f"completion of max_new_tokens exceeds the model's context of {max_len} tokens")


# -----------------------------------------------------------------------------
# Run folders: one run per folder, and nothing in it lost or mixed with another run's.


def check_out_dir(cfg: Config):
    """The run folder exists for --resume, and this process can write into it, before any work."""
    if cfg.resume and not os.path.isdir(cfg.out_dir):  # and the lock would create it
        raise FileNotFoundError(f"no checkpoint at {os.path.join(cfg.out_dir, 'ckpt.pt')} (no folder {cfg.out_dir})")
    hf.check_writable(cfg.out_dir, "--out_dir")


def folder_lock(out_dir: str):
    """The run folder's lock, held by rank 0, which alone writes the folder."""
    return run_lock(out_dir) if scale.is_main() else contextlib.nullcontext()


def check_resume_folder(out_dir: str, ck: dict):
    """A ckpt.pt resumes only the run whose config.json and log.jsonl lie beside it: a checkpoint copied
    in from another run would otherwise continue under that run's log."""
    ckpt_path, saved = os.path.join(out_dir, "ckpt.pt"), ck["config"]
    cfg_file = os.path.join(out_dir, "config.json")
    if os.path.isfile(cfg_file):
        folder = hf.read_json(cfg_file)
        diff = [k for k in sorted(saved) if k in folder and k not in RESUMABLE_OVERRIDES and folder[k] != saved[k]]
        if diff:
            raise ValueError(f"{ckpt_path} is not this folder's run: it differs from {cfg_file} in "
                             + ", ".join(f"{k} ({saved[k]!r} vs {folder[k]!r})" for k in diff[:5])
                             + "; put it in a folder of its own")
    log_path, n = os.path.join(out_dir, "log.jsonl"), ck["iter"]
    if not os.path.isfile(log_path) and n:  # resuming would leave a log without iterations 1..n
        raise ValueError(f"{ckpt_path} is at iteration {n}, but {out_dir} has no log.jsonl: put the run's log back, "
                         "or start afresh in another folder")
    iters = [entry["iter"] for entry in read_log_lines(log_path)] if n else []
    if iters[:n] != list(range(1, n + 1)):
        raise ValueError(f"{ckpt_path} is at iteration {n}, but {log_path} holds iterations "
                         f"{iters[:1] + (['...', iters[-1]] if len(iters) > 1 else [])} (not 1..{n}): "
                         "the checkpoint and the log are of different runs")


def truncate_log(log_path: str, last_iter: int):
    """On resume: drop log.jsonl's lines of iterations after the checkpoint's (logged, then lost to a kill)."""
    if os.path.exists(log_path):
        hf.write_text("".join(json.dumps(e) + "\n" for e in read_log_lines(log_path)
                              if e["iter"] <= last_iter), log_path)


@contextlib.contextmanager
def stop_signals():
    """Ctrl-C or kill during the RL loop: yields a list that becomes non-empty, so the iteration in flight
    finishes and the run saves; a second signal stops at once, without saving."""
    stop = []

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        tqdm.write(f"{'Ctrl-C' if signum == signal.SIGINT else 'stop (SIGTERM)'}: finishing this iteration, then saving "
                   "(Ctrl-C again to stop without saving)")

    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = [signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)] if main_thread else []
    try:
        yield stop
    finally:
        for signum, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
            if handler is not None:  # None: a handler not installed from Python, which cannot be restored
                signal.signal(signum, handler)


RUN_ARTIFACTS = ("ckpt.pt", "config.json", "log.jsonl", "eval.json", "results.json", "hf")
LOCK_FILE = ".lock"
_held_locks = {}  # folder -> fd of the locks this process holds


def run_artifacts(out_dir: str) -> list[str]:
    """What a run (or eval.py) leaves in its folder; any of them blocks a fresh run there."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(n for n in names if n in RUN_ARTIFACTS or (n.startswith("eval.") and n.endswith(".json")))


@contextlib.contextmanager
def run_lock(out_dir: str):
    """Exclusive flock on out_dir/.lock for the block: a second writer stops, naming the holder; kill -9 frees it."""
    key = os.path.abspath(out_dir)
    if key in _held_locks:  # flock would refuse this process's own second open, naming itself as "another run"
        raise FileExistsError(f"{out_dir} is already locked by this process (its run or evaluation is under way)")
    os.makedirs(key, exist_ok=True)
    path = os.path.join(key, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path, errors="replace") as f:
            holder = f.read().strip() or "unknown process"
        os.close(fd)
        raise FileExistsError(f"{out_dir} is in use by another run ({holder}); wait for it to finish, or "
                              "choose another --out_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)}\n".encode())
    _held_locks[key] = fd
    try:
        yield
    finally:
        del _held_locks[key]
        os.close(fd)  # releases the flock


def remove_stale_tmp(folder: str):
    """Remove what a write killed mid-way left behind (NAME.tmpPID@HOST, model.atomic_save) if PID is gone from HOST."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r".+\.tmp([0-9]+)(?:@(.*))?", name)  # files from before the host was named: this host's
        # another machine's file is kept: its writer may be alive, and its pid means nothing here
        if m and m.group(2) in (None, socket.gethostname()) and not writer_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def writer_alive(pid: int) -> bool:
    """Whether process `pid` of this host may still be writing (another process sharing a base_dir); this process
    is not: its own leftovers are stale."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def read_log_lines(path: str) -> list[dict]:
    """log.jsonl's entries; a damaged line is an error, except a last line cut off mid-write (dropped)."""
    out = []
    with open(path, errors="replace") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not isinstance(entry.get("iter"), int):
                    raise ValueError("no 'iter'")
            except ValueError as e:
                if i == len(lines) and not line.endswith("\n"):
                    break
                raise ValueError(f"{path}, line {i}: not a log entry ({e})") from None
            out.append(entry)
    return out


def read_log(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return []
    return read_log_lines(path)
