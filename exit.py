"""
Exploratory Iteration (ExIt): warm start, GRPO, and the self-iteration curriculum. `python exit.py`.

This is the training loop of "Bootstrapping Task Spaces for Self-Improvement" (Jiang, Lupu,
Bachrach 2025); METHOD.md restates the method with its equations. It joins the other files,
imports running one way (tasks -> model -> buffer -> eval -> exit):

    tasks.py   base tasks, the base / improve / diverge prompts and their token ids, step rewards
    model.py   the policy: sampling G rollouts per prompt, log-probs, embeddings; checkpoints on disk
    buffer.py  the task buffer of partial histories, scored by learnability (paper §4.1)
    eval.py    the held-out K-step self-improvement evaluation, run at the end; run folders on disk

The policy is either the toy (stage 1 below trains it) or a real instruct checkpoint, `--init=HF_DIR
--task=realmath --data=FILE`: then prompts go through its chat template. Either way the run also
writes the trained policy as a Hugging Face directory (out_dir/hf).

Top to bottom: the config (one dataclass, parsed from --key=value), the GRPO math as pure
functions (Eq. 3-6), stage 1 (supervised warm start, cached), stage 2 (the ExIt loop:
`Trainer.iteration`), and the run itself (`main`). Then what a first reading can skip: the checks
made before any work (`preflight`), run folders, and the helpers of data-parallel runs (`torchrun
--nproc_per_node=N exit.py ...`; each is the identity in one process).

One RL iteration (`Trainer.iteration`, the same path for single- and multi-turn families):
  1. draw `tasks_per_iter` task instances: with prob. p (once the buffer holds B_min entries) a
     buffered partial history, iterated with the improve prompt (diverge with prob. p_div);
     otherwise a fresh base task;
  2. sample G rollouts for each and score them: the family's step reward, or for a multi-turn
     family the reward of the episode the policy then finishes from the iterated turn;
  3. group-normalised advantages (Eq. 3), times the diversity coefficient (Eq. 6) for full ExIt;
  4. `epochs` clipped policy-gradient steps on Eq. 4 against the sampling policy's log-probs;
  5. the buffer learns: a replayed instance gets its fresh learnability var(r); the new answers
     become new instances "improve this" that inherit it (and so the curriculum grows deeper);
  6. the reference policy's refresh (β > 0 only) and the iteration's log line.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import buffer as buffer_lib
import eval as eval_lib
import model as model_lib
import tasks as tasks_lib

METHODS = ("grpo", "curriculum", "improve", "diverge", "exit")  # the ablation ladder, the paper's §5.2 (METHOD.md)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOY_TOKENIZER = dict(kind="byte", markers=list(tasks_lib.MARKERS))  # how a checkpoint rebuilds the toy's tokenizer


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # ---- run
    task: str = _f("exactsumfb", "task family (tasks.FAMILIES): " + tasks_lib.describe_families())
    method: str = _f("exit", "rung of the ablation ladder (paper §5.2): grpo | curriculum | improve | diverge | exit")
    seed: int = _f(0, "RL seed: task draws, rollouts, the buffer, evaluation sampling (not the base: --base_seed)")
    out_dir: str = _f("runs/exit", "run folder: config.json, log.jsonl, ckpt.pt, eval.json")
    resume: bool = _f(False, "continue the run in out_dir from its ckpt.pt (exactly)")
    device: str = _f("auto", "auto | cpu | cuda | mps")
    # ---- the toy policy and its warm start (stage 1)
    n_layer: int = _f(4, "toy policy: transformer blocks")
    n_embd: int = _f(128, "toy policy: width")
    n_head: int = _f(4, "toy policy: query heads")
    n_kv_head: int = _f(2, "toy policy: key/value heads (grouped-query attention)")
    warm_examples: int = _f(20000, "warm start: number of supervised demonstrations")
    warm_steps: int = _f(1500, "warm start: optimiser steps")
    warm_batch: int = _f(64, "warm start: sequences per step")
    warm_lr: float = _f(3e-3, "warm start: peak learning rate (cosine decay)")
    warm_pack: bool = _f(False, "warm start: pack several demonstrations to a row (1.65x a step, the same loss to "
                                "float rounding; off by default: RESULTS.md, 'The packed warm start')")
    base_seed: int = _f(0, "warm start: the base's seed (initialisation, demonstrations, batches), so every RL seed "
                           "starts from one base as in the paper; -1 = --seed's (a base per seed)")
    base_dir: str = _f("runs/base", "cache of warm-started base policies, keyed by their settings")
    # ---- GRPO (stage 2), paper §2.2, Eq. 3-5
    iters: int = _f(300, "RL iterations (one batch of task instances each)")
    tasks_per_iter: int = _f(16, "task instances (prompts) per iteration")
    group_size: int = _f(8, "G: rollouts per task instance")
    epochs: int = _f(1, "policy-gradient epochs over each batch (ratio against the sampling policy)")
    lr: float = _f(2e-4, "AdamW learning rate of the RL stage (constant)")
    grad_clip: float = _f(1.0, "gradient norm clip [open: METHOD.md]")
    clip_eps: float = _f(0.2, "ε of the clipped ratio (Eq. 4)")
    beta: float = _f(0.0, "β: weight of the k3 KL to the reference policy (0 = no reference model)")
    ref_every: int = _f(100, "M: refresh the reference policy every M iterations")
    ref_alpha: float = _f(1.0, "α: ref <- α θ + (1 - α) ref at each refresh (1 = hard reset)")
    temperature: float = _f(1.0, "sampling temperature in training")
    max_new_tokens: int = _f(48, "generation budget per rollout")
    # ---- the task buffer, paper §4.1
    buffer_size: int = _f(256, "N: capacity of the task buffer")
    min_size: int = _f(32, "B_min: replay only once the buffer holds this many entries")
    replay_prob: float = _f(0.5, "p: probability that a task instance is drawn from the buffer")
    kappa: float = _f(10.0, "κ: inverse temperature of P(i) ∝ exp(κ S_i) [open: METHOD.md]")
    p_div: float = _f(0.2, "probability that a buffered instance is iterated with the diverge prompt (§4.2)")
    # ---- what a run shows and keeps
    log_every: int = _f(10, "print a log line every this many iterations (log.jsonl gets every one)")
    show_every: int = _f(100, "print a few sampled episodes every this many iterations (0 = never)")
    ckpt_every: int = _f(100, "write ckpt.pt every this many iterations (and at the end)")
    # ---- final evaluation (eval.py), as the paper's Table 1
    eval_problems: int = _f(200, "held-out base tasks in the final evaluation (0 = skip it)")
    eval_k: int = _f(16, "K: improve steps in the final evaluation")
    eval_samples: int = _f(2, "independent chains per held-out task (avg@n)")
    eval_temperature: float = _f(1.0, "sampling temperature of the evaluation")
    eval_split: str = _f("test", "held-out split of every evaluation: test (what results report) | val (where settings are chosen; tasks.split_of)")
    eval_every: int = _f(0, "also evaluate a held-out slice every this many iterations (0 = never): heldout_k0/heldout_kK in log.jsonl, heldout.png")
    eval_every_problems: int = _f(50, "held-out problems of each --eval_every evaluation (one chain each, K = eval_k)")
    # ---- beyond the default run: real checkpoints and data, variants, extensions, engineering.
    # The default run sets none of these (the ladder's FIFO control sets `admission`); each is tested, and
    # METHOD.md or README says when to use it.
    difficulties: str = _f("", "training mix of base-task difficulties, e.g. 2-6 or 2,3,5 ('' = the family's own)")
    init: str = _f("", "start from this instead of the warm start: an exit checkpoint (.pt) or a Hugging Face directory")
    data: str = _f("", "--task=realmath: GSM8K- or MATH-style JSON-lines file (tasks.load_jsonl)")
    eval_data: str = _f("", "--task=realmath: a separate held-out file for the final evaluation, all of its lines ('' = the test tenth of --data)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    dr_grpo: bool = _f(False, "Dr. GRPO: no division by std(r), constant normaliser instead of 1/|o_i|")
    filter_malformed: bool = _f(False, "no gradient (advantage or KL) from responses of no valid type (tasks: TaskFamily.valid), as the paper's tool-use runs")
    micro_batch: int = _f(0, "rows per forward/backward (0 = the whole batch); same update either way")
    grad_checkpoint: bool = _f(False, "recompute each block in the backward pass: less activation memory, more compute (the ungrouped forward); numbers equal to float rounding")
    dtype: str = _f("fp32", "policy weights: fp32 (bf16 autocast on GPU) | bf16 (AdamW on fp32 master copies)")
    rank_temperature: float = _f(0.0, "PLR extension: rank weights (1/rank)^(1/T) instead of exp(κ S) when > 0 (off)")
    staleness_coef: float = _f(0.0, "PLR extension: ρ, mix (1 - ρ) P_score + ρ P_staleness (off)")
    admission: str = _f("score", "buffer admission when full: score (top-N by learnability, §4.1) | fifo (the oldest leaves: a control blind to learnability)")
    children: str = _f("all", "which rollouts of a group enter the buffer: all | one [open: METHOD.md]")
    div_minmax: bool = _f(False, "diversity bonus: min-max form of Eq. 6 instead of the printed form")
    div_clip: float = _f(0.0, "diversity bonus: cap on Eq. 6's coefficient, d_i <= this (0 = no cap; the printed form is unbounded)")
    eval_harder: bool = _f(False, "also evaluate on the family's harder held-out difficulties")

    # derived from `method`, once: which parts of ExIt are on (paper §5.2)
    @property
    def uses_buffer(self) -> bool:
        return self.method != "grpo"

    @property
    def self_iterates(self) -> bool:
        return self.method in ("improve", "diverge", "exit")

    @property
    def diverge_prob(self) -> float:
        return self.p_div if self.method in ("diverge", "exit") else 0.0

    @property
    def diversity_bonus(self) -> bool:
        return self.method == "exit"

    @property
    def warm_seed(self) -> int:  # the base's seed: --base_seed, or with -1 the RL seed
        return self.seed if self.base_seed < 0 else self.base_seed

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"config: {msg}")
        for f in dataclasses.fields(self):  # --lr=inf trains to NaN weights; --kappa=nan samples nothing sensible
            v = getattr(self, f.name)
            need(not isinstance(v, float) or math.isfinite(v), f"{f.name} must be a finite number, got {v}")
        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.task in tasks_lib.FAMILIES, f"task must be one of {sorted(tasks_lib.FAMILIES)}, got {self.task!r}")
        need(self.children in ("all", "one"), f"children must be 'all' or 'one', got {self.children!r}")
        need(self.eval_split in ("test", "val"), f"eval_split must be 'test' or 'val', got {self.eval_split!r}")
        need(not (self.eval_split == "val" and self.eval_data), "--eval_data is a test file: it has no validation "
             "split; for --eval_split=val drop --eval_data (the validation tenth of --data is used)")
        need(self.admission in ("score", "fifo"), f"admission must be 'score' or 'fifo', got {self.admission!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        family = tasks_lib.FAMILIES[self.task]
        need(family.reads_data == bool(self.data), f"--data=FILE goes with --task=realmath (a family that reads its "
             f"problems from a file), and such a family needs it (--task={self.task})")
        need(family.has_demonstrations or bool(self.init), f"--task={self.task} needs --init=HF_DIR: it has no "
             "demonstrations to warm-start from")
        if self.difficulties:
            tasks_lib.parse_difficulties(self.difficulties)  # raises a config error naming the bad text
            need(not family.reads_data, f"--difficulties does not apply to {self.task} (its file sets the levels)")
        need(self.base_seed >= -1, f"base_seed must be >= 0, or -1 for --seed's, got {self.base_seed}")
        need(self.group_size >= 2, "group_size must be >= 2 (GRPO compares rollouts within a group)")
        for k in ("iters", "tasks_per_iter", "epochs", "max_new_tokens", "buffer_size", "min_size",
                  "ref_every", "warm_steps", "warm_batch", "warm_examples", "log_every", "ckpt_every"):
            need(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("replay_prob", "p_div", "ref_alpha", "staleness_coef"):
            need(0.0 <= getattr(self, k) <= 1.0, f"{k} must be in [0, 1], got {getattr(self, k)}")
        for k in ("lr", "warm_lr", "clip_eps", "grad_clip"):
            need(getattr(self, k) > 0, f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("beta", "kappa", "div_clip", "eval_temperature", "micro_batch", "show_every", "eval_problems",
                  "rank_temperature", "eval_every"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)}")
        need(self.min_size <= self.buffer_size, f"min_size ({self.min_size}) must be <= buffer_size ({self.buffer_size})")
        need(self.temperature > 0, "temperature must be > 0 in training: GRPO learns from the differences between "
                                   "a group's G sampled rollouts, and greedy decoding (0) makes them identical, so "
                                   "every advantage would be 0 and nothing would ever be updated")
        # the final evaluation runs after the whole training run: its settings are checked now
        need(self.eval_k >= 0, f"eval_k must be >= 0 (K improve steps), got {self.eval_k}")
        need(self.eval_samples >= 1, f"eval_samples must be >= 1 (chains per held-out task), got {self.eval_samples}")
        need(self.eval_every_problems >= 1, f"eval_every_problems must be >= 1, got {self.eval_every_problems}")
        need(not self.eval_data or family.reads_data, "--eval_data=FILE goes with --task=realmath")
        if not self.init:  # the toy's shape (a checkpoint brings its own)
            need(min(self.n_layer, self.n_head, self.n_kv_head, self.n_embd) >= 1,
                 "n_layer, n_head, n_kv_head and n_embd must be >= 1")
            need(self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 2 == 0,
                 f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}) with an even quotient "
                 "(the head width, which rotary embeddings split in halves)")
            need(self.n_head % self.n_kv_head == 0,
                 f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}) (grouped-query attention)")
        try:
            model_lib.pick_device(self.device)
        except ValueError as e:
            need(False, str(e))
        return self


def _parse_value(name, typ, text):
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects a bool (true/false), got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{name} expects {typ.__name__}, got {text!r}") from None


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
        if not eq:
            if typ is not bool:
                raise ValueError(f"--{key} needs a value: --{key}=...")
            text = "true"
        values[key] = _parse_value(key, typ, text)
    return Config(**{**family_settings(values), **values}).validate(), set(values)


def family_settings(given: dict) -> dict:
    """The task family's recommended settings (TaskFamily.recommended, e.g. the paper's tool-use recipe for
    --task=tools) for every key the command line does not set: `python exit.py --task=tools` trains as
    recommended without a list of flags, and config.json records what was used."""
    family = tasks_lib.FAMILIES.get(given.get("task", Config.task))
    rec = {k: v for k, v in getattr(family, "recommended", {}).items() if k not in given}
    if "buffer_size" in given and "min_size" in rec:  # B_min goes with N: keep the recommended proportion
        rec["min_size"] = max(1, given["buffer_size"] * rec["min_size"] // family.recommended["buffer_size"])
    return rec


# -----------------------------------------------------------------------------
# The GRPO math (paper §2.2 and §4.2): pure functions of tensors, tested against hand formulas.


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, tol: float = 1e-6) -> torch.Tensor:
    """Eq. 3: A_i = (r_i - mean(r)) / std(r) within each group; rewards (P, G) -> (P, G).

    A group whose rewards are all equal carries no signal: A = 0. "All equal" is max - min <= tol,
    never std == 0, so a group like (0.5, 0.5 + 1e-9) is not blown up by a tiny std. std is the
    population std [open]. Dr. GRPO (scale_by_std=False) keeps only the centring."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    flat = (rewards.amax(dim=1, keepdim=True) - rewards.amin(dim=1, keepdim=True)) <= tol
    if scale_by_std:
        centred = centred / rewards.std(dim=1, unbiased=False, keepdim=True).clamp_min(tol)
    return centred.masked_fill(flat, 0.0)


def diversity_coefficients(emb: torch.Tensor, minmax: bool = False, clip: float = 0.0) -> torch.Tensor:
    """Eq. 6: d_i = ||e_i - ē|| / (max_j ||e_j - ē|| - min_j ||e_j - ē||) for one group's
    embeddings (G, D) -> (G,). As printed the numerator is not shifted by the minimum; minmax=True
    uses (||e_i - ē|| - min) / (max - min). A zero range (all equally far) gives d_i = 1. The printed
    form is unbounded (nearly equal distances make the range tiny): clip > 0 caps d_i at clip."""
    dist = (emb - emb.mean(dim=0, keepdim=True)).norm(dim=1)  # (G,)
    lo, hi = dist.min(), dist.max()
    # "zero range" is relative: two clusters of 4 identical answers are equally far from the mean,
    # but float rounding leaves hi - lo ~ 1e-7, and dividing by it would make d_i ~ 1e7
    if float(hi - lo) <= 1e-4 * float(hi) + 1e-12:
        d = torch.ones_like(dist)
    else:
        d = ((dist - lo) if minmax else dist) / (hi - lo)
    return d.clamp(max=clip) if clip > 0 else d


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              dr_norm: float | None = None):
    """The negated GRPO objective, Eq. 4, as a loss to minimise, plus diagnostics.

    logp, old_logp, ref_logp, mask: (N, T) per completion token; adv: (N,) one advantage per rollout.
      ρ = exp(logp - old_logp)                                      Eq. 5
      per token: min(ρ A, clip(ρ, 1-ε, 1+ε) A) - β KL_t,  KL_t = exp(ref - logp) - (ref - logp) - 1   (k3)
      GRPO:     mean over rollouts of (1/|o_i|) Σ_t  (groups are equal-sized, so this is the mean over
                groups of the mean over the group)
      Dr. GRPO (dr_norm given): Σ_t / dr_norm (a constant, e.g. the generation budget), then the mean
                over rollouts.
    Returns (loss, stats) with the clip fraction and mean KL over completion tokens."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token - beta * kl
    if dr_norm is not None:
        per_seq = (per_token * mask).sum(1) / dr_norm
    else:
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)
    loss = -per_seq.mean()
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = dict(clip_frac=float((clipped * mask).sum() / n), kl=float((kl * mask).sum() / n),
                     ratio_mean=float((ratio * mask).sum() / n))
    return loss, stats


@torch.no_grad()
def ema_update(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float):
    """ref <- α θ + (1 - α) ref (paper §2.2; α = 1 copies θ)."""
    for r, p in zip(ref.parameters(), policy.parameters()):
        r.lerp_(p.detach(), alpha)


# -----------------------------------------------------------------------------
# Stage 1: the warm start. A randomly initialised transformer cannot attempt a task or follow an
# "improve" request, so it first imitates the family's demonstrations, whose documented error
# model makes it a weak instruct model (tasks.py). Cached, so every method starts from the same base.


def warm_start_key(cfg: Config, family) -> str:
    """What makes a base: the family (its error model and a sample of its demonstrations), the
    architecture, the SFT settings and the base's seed. Editing any of them gives another key, so an old
    base (cached, or shipped in bases/) is never reused silently."""
    keys = dict(task=cfg.task, error_model=family.error_model, seed=cfg.warm_seed,
                arch=[cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head],
                sft=[cfg.warm_examples, cfg.warm_steps, cfg.warm_batch, cfg.warm_lr], markers=tasks_lib.MARKERS)
    if cfg.warm_pack:  # other float sums, another base: a padded base is not reused for a packed run
        keys["sft"].append("packed")
    if cfg.difficulties:
        keys["difficulties"] = list(family.train_difficulties)
    # a sample of the demonstrations themselves: editing a family's prompts or answer format (not only
    # its error model) must not silently reuse a base trained on the old ones
    keys["demos"] = hashlib.sha1(json.dumps(family.demonstrations(32, cfg.warm_seed)).encode()).hexdigest()
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bases")  # bases/TASK/: see ship_base.py


def shipped_base(cfg: Config, key: str, quiet: bool = False) -> str | None:
    """The base shipped with the code for this task (bases/TASK, a Hugging Face directory whose base.json
    records the key that made it), if its key is these settings' key; else None, saying why."""
    path = os.path.join(SHIPPED, cfg.task)
    if not os.path.isfile(os.path.join(path, "base.json")):
        return None
    shipped = model_lib.read_json(os.path.join(path, "base.json"))["key"]
    if shipped != key and not quiet:
        print(f"warm start: not using the shipped base {path} (its key {shipped}, these settings' {key}: another "
              "--base_seed, architecture, warm-start setting, or an edited family)")
    return path if shipped == key else None


def encode_pair(tok, prompt: str, response: str):
    """Token ids of a compact prompt (markers -> special tokens), and of a response + end of text."""
    return tasks_lib.prompt_ids(tok, prompt), tok.encode(response) + [tok.eos_id]


def sft_batch(batch, pad_id, packed=False):
    """Demonstrations [(prompt ids, response ids)] as one batch with the loss on the response tokens
    and their end of text: one per row, right-padded to the longest, or (packed) several to a row, each
    sequence seeing only itself (model.pack). A padded batch is about 56% real tokens; packed, the same
    loss (to float rounding) runs on ~61% of the positions. The default is padded: bases from packed
    batches have ended lower after RL, with no cause found (RESULTS.md, 'The packed warm start').
    Returns the keyword arguments of the policy's forward: idx, targets (-100 = no loss), and for a
    packed batch positions and mask."""
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


def warm_start(cfg: Config, family, device, quiet=False, use_shipped=True):
    """Supervised training on demonstrations; loss on the response tokens (and their end of text) only.
    The base shipped with the code, or one cached in base_dir, where its key matches."""
    tok = model_lib.byte_tokenizer(tasks_lib.MARKERS)
    key = warm_start_key(cfg, family)
    shipped = use_shipped and shipped_base(cfg, key, quiet)
    if shipped:  # the same weights as a warm start with these settings would train (bases/TASK/base.json)
        if not quiet:
            print(f"warm start: using the base shipped in {os.path.relpath(shipped)} (key {key})")
        return model_lib.load_hf(shipped, device)[0], tok, shipped
    path = os.path.join(cfg.base_dir, f"{cfg.task}-{key}.pt")
    if os.path.exists(path):
        policy, tok = model_lib.policy_from_state(model_lib.load_checkpoint(path)["policy"], device)
        if not quiet:
            print(f"warm start: reusing {path}")
        return policy, tok, path
    torch.manual_seed(cfg.warm_seed)
    mcfg = model_lib.toy_config(tok.vocab_size)
    mcfg = dataclasses.replace(mcfg, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                               n_kv_head=cfg.n_kv_head, intermediate_size=3 * cfg.n_embd)
    policy = model_lib.Transformer(mcfg).to(device)
    pairs = [encode_pair(tok, p, r) for p, r in family.demonstrations(cfg.warm_examples, seed=cfg.warm_seed)]
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.warm_lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(cfg.warm_seed)
    bar = tqdm(range(cfg.warm_steps), desc="warm start", disable=quiet, dynamic_ncols=True)
    for step in bar:
        # cosine decay after a short linear warm-up
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
    policy.eval()
    model_lib.atomic_save(dict(policy=model_lib.policy_state(policy, TOY_TOKENIZER), kind="base", key=key), path)
    if not quiet:
        print(f"warm start: saved {path}")
    return policy, tok, path


# -----------------------------------------------------------------------------
# Stage 2: ExIt.


@dataclass
class Instance:
    """One self-iteration task instance (m, k, τ) drawn for this iteration (§3 of the paper): iterate turn
    `turn` of base task `problem`, given the final answers of the turns before it (`prev`) and that turn's
    latest iterate `answer`, which has been iterated `depth` = k times. A single-turn family's instance is
    the one-turn case: turn 0, no prev."""
    problem: tasks_lib.Problem           # the base task m (a whole episode for a multi-turn family)
    turn: int = 0                        # t, the turn being iterated
    prev: list = field(default_factory=list)  # turns 0..t-1 of the history, dicts with "answer"
    answer: str | None = None            # turn t's latest iterate; None for a first attempt
    mode: str = "base"                   # base | improve | diverge
    depth: int = 0                       # k
    uid: int | None = None               # the buffer entry it was drawn from; None for a fresh base task
    replay: bool = False
    step_problem: tasks_lib.Problem | None = None  # what this step answers (Trainer.prompt_ids fills it in)


class Trainer:
    """Everything a run holds. state_dict() is a complete checkpoint: resuming from it continues the
    run exactly (bit-identical on a CPU)."""

    def __init__(self, cfg: Config, quiet: bool = False, checked: dict | None = None):
        self.cfg, self.quiet = cfg, quiet
        checked = checked or preflight(cfg, quiet=True)  # the family and pools, checked before any model loads
        self.div_stats = {}  # Eq. 6 coefficients of the current iteration, for its log line
        self.device = model_lib.pick_device(cfg.device)
        self.family, self.eval_family = checked["family"], checked["eval_family"]
        self.source_dtype = checked.get("source_dtype")  # what hf/ is exported in: a bf16 source stays bf16
        self.warm_seconds = 0.0
        if cfg.init:
            self.policy, self.tok, self.tok_spec = model_lib.load_policy(cfg.init, self.device)
            self.base_path = os.path.abspath(cfg.init)
        else:
            t0 = time.time()
            with main_first():  # data parallel: rank 0 trains and saves the warm start, the others load it
                eval_lib.remove_stale_tmp(cfg.base_dir)  # a warm start killed while saving
                self.policy, self.tok, self.base_path = warm_start(cfg, self.family, self.device, quiet)
            self.warm_seconds = time.time() - t0
            self.base_path = os.path.abspath(self.base_path)  # eval.py may run from another folder
            self.tok_spec = TOY_TOKENIZER
        # compact marker prompts for the toy tokenizer, the checkpoint's chat template for a real one
        self.style = tasks_lib.prompt_style(self.tok)
        dtype = DTYPES[cfg.dtype]
        self.policy.to(dtype).train()
        broadcast_params(self.policy)  # data parallel: every rank starts from rank 0's weights
        self.policy.grad_checkpoint = cfg.grad_checkpoint
        # A real checkpoint (a Hugging Face directory) gets no extra copy for the diversity bonus:
        # it embeds with the reference when β > 0, else with the current policy (no grad). Eq. 6
        # compares answers within one group at one moment, so a slowly moving embedder is fine,
        # and a 1B-parameter copy is not free. The toy keeps a frozen copy of its initial policy.
        shared_embedder = os.path.isdir(cfg.init)
        # a copy of the initial policy: reference for the KL (β > 0, refreshed every M iterations), and
        # at β = 0 also the toy's frozen embedder for the diversity bonus
        self.ref = None
        if cfg.beta > 0 or (cfg.diversity_bonus and not shared_embedder):
            self.ref = model_lib.Transformer(self.policy.config).to(self.device, dtype)
            self.ref.load_state_dict(self.policy.state_dict())
            self.ref.eval().requires_grad_(False)
        self.embedder = self.ref
        if cfg.diversity_bonus and shared_embedder and self.ref is None:
            self.embedder = self.policy
        elif cfg.diversity_bonus and cfg.beta > 0 and not shared_embedder:
            # the reference moves every M iterations; the toy's embeddings should not
            self.embedder = model_lib.Transformer(self.policy.config).to(self.device, dtype)
            self.embedder.load_state_dict(self.policy.state_dict())
            self.embedder.eval().requires_grad_(False)
        # --dtype=bf16: the policy samples and trains in bf16, but AdamW steps fp32 master copies.
        # At the paper's lr 1e-6 an update is ~1e-4 of a weight, below bf16's resolution (2^-8):
        # bf16 weights updated in place would mostly not move. (fp32: the policy is its own master.)
        self.master = None
        if dtype != torch.float32:
            self.master = [p.detach().float().clone() for p in self.policy.parameters()]
        self.opt = torch.optim.AdamW(self.master or self.policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay)
        self.buffer = buffer_lib.TaskBuffer(cfg.buffer_size, cfg.min_size, cfg.replay_prob, cfg.kappa,
                                            seed=cfg.seed, rank_temperature=cfg.rank_temperature or None,
                                            staleness_coef=cfg.staleness_coef, admission=cfg.admission)
        self.train_pool = checked["train_pool"]
        self.rng = np.random.default_rng(cfg.seed + 1)          # task choice, improve/diverge, children
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)  # rollouts
        self.iter = 0
        self.skipped = 0            # updates skipped for a non-finite loss or gradient
        self.elapsed = 0.0          # seconds of RL so far, across resumes
        self.timing = dict(warm_start=self.warm_seconds, sampling=0.0, update=0.0, buffer=0.0)  # the run's summary
        # task diversity (the paper's Tables 2, 7): a uniform sample of the instances trained on, as prompt token
        # ids, embedded at the end (eval.task_diversity). Its own generator leaves the training's streams untouched.
        self.seen = dict(ids=[], n=0, rng=np.random.default_rng(cfg.seed + 3))

    # ---- checkpoints
    def state_dict(self) -> dict:
        return dict(
            kind="run", config=dataclasses.asdict(self.cfg), world_size=world_size(), iter=self.iter, skipped=self.skipped,
            elapsed=self.elapsed, timing=self.timing, base_path=self.base_path,
            policy=model_lib.policy_state(self.policy, self.tok_spec), optimizer=self.opt.state_dict(),
            ref=None if self.ref is None else self.ref.state_dict(),
            embedder=None if any(self.embedder is m for m in (None, self.ref, self.policy)) else self.embedder.state_dict(),
            master=None if self.master is None else [m.cpu() for m in self.master],
            buffer=self.buffer.state_dict(),
            seen=dict(ids=self.seen["ids"], n=self.seen["n"], rng=self.seen["rng"].bit_generator.state),
            rng=dict(numpy=self.rng.bit_generator.state, gen=self.gen.get_state(),
                     torch=torch.get_rng_state(), python=random.getstate()))

    def load_state_dict(self, ck: dict):
        self.policy.load_state_dict(ck["policy"]["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if ck["ref"] is not None:
            self.ref.load_state_dict(ck["ref"])
        if ck["embedder"] is not None:
            self.embedder.load_state_dict(ck["embedder"])
        if self.master is not None:
            with torch.no_grad():
                for m, saved in zip(self.master, ck["master"]):
                    m.copy_(saved)
        self.buffer.load_state_dict(ck["buffer"])
        if "seen" in ck:  # checkpoints from before task diversity was measured have none
            self.seen["ids"], self.seen["n"] = ck["seen"]["ids"], ck["seen"]["n"]
            self.seen["rng"].bit_generator.state = ck["seen"]["rng"]
        self.rng.bit_generator.state = ck["rng"]["numpy"]
        if ck["rng"]["gen"].numel() != self.gen.get_state().numel():
            raise ValueError(f"its sampling generator was saved on another kind of device than {self.device}: "
                             "resume on the device type the run was trained on (--device)")
        self.gen.set_state(ck["rng"]["gen"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        self.iter, self.skipped, self.elapsed = ck["iter"], ck["skipped"], ck["elapsed"]
        self.timing = dict(ck.get("timing") or self.timing)

    def save(self, path=None):
        if is_main():  # data parallel: the ranks hold the same run, rank 0 writes it
            model_lib.atomic_save(self.state_dict(), path or os.path.join(self.cfg.out_dir, "ckpt.pt"))

    # ---- one RL iteration, steps 1-6 of the module docstring. A single-turn family is the one-turn case
    # of a multi-turn one: its problem is its only turn, and there is nothing to finish after the step.
    def iteration(self) -> dict:
        cfg, G, fam = self.cfg, self.cfg.group_size, self.family
        t0 = time.time()
        insts = broadcast_object(self.draw_instances() if is_main() else None)         # 1
        insts = insts[my_share(len(insts))]  # data parallel: this rank's share (all of them in one process)
        prompts = [self.prompt_ids(i) for i in insts]
        ro, responses = self.sample(prompts, G)                                        # 2
        # the new iterates: the responses, except where a family lets one refer to the current answer ("=")
        iterates = [fam.next_answer(insts[r // G].answer, resp, insts[r // G].mode) for r, resp in enumerate(responses)]
        episodes = self.finish_episodes(insts, iterates) if fam.multi_turn else [[a] for a in iterates]
        t_sample = time.time() - t0
        rewards = torch.tensor([[self.reward(inst, episodes[i * G + j]) for j in range(G)]
                                for i, inst in enumerate(insts)])  # (P, G)
        adv = self.advantages(rewards, iterates)                                       # 3
        t1 = time.time()
        stats = self.update(prompts, ro, adv.flatten(), self.kept(responses))          # 4
        t2 = time.time()
        # data parallel: the whole batch's instances, answers and rewards, for the buffer and the log line
        insts, episodes, responses, rewards, lengths = gather_shares(insts, episodes, responses, rewards, ro.lengths)
        if is_main():  # the one curriculum lives on rank 0
            self.update_buffer(insts, episodes, rewards)                               # 5
            self.remember(insts)
        self.timing["sampling"] += t_sample
        self.timing["update"] += t2 - t1
        self.timing["buffer"] += time.time() - t2
        out = self.finish_iteration(insts, responses, rewards, lengths, stats, t0, t_sample)  # 6
        out["answers"] = episodes
        return out

    def draw_instances(self) -> list[Instance]:
        """§4.1: replay a buffered instance with prob. p (once |B| >= B_min), else a fresh base task."""
        cfg, out = self.cfg, []
        for _ in range(cfg.tasks_per_iter):
            if cfg.uses_buffer and self.buffer.should_replay():
                e = self.buffer.sample(1)[0]
                answer = e.turns[-1]["answer"] if e.turns else None
                mode = "base" if answer is None else ("diverge" if self.rng.random() < cfg.diverge_prob else "improve")
                # the last turn of the history is the one iterated (turn 0 for single-turn families)
                inst = Instance(tasks_lib.Problem(**e.task), turn=max(0, len(e.turns) - 1), prev=e.turns[:-1],
                                answer=answer, mode=mode, depth=e.depth, uid=e.uid, replay=True)
            else:
                inst = Instance(self.train_pool[int(self.rng.integers(len(self.train_pool)))])
            out.append(inst)
        return out

    SEEN = 1024  # instances in the task-diversity sample

    def remember(self, insts):
        """Keep a uniform sample of SEEN of all the instances trained so far (their prompts), so the task
        diversity measured at the end is the whole run's, not its end's."""
        for inst in insts:
            eval_lib.reservoir_add(self.seen["ids"], self.seen["n"], self.prompt_ids(inst), self.SEEN, self.seen["rng"])
            self.seen["n"] += 1

    def prompt_ids(self, inst: Instance) -> list[int]:
        if inst.step_problem is None:  # turn t in the state the earlier turns left (single-turn: the problem)
            inst.step_problem = self.family.turn_problem(inst.problem, inst.turn, [h["answer"] for h in inst.prev])
        return tasks_lib.encode_prompt(self.tok, self.family, inst.step_problem, inst.answer, inst.mode, self.style)

    def sample(self, prompts, n) -> tuple:
        """n rollouts per prompt from the current policy at the training temperature, and their text.
        Data parallel: these prompts are this rank's share of the ranks' batch; each rank draws every row's
        uniforms from the same generator and uses its own rows' (model.generate's rows=), so any number
        of ranks samples exactly the rollouts one process would. A share that finishes early draws the
        steps the longest share still takes, keeping the generators in step. A rank may have no prompts
        (multi-turn: all its episodes finished): it then only keeps its generator in step."""
        counts = all_gather_objects(len(prompts) * n)  # [N] in one process
        first, total = sum(counts[:rank()]), sum(counts)
        ro, texts = (None, []) if not prompts else model_lib.sample_texts(
            self.policy, self.tok, prompts, n, self.cfg.max_new_tokens, temperature=self.cfg.temperature,
            generator=self.gen, rows=(first, total))
        steps = 0 if ro is None else ro.tokens.shape[1]
        for _ in range(max_over_ranks(steps) - steps):  # data parallel only: 0 in one process
            torch.rand(total, 1, generator=self.gen, device=self.device)
        return ro, texts

    def finish_episodes(self, insts, iterates) -> list[list[str]]:
        """Multi-turn: every row's answers to all turns, the history before turn t, the row's new answer to
        turn t, then one policy sample per later turn (base prompt, the state the earlier answers left), all
        rows batched turn by turn. GRPO trains on turn t's tokens only: the later turns are the step's
        environment (they are trained on when a history ending at their turn is replayed)."""
        G, fam = self.cfg.group_size, self.family
        problems = [inst.problem for inst in insts for _ in range(G)]
        answers = [[h["answer"] for h in inst.prev] + [iterates[i * G + j]] for i, inst in enumerate(insts) for j in range(G)]
        while True:
            rows = [r for r, (p, a) in enumerate(zip(problems, answers)) if len(a) < fam.n_turns(p)]
            if not max_over_ranks(len(rows)):  # data parallel: the ranks sample each turn together
                return answers
            prompts = [tasks_lib.encode_prompt(self.tok, fam, fam.turn_problem(problems[r], len(answers[r]), answers[r]),
                                              style=self.style) for r in rows]
            for r, text in zip(rows, self.sample(prompts, 1)[1]):
                answers[r].append(text)

    def reward(self, inst: Instance, episode: list[str]) -> float:
        """§4, App. A: a single-turn step's reward from its new iterate (binary correctness, or the graded
        gain over the current answer); a multi-turn step's, the binary reward of the finished episode."""
        if self.family.multi_turn:
            return self.family.episode_reward(inst.problem, episode)
        return self.family.step_reward(inst.problem, episode[0], inst.mode, inst.answer)

    def advantages(self, rewards, iterates) -> torch.Tensor:
        """Eq. 3 within each group, times the diversity coefficients of Eq. 6 for full ExIt; (P, G).
        iterates: what each rollout leaves as the new answer (family.next_answer; a multi-turn row's new
        answer to its turn). Eq. 6 compares solutions, so it embeds those, not the raw responses: a
        keep reply "=" is the answer it keeps, not a one-character outlier."""
        cfg, G = self.cfg, self.cfg.group_size
        adv = group_advantages(rewards, scale_by_std=not cfg.dr_grpo)
        self.div_stats = {}
        if cfg.diversity_bonus:  # Eq. 6: d_i A_i
            sols = [self.tok.encode(self.family.solution_text(r)) or [self.tok.eos_id] for r in iterates]
            emb = model_lib.embed(self.embedder, sols).view(len(rewards), G, -1).cpu()
            d = torch.stack([diversity_coefficients(e, cfg.div_minmax, cfg.div_clip) for e in emb])
            adv = adv * d
            # logged: the printed form of Eq. 6 is unbounded (d_i = dist_i / range), so its scale is worth watching
            self.div_stats = dict(div_mean=mean_over_ranks(float(d.mean())), div_max=max_over_ranks(float(d.max())))
        return adv

    def kept(self, responses) -> torch.Tensor:
        """(N,) 1.0 for rollouts that enter the loss, 0.0 for those --filter_malformed drops (§5: the
        tool-use runs give malformed responses zero gradient). A dropped row loses every token from the
        loss, its KL term too: "no gradient" means none from that rollout. It still counts in the mean
        over rollouts, so the normaliser stays constant (Dr. GRPO's point)."""
        if not self.cfg.filter_malformed:
            return torch.ones(len(responses))
        return torch.tensor([float(self.family.valid(r)) for r in responses])

    def finish_iteration(self, insts, responses, rewards, lengths, stats, t0, t_sample) -> dict:
        """The reference refresh, the clock, and the log line."""
        cfg = self.cfg
        if cfg.beta > 0 and (self.iter + 1) % cfg.ref_every == 0:
            ema_update(self.ref, self.policy, cfg.ref_alpha)
        self.iter += 1
        dt = time.time() - t0
        self.elapsed += dt

        # ---- the log line (the paper's curriculum signals included)
        def mean_where(mode):
            rows = [i for i, x in enumerate(insts) if x.mode == mode]
            return float(rewards[rows].mean()) if rows else None
        bstats = self.buffer.stats()
        n_tok = int(lengths.sum())
        log = dict(iter=self.iter, reward=float(rewards.mean()), reward_base=mean_where("base"),
                   reward_improve=mean_where("improve"), reward_diverge=mean_where("diverge"),
                   zero_var_frac=float(((rewards.amax(1) - rewards.amin(1)) <= 1e-6).float().mean()),
                   replay_frac=float(np.mean([i.replay for i in insts])),
                   depth=float(np.mean([i.depth for i in insts])),
                   difficulty=float(np.mean([i.problem.difficulty for i in insts])),
                   buf_size=bstats["size"], buf_score_mean=bstats["score_mean"], buf_score_max=bstats["score_max"],
                   buf_entropy=bstats["entropy"], buf_distinct=bstats["distinct_base"],
                   buf_depth=bstats["depth_mean"], buf_depth_hist=bstats["depth_hist"],
                   buf_measured=bstats["measured_frac"], resp_len=n_tok / len(responses),
                   tok_per_s=n_tok / dt, sample_frac=t_sample / dt, skipped=self.skipped,
                   elapsed=self.elapsed, world_size=world_size(), **self.div_stats, **stats)
        if self.family.multi_turn:
            replayed = [i.turn + 1 for i in insts if i.replay]
            log.update(turn=float(np.mean(replayed)) if replayed else None,  # Fig. 6: mean starting turn (1-based)
                       ref_calls=mean_or_none([self.family.reference_calls(i.problem) for i in insts]),  # its complexity
                       malformed_frac=float(np.mean([not self.family.valid(r) for r in responses])))
        return dict(log=log, insts=insts, responses=responses, rewards=rewards)

    def update(self, prompts, ro, adv, kept=None) -> dict:
        """`epochs` optimiser steps on Eq. 4; each step accumulates gradients over micro-batches, so the
        update does not depend on micro_batch. A non-finite loss or gradient skips that step.
        kept: (N,) 0/1, rows to drop from the loss entirely (--filter_malformed); None keeps all."""
        cfg, N, G = self.cfg, len(adv), self.cfg.group_size
        mb = cfg.micro_batch or N
        mb = max(G, mb - mb % G)  # whole groups per micro-batch: rows of one prompt stay together
        adv = adv.to(self.device)
        old = ro.logprobs.to(self.device)
        mask = ro.mask.to(self.device)
        if kept is not None:
            mask = mask * kept.to(self.device, mask.dtype)[:, None]
            adv = adv * kept.to(self.device, adv.dtype)
        agg = dict(clip_frac=0.0, kl=0.0, ratio_mean=0.0, loss=0.0, grad_norm=0.0)
        params = self.master or list(self.policy.parameters())  # what AdamW steps
        for _ in range(cfg.epochs):
            self.policy.zero_grad(set_to_none=True)
            self.opt.zero_grad(set_to_none=True)
            loss_total = 0.0
            for s in range(0, N, mb):
                rows = slice(s, min(N, s + mb))
                p_rows = prompts[s // G:(rows.stop + G - 1) // G]
                # log-probs of the tempered distribution the rollouts were drawn from (logits / T),
                # as the sampler stored them: then ρ = 1 on the first epoch, and Eq. 4 is the policy
                # gradient of what was actually sampled
                logp = model_lib.completion_logprobs(self.policy, p_rows, ro.tokens[rows], ro.lengths[rows], G,
                                                     temperature=cfg.temperature)
                ref_logp = None
                if cfg.beta > 0:
                    with torch.no_grad():
                        ref_logp = model_lib.completion_logprobs(self.ref, p_rows, ro.tokens[rows], ro.lengths[rows], G,
                                                                 temperature=cfg.temperature)
                loss, st = grpo_loss(logp, old[rows], adv[rows], mask[rows], cfg.clip_eps, ref_logp, cfg.beta,
                                     dr_norm=cfg.max_new_tokens if cfg.dr_grpo else None)
                frac = (rows.stop - rows.start) / N  # the mean over rollouts, split across micro-batches
                (loss * frac).backward()
                loss_total += loss.item() * frac
                for k in ("clip_frac", "kl", "ratio_mean"):
                    agg[k] += st[k] * frac / cfg.epochs
            if self.master is not None:  # bf16 gradients onto the fp32 masters
                for m, p in zip(self.master, self.policy.parameters()):
                    m.grad = None if p.grad is None else p.grad.float()
            # data parallel: each rank's loss is the mean over its share's rollouts; the shares are equal,
            # so the mean of the ranks' gradients is the gradient of the mean over the whole batch, and
            # the clip below sees the global norm: the single-process update on the same batch
            all_reduce_([q.grad for q in params if q.grad is not None])
            loss_total = mean_over_ranks(loss_total)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not (math.isfinite(loss_total) and torch.isfinite(gn)):
                self.skipped += 1
                self.policy.zero_grad(set_to_none=True)
                self.opt.zero_grad(set_to_none=True)
                continue
            self.opt.step()
            if self.master is not None:
                with torch.no_grad():
                    for m, p in zip(self.master, self.policy.parameters()):
                        p.copy_(m)
            agg["loss"] += loss_total / cfg.epochs
            agg["grad_norm"] += float(gn) / cfg.epochs
        # data parallel: the log line's statistics, the mean of the ranks' (loss and grad_norm are global
        # already; clip_frac, kl and ratio_mean weigh each rank's tokens by its share, as micro-batches do)
        return {k: mean_over_ranks(v) for k, v in agg.items()}

    def score_instance(self, inst: Instance, rewards) -> tuple:
        """§4.1 for the instance just trained on: its fresh learnability S = var(r). A replayed instance is
        updated; a fresh base task enters as an instance of its own (the curriculum over base tasks), or, if
        already buffered, takes the fresh S. Returns (S, task dict, parent uid)."""
        p, score = inst.problem, buffer_lib.learnability(rewards)
        task = dataclasses.asdict(p)
        if inst.replay:
            self.buffer.update_score(inst.uid, score)
            return score, task, inst.uid
        base = self.buffer.insert(p.id, task, [], 0, score)
        if base is None:
            return score, task, None
        self.buffer.update_score(base.uid, score)
        return score, task, base.uid

    def update_buffer(self, insts, episodes, rewards):
        """§4.1: fresh learnability for what was trained on; its children, the histories its rollouts leave,
        inherit it (and so the curriculum grows deeper). A child is the history up to the iterated turn t,
        the row's new answer to turn t (depth k + 1), and, multi-turn, the later turns it played (first
        attempts, depth 1); every turn prefix is an instance of its own (buffer.insert_history)."""
        cfg, G, fam = self.cfg, self.cfg.group_size, self.family
        if not cfg.uses_buffer:
            return
        for i, inst in enumerate(insts):
            score, task, parent = self.score_instance(inst, rewards[i].tolist())
            if not cfg.self_iterates:
                continue
            js = range(G) if cfg.children == "all" else [int(self.rng.integers(G))]
            for j in js:
                answers, turns = episodes[i * G + j], list(inst.prev)
                for t in range(inst.turn, len(answers)):
                    q = fam.turn_problem(inst.problem, t, answers)
                    turns.append(dict(answer=answers[t], feedback=fam.feedback(q, answers[t]),
                                      depth=inst.depth + 1 if t == inst.turn else 1))
                self.buffer.insert_history(inst.problem.id, task, turns, [h["depth"] for h in turns], score, parent,
                                           start=inst.turn)  # the prefixes before turn t were given, not produced

    def show(self, out, n=3):
        for i in range(min(n, len(out["insts"]))):
            inst, G = out["insts"][i], self.cfg.group_size
            prompt = self.family.prompt(inst.step_problem, inst.answer, inst.mode, style=self.style)
            tqdm.write(f"  [{inst.mode} d={inst.depth}] {prompt!r} -> {out['responses'][i * G]!r} "
                       f"reward {float(out['rewards'][i, 0]):.2f}")


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def format_log(log: dict) -> str:
    def f(k, fmt=".3f"):
        v = log.get(k)
        return "-" if v is None else format(v, fmt)
    return (f"it {log['iter']:4d} | r {f('reward')} base {f('reward_base')} imp {f('reward_improve')} "
            f"div {f('reward_diverge')} | 0var {f('zero_var_frac', '.2f')} depth {f('depth', '.2f')} "
            f"| buf {log['buf_size']} S {f('buf_score_mean')} H {f('buf_entropy', '.2f')} "
            f"| clip {f('clip_frac')} kl {f('kl', '.4f')} len {f('resp_len', '.1f')} "
            f"{f('tok_per_s', '.0f')} tok/s {f('elapsed', '.0f')}s"
            + (f" | turn {f('turn', '.2f')}" if "turn" in log else ""))  # multi-turn: mean starting turn (Fig. 6)


RESUMABLE_OVERRIDES = {"iters", "resume", "out_dir", "device", "log_every", "show_every", "ckpt_every", "grad_checkpoint",
                       "eval_problems", "eval_k", "eval_samples", "eval_temperature", "eval_harder", "eval_data",
                       "eval_every", "eval_every_problems", "eval_split"}


def prepare(cfg: Config, given: set = frozenset(), quiet: bool = False) -> Trainer:
    """A Trainer, fresh or resumed from out_dir/ckpt.pt. Resuming never silently starts afresh."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.data:  # eval.py may evaluate the run from another folder
        cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    if cfg.init:  # and a resume may start from another working directory
        cfg = dataclasses.replace(cfg, init=os.path.abspath(cfg.init))
    if cfg.eval_data:
        cfg = dataclasses.replace(cfg, eval_data=os.path.abspath(cfg.eval_data))
    if cfg.resume:
        ck = model_lib.load_checkpoint(ckpt_path)
        if ck.get("kind") != "run":
            raise ValueError(f"{ckpt_path} is not a run checkpoint")
        saved = ck["config"]
        clash = {k: (saved[k], getattr(cfg, k)) for k in given - RESUMABLE_OVERRIDES
                 if k in saved and saved[k] != getattr(cfg, k)}
        if clash:
            raise ValueError("--resume with settings that differ from the checkpoint's: "
                             + ", ".join(f"{k} (checkpoint {a!r}, given {b!r})" for k, (a, b) in clash.items()))
        unknown = set(saved) - {f.name for f in dataclasses.fields(Config)}
        if unknown:
            raise ValueError(f"{ckpt_path} has config keys this version does not know: {sorted(unknown)}")
        cfg = dataclasses.replace(Config(**saved), **{k: getattr(cfg, k) for k in given & RESUMABLE_OVERRIDES})
        cfg.resume = True
        cfg.validate()
        check_resume_folder(cfg.out_dir, ck)
        check_world(cfg)
        saved_world = ck.get("world_size", 1)
        if saved_world != world_size() and is_main() and not quiet:  # data parallel
            print(f"warning: {ckpt_path} was trained on {saved_world} process(es), this run has {world_size()}: it "
                  "continues the same curriculum on the same global batches, but not bit-exactly (the gradient "
                  "is summed in another order, so the weights drift apart by float rounding and later samples "
                  f"may differ); run with --nproc_per_node={saved_world} to continue it exactly", file=sys.stderr)
        trainer = Trainer(cfg, quiet, preflight(cfg, quiet))
        try:
            trainer.load_state_dict(ck)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"{ckpt_path} does not match this run ({type(e).__name__}: {e})") from None
        return trainer
    found = eval_lib.run_artifacts(cfg.out_dir)
    if found:
        hint = "pass --resume to continue it" if "ckpt.pt" in found else "it has no ckpt.pt to --resume from"
        raise FileExistsError(f"{cfg.out_dir} already holds a run ({', '.join(found)}): {hint}, or choose another "
                              "--out_dir (a fresh run never replaces a run's files)")
    check_world(cfg)
    return Trainer(cfg, quiet, preflight(cfg, quiet))


def check_out_dir(cfg: Config):
    if cfg.resume and not os.path.isdir(cfg.out_dir):  # and the lock would create it
        raise FileNotFoundError(f"no checkpoint at {os.path.join(cfg.out_dir, 'ckpt.pt')} (no folder {cfg.out_dir})")


def train(cfg: Config, given: set = frozenset(), quiet: bool = False) -> Trainer:
    """Stage 1 + stage 2 (+ the final evaluation in main), holding the run folder's lock throughout.
    Returns the trainer at the end."""
    check_out_dir(cfg)
    with folder_lock(cfg.out_dir):
        if is_main():
            eval_lib.remove_stale_tmp(cfg.out_dir)
        return _train(cfg, given, quiet)


def _train(cfg: Config, given: set, quiet: bool) -> Trainer:
    quiet = quiet or not is_main()  # data parallel: rank 0 prints and writes the run folder
    trainer = prepare(cfg, given, quiet)
    cfg = trainer.cfg
    barrier()  # data parallel: every rank has checked (and read) the folder before rank 0 writes to it
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if is_main():
        eval_lib.write_json(dict(dataclasses.asdict(cfg), world_size=world_size()), os.path.join(cfg.out_dir, "config.json"))
    if is_main() and cfg.resume:
        truncate_log(log_path, trainer.iter)
    bar = tqdm(total=cfg.iters, initial=trainer.iter, desc=f"ExIt[{cfg.method}]", disable=quiet, dynamic_ncols=True)
    with stop_signals() as stop:  # Ctrl-C or kill: finish this iteration, save, stop
        while trainer.iter < cfg.iters and not max_over_ranks(len(stop)):  # every rank stops at the same one
            out = trainer.iteration()
            log = out["log"]
            if cfg.eval_every and trainer.iter % cfg.eval_every == 0:  # the held-out curve (sample efficiency)
                log.update(heldout_point(trainer))
            if is_main():
                with open(log_path, "a") as f:
                    f.write(json.dumps(log) + "\n")
            bar.update(1)
            bar.set_postfix(r=f"{log['reward']:.3f}", buf=log["buf_size"])
            if not quiet and (trainer.iter % cfg.log_every == 0 or trainer.iter == 1):
                tqdm.write(format_log(log))
            if not quiet and cfg.show_every and trainer.iter % cfg.show_every == 0:
                trainer.show(out)
            if trainer.iter % cfg.ckpt_every == 0:
                trainer.save()
    if max_over_ranks(len(stop)):
        trainer.save()
        bar.close()
        print(f"\ninterrupted after iteration {trainer.iter}: checkpoint written; continue with --resume")
        raise SystemExit(130)
    bar.close()
    trainer.save()
    # the trained policy as a Hugging Face directory, for other tools (transformers, vLLM, ...) and --init
    if is_main():
        model_lib.save_hf(trainer.policy, trainer.tok, os.path.join(cfg.out_dir, "hf"), dtype=trainer.source_dtype,
                          temperature=cfg.eval_temperature)
    return trainer


def heldout_point(trainer: Trainer) -> dict:
    """One point of the held-out curve (--eval_every): the score at k = 0 and k = K (first-turn accuracy for a
    multi-turn family) of a fixed held-out slice, one chain per problem. Its sampler has its own seeded
    generator, so the training's random streams are untouched: a run trains the same with or without it."""
    cfg = trainer.cfg
    res = eval_lib.evaluate_policy(trainer.policy, trainer.tok, trainer.eval_family, n_problems=cfg.eval_every_problems,
                                   K=cfg.eval_k, n_samples=1, temperature=cfg.eval_temperature,
                                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, split=cfg.eval_split,
                                   part=(rank(), world_size()), gather=all_gather_objects)  # data parallel: split
    score = res.get("first_turn", res)["score"]
    return dict(heldout_k0=score[0], heldout_kK=score[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config_help())
        return
    try:
        cfg, given = parse_args(argv)
        dist_init(cfg)  # data parallel, under torchrun only
        recommended = family_settings({k: getattr(cfg, k) for k in given} | {"task": cfg.task})
        if recommended and not cfg.resume and is_main():
            print(f"{cfg.task}: the family's recommended settings: "
                  + " ".join(f"--{k}={v}" for k, v in recommended.items()) + " (set any of them to override)")
        check_out_dir(cfg)
        with folder_lock(cfg.out_dir):  # held until eval.json is written
            trainer = train(cfg, given)
            final_evaluation(trainer)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # under torchrun a rank that exits stops the others (torchrun ends them); the message says which rank
        print(f"error{f' (rank {rank()})' if world_size() > 1 else ''}: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # a Ctrl-C outside the RL loop (warm start, evaluation), or a second one
        print("\ninterrupted: stopped at once; the run folder keeps its last checkpoint, if it has one "
              "(continue with --resume)", file=sys.stderr)
        raise SystemExit(130)
    if torch.distributed.is_initialized():  # data parallel: the ranks are done; rank 0 reports
        main_rank = is_main()
        torch.distributed.destroy_process_group()
        if not main_rank:
            return
    t = trainer.timing
    other = trainer.elapsed - t["sampling"] - t["update"] - t["buffer"]
    print(f"time: warm start {t['warm_start']:.0f}s, RL {trainer.elapsed:.0f}s (sampling {t['sampling']:.0f}s, update "
          f"{t['update']:.0f}s, buffer {t['buffer']:.0f}s, other {other:.0f}s), evaluation {t.get('evaluation', 0):.0f}s")
    print(f"done: {trainer.iter} iterations in {trainer.elapsed:.0f}s of RL; run folder {trainer.cfg.out_dir}")


def final_evaluation(trainer: Trainer):
    """What a run shows at its end: the curriculum's lineage (lineage.png), the held-out K-step evaluation of
    the trained policy and of its base (eval.json), and one held-out improvement chain (chain.txt)."""
    cfg, t0 = trainer.cfg, time.time()
    if is_main():  # data parallel: plots, the base's evaluation and the files are rank 0's
        lineage = eval_lib.plot_lineage(eval_lib.read_log(cfg.out_dir), os.path.join(cfg.out_dir, "lineage.png"))
        if lineage:
            print(f"the curriculum's lineage: {lineage}")
    if not cfg.eval_problems:
        return
    settings = eval_lib.eval_settings(dataclasses.asdict(cfg))
    # data parallel: each rank runs the chains of its part of the held-out problems; rank 0 gathers them
    res = eval_lib.evaluate_policy(trainer.policy, trainer.tok, trainer.eval_family, **settings,
                                   part=(rank(), world_size()), gather=all_gather_objects)
    if not is_main():
        return
    base = eval_lib.evaluate_base(trainer.base_path, trainer.tok, trainer.eval_family, trainer.device,
                                  model_lib.load_policy, **settings)
    base_policy = eval_lib.frozen_base(trainer.base_path, trainer.device)  # once, for the diversity and the chain
    diversity = eval_lib.run_diversity(trainer.seen["ids"], base_policy)
    eval_lib.write_json(dict(policy=res, base=base, **({"diversity": diversity} if diversity else {})),
                        os.path.join(cfg.out_dir, "eval.json"))
    print(eval_lib.summary(dict(base=base, **{cfg.method: res})))
    if diversity:
        print(f"task diversity of the instances trained on ({diversity['n']} of them): mean pairwise cosine distance "
              f"{diversity['cosine']:.4f}, L2 {diversity['l2']:.3f}")
    show = eval_lib.show_chain(trainer.policy, trainer.tok, trainer.eval_family, settings,
                               eval_lib.run_label(dataclasses.asdict(cfg)), base_policy)
    if show:
        print(show)
        eval_lib.write_text(show + "\n", os.path.join(cfg.out_dir, "chain.txt"))
    trainer.timing["evaluation"] = time.time() - t0


# -----------------------------------------------------------------------------
# Checks made before any work (`preflight`), so that a bad input is an error in seconds, not a traceback
# after the warm start. Not the method: skip on a first read.

def preflight(cfg: Config, quiet: bool = False) -> dict:
    """Everything the run will need, checked before the warm start or a checkpoint loads (minutes), so
    a bad input is an error now, not a traceback after training: the data files, enough distinct
    problems for the training pool and the held-out set (--difficulties), the --init checkpoint's
    config.json and tokenizer, and that every prompt fits the model's context.
    Returns the family, the evaluation family, the training pool and the --init checkpoint's dtype, for
    the Trainer."""
    family = tasks_lib.make_family(cfg.task, cfg.data, cfg.difficulties)
    efam = tasks_lib.eval_family(cfg.eval_data, family)
    train_pool = family.sample("train", 5000, seed=cfg.seed)  # a ValueError naming the difficulties if too few
    heldout = []
    if cfg.eval_problems:
        heldout = eval_lib.heldout_problems(efam, cfg.eval_problems, harder=cfg.eval_harder, warn=not quiet,
                                            split=cfg.eval_split)
    if cfg.eval_every:  # the held-out slice of every --eval_every point, during training
        heldout += eval_lib.heldout_problems(efam, cfg.eval_every_problems, warn=False, split=cfg.eval_split)
    tok, max_len, source_dtype = None, None, None
    if cfg.init and os.path.isdir(cfg.init):
        config_file = os.path.join(cfg.init, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--init={cfg.init}: no config.json (not a Hugging Face checkpoint directory)")
        hf = model_lib.read_json(config_file)
        max_len = model_lib.config_from_hf(hf, where=config_file).max_seq_len
        source_dtype = model_lib.hf_dtype(hf)
        if not model_lib._has_tokenizer_files(cfg.init):
            raise ValueError(f"{cfg.init}: no tokenizer files; --init needs a checkpoint with its tokenizer")
        tok = model_lib.load_tokenizer(cfg.init)
    elif cfg.init:
        if not os.path.isfile(cfg.init):
            raise FileNotFoundError(f"--init={cfg.init}: no such checkpoint file or Hugging Face directory")
    else:
        tok = model_lib.byte_tokenizer(tasks_lib.MARKERS)
        max_len = model_lib.toy_config(tok.vocab_size).max_seq_len
    if tok is not None:
        style = tasks_lib.prompt_style(tok)
        if style == "chat" and not tok.has_chat_template and not quiet:
            print(f"warning: {cfg.init}: the tokenizer has no chat template, so prompts are plain "
                  "'user: ... assistant: ' text, which an instruct model was not trained on", file=sys.stderr)
        if not family.multi_turn:
            check_context(tok, style, max_len, cfg.max_new_tokens, {p.request: p for p in train_pool},
                          family, "--data" if cfg.data else "the task")
            check_context(tok, style, max_len, cfg.max_new_tokens, {p.request: p for p in heldout},
                          efam, "--eval_data" if cfg.eval_data else "--data" if cfg.data else "the held-out set")
    return dict(family=family, eval_family=efam, train_pool=train_pool, source_dtype=source_dtype)


def check_context(tok, style, max_len, max_new_tokens, problems: dict, family, what: str):
    """Every problem's base prompt plus a completion must fit the context (model.generate refuses more)."""
    for p in problems.values():
        n = len(tasks_lib.encode_prompt(tok, family, p, style=style))
        if n + max_new_tokens > max_len:
            line = f", line {p.data['line']}" if isinstance(p.data, dict) and "line" in p.data else ""
            raise ValueError(f"{what}{line}: the prompt of problem {p.id} is {n} tokens, which with "
                             f"max_new_tokens={max_new_tokens} exceeds the model's context of {max_len} tokens")


# -----------------------------------------------------------------------------
# Run folders: one run per folder, and nothing in it lost or mixed with another run's.


def check_resume_folder(out_dir: str, ck: dict):
    """A ckpt.pt resumes only the run whose config.json and log.jsonl lie beside it: a checkpoint copied
    in from another run would otherwise continue under that run's log."""
    ckpt_path, saved = os.path.join(out_dir, "ckpt.pt"), ck["config"]
    cfg_file = os.path.join(out_dir, "config.json")
    if os.path.isfile(cfg_file):
        folder = model_lib.read_json(cfg_file)
        diff = [k for k in sorted(saved) if k in folder and k not in RESUMABLE_OVERRIDES and folder[k] != saved[k]]
        if diff:
            raise ValueError(f"{ckpt_path} is not this folder's run: it differs from {cfg_file} in "
                             + ", ".join(f"{k} ({saved[k]!r} vs {folder[k]!r})" for k in diff[:5])
                             + "; put it in a folder of its own")
    log_path = os.path.join(out_dir, "log.jsonl")
    if os.path.isfile(log_path):
        iters = [entry["iter"] for entry in eval_lib.read_log_lines(log_path)]
        n = ck["iter"]
        if iters[:n] != list(range(1, n + 1)):
            raise ValueError(f"{ckpt_path} is at iteration {n}, but {log_path} holds iterations "
                             f"{iters[:1] + (['...', iters[-1]] if len(iters) > 1 else [])} (not 1..{n}): "
                             "the checkpoint and the log are of different runs")


def truncate_log(log_path: str, last_iter: int):
    """On resume: drop log.jsonl's lines of iterations after the checkpoint's (logged, then lost to a kill)."""
    if os.path.exists(log_path):
        eval_lib.write_text("".join(json.dumps(e) + "\n" for e in eval_lib.read_log_lines(log_path)
                                    if e["iter"] <= last_iter), log_path)


@contextlib.contextmanager
def stop_signals():
    """Ctrl-C (SIGINT), or `kill` (SIGTERM: what eval.py's ladder sends its runs when it is stopped), during the
    RL loop: the iteration in flight finishes, then the run saves and stops. A checkpoint taken halfway through
    an iteration (RNGs advanced, buffer half updated) would not resume exactly. Yields a list that becomes
    non-empty once a stop is asked for; a second signal stops at once (KeyboardInterrupt), without saving."""
    stop = []

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        tqdm.write(f"{'Ctrl-C' if signum == signal.SIGINT else 'stop (SIGTERM)'}: finishing this iteration, then saving "
                   "(Ctrl-C again to stop without saving)")

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    previous = signal.signal(signal.SIGINT, on_signal), signal.signal(signal.SIGTERM, on_signal)
    try:
        yield stop
    finally:
        for signum, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
            if handler is not None:  # None: a handler not installed from Python, which cannot be restored
                signal.signal(signum, handler)


# -----------------------------------------------------------------------------
# Several processes (torchrun): data parallel. Everything distributed is in this section; the loop
# calls these helpers at the few places marked "data parallel", and each is the identity in one process
# (`python exit.py` initialises nothing: no WORLD_SIZE in the environment, rank 0 of 1).
# Under `torchrun --nproc_per_node=N exit.py ...` the iteration's tasks_per_iter instances are split
# into N contiguous equal shares; each rank samples, scores and back-propagates its share; gradients
# are averaged across ranks. Rank 0 alone holds the curriculum (buffer, draws) and writes the run folder.


def dist_init(cfg: Config):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL between GPUs (one per process, cuda:LOCAL_RANK), gloo on CPUs. Nothing without torchrun."""
    if "WORLD_SIZE" not in os.environ or torch.distributed.is_initialized():
        return
    # torch.optim imports torch._dynamo when the first optimizer is made; imported after the group exists,
    # it keeps references to the group, and destroy_process_group at the end then leaves gloo's threads
    # running into interpreter shutdown, no safe place to tear gloo down (one CI run's rank 1 aborted at
    # its exit, its work done: "terminate called without an active exception"). Imported first, it holds
    # nothing, and the end of main() really tears the group down.
    import torch._dynamo as _  # noqa: F401  (as _: a bare "import torch.x" would make torch local here)
    if model_lib.pick_device(cfg.device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # "cuda" is now this rank's GPU
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _comm_device():
    # NCCL reduces CUDA tensors only; gloo, CPU ones
    return torch.device("cuda") if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj):
    """Rank 0's obj on every rank (pickled): the curriculum's decisions."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def my_share(n: int) -> slice:
    """This rank's contiguous share of n items (n is a multiple of the world size: check_world)."""
    k = n // world_size()
    return slice(rank() * k, (rank() + 1) * k)


def gather_shares(*shares):
    """Each argument is this rank's share (a list, or a tensor split along dim 0); returns the global
    ones, the ranks' shares in rank order, on every rank."""
    if world_size() == 1:
        return shares
    ranks = all_gather_objects([s.cpu() if torch.is_tensor(s) else s for s in shares])
    return tuple(torch.cat([r[i] for r in ranks]) if torch.is_tensor(shares[i]) else [x for r in ranks for x in r[i]]
                 for i in range(len(shares)))


def all_reduce_(tensors, op="mean"):
    """In place, the mean (or max) over ranks of each tensor: a gradient becomes the global batch's."""
    if world_size() == 1:
        return
    for t in tensors:
        if op == "mean":
            torch.distributed.all_reduce(t, torch.distributed.ReduceOp.SUM)
            t.div_(world_size())
        else:
            torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX)


def mean_over_ranks(x: float) -> float:
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    all_reduce_([t])
    return float(t)


def max_over_ranks(x):
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    all_reduce_([t], op="max")
    return type(x)(t.item())


def broadcast_params(module: torch.nn.Module):
    """Rank 0's weights on every rank (as DDP does at its start): the ranks start from one policy."""
    if world_size() > 1:
        for p in module.parameters():
            torch.distributed.broadcast(p.data, src=0)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. trains and saves the warm start: an atomic write, so no rank
    reads half a file); the other ranks wait, then run it (and find the file)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def folder_lock(out_dir: str):
    """The run folder's lock, held by rank 0, which alone writes the folder."""
    return eval_lib.run_lock(out_dir) if is_main() else contextlib.nullcontext()


def check_world(cfg: Config):
    need = world_size()
    if cfg.tasks_per_iter % need:
        raise ValueError(f"tasks_per_iter ({cfg.tasks_per_iter}) must be a multiple of the world size ({need}): "
                         "every rank takes an equal share of the iteration's task instances")


if __name__ == "__main__":
    main()
