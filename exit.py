"""
Exploratory Iteration (ExIt): GRPO and the self-iteration curriculum. `python exit.py`.

The training loop of "Bootstrapping Task Spaces for Self-Improvement" (Jiang, Lupu, Bachrach 2025);
METHOD.md restates the method with its equations. Read top to bottom: the config, the GRPO math as
pure functions (Eq. 3-6), the ExIt loop (`Trainer.iteration`), and the run (`train`, `final_evaluation`,
`main`). The Trainer starts from a base it is handed (stage 1, base.py: the toy's warm-started base,
shipped in bases/, cached, or trained). Imports run one way: tasks, model and buffer import no project
file, eval imports model and tasks, this file all four; the command line and the run folder's safety
(runs.py), the base (base.py) and real checkpoints, bf16, micro-batches and several processes (scale.py)
build on this file, which reaches them at one seam, `main` (scale.ScaleTrainer overrides a few Trainer
methods, named where they stand).

One RL iteration (`Trainer.iteration`, the same path for single- and multi-turn families):
  1. draw `tasks_per_iter` task instances: with prob. p (once the buffer holds B_min entries) a
     buffered partial history, iterated with the improve prompt (diverge with prob. p_div; a buffered
     base task, k = 0, is answered afresh); otherwise a fresh base task;
  2. sample G rollouts for each and score them: the family's step reward, or for a multi-turn
     family the reward of the episode the policy then finishes from the iterated turn;
  3. group-normalised advantages (Eq. 3), times the diversity coefficient (Eq. 6) for full ExIt;
  4. `epochs` clipped policy-gradient steps on Eq. 4 against the sampling policy's log-probs;
  5. the buffer learns: a replayed instance gets its fresh learnability var(r), a fresh base task
     enters with its own; the new answers become new instances "improve this" that inherit it (and
     so the curriculum grows deeper);
  6. the reference policy's refresh (β > 0 only); then the iteration's log line.
"""

import copy
import dataclasses
import json
import math
import os
import random
import sys
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
    grad_clip: float = _f(1.0, "gradient norm clip (not in the paper: METHOD.md, Choices)")
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
    kappa: float = _f(10.0, "κ: inverse temperature of P(i) ∝ exp(κ S_i) (not in the paper: METHOD.md, Choices)")
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
    dtype: str = _f("fp32", "policy weights: fp32 (bf16 autocast on CUDA) | bf16 (AdamW on fp32 master copies)")
    admission: str = _f("score", "buffer admission when full: score (top-N by learnability, §4.1) | fifo (the oldest leaves: a control blind to learnability)")
    children: str = _f("all", "which rollouts of a group enter the buffer: all | one (the paper is ambiguous: METHOD.md, Choices)")
    div_minmax: bool = _f(False, "diversity bonus: min-max form of Eq. 6 instead of the printed form")
    div_clip: float = _f(0.0, "diversity bonus: cap on Eq. 6's coefficient, d_i <= this (0 = no cap; the printed form is unbounded)")
    div_mean: bool = _f(False, "diversity bonus: d_i over the group's mean distance (averages 1: reweights, never rescales)")
    eval_harder: bool = _f(False, "also evaluate on the family's harder held-out difficulties")

    # derived: the parts of ExIt that `method` turns on (each rung of §5.2's ladder adds one), and the base's seed
    uses_buffer = property(lambda c: c.method != "grpo")                                    # the curriculum (§4.1)
    self_iterates = property(lambda c: c.method in ("improve", "diverge", "exit"))          # "improve this" (§3)
    diverge_prob = property(lambda c: c.p_div if c.method in ("diverge", "exit") else 0.0)  # the diverge prompt (§4.2)
    diversity_bonus = property(lambda c: c.method == "exit")                                # Eq. 6
    warm_seed = property(lambda c: c.seed if c.base_seed < 0 else c.base_seed)              # the base's: -1 = --seed's


# -----------------------------------------------------------------------------
# The GRPO math (paper §2.2 and §4.2): pure functions of tensors, tested against hand formulas.


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, tol: float = 1e-6) -> torch.Tensor:
    """Eq. 3: A_i = (r_i - mean(r)) / std(r) within each group (population std: the paper does not say); (P, G) -> (P, G).
    An all-equal group (max - min <= tol, not std == 0) carries no signal: A = 0; else std is floored at tol. Dr. GRPO
    (scale_by_std=False) keeps only the centring."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    flat = (rewards.amax(dim=1, keepdim=True) - rewards.amin(dim=1, keepdim=True)) <= tol
    if scale_by_std:
        centred = centred / rewards.std(dim=1, unbiased=False, keepdim=True).clamp_min(tol)
    return centred.masked_fill(flat, 0.0)


def diversity_coefficients(emb: torch.Tensor, minmax: bool = False, clip: float = 0.0, mean: bool = False) -> torch.Tensor:
    """Eq. 6: d_i = ||e_i - ē|| / (max_j ||e_j - ē|| - min_j ||e_j - ē||) for one group's
    embeddings (G, D) -> (G,). As printed the numerator is not shifted by the minimum; minmax=True
    uses (||e_i - ē|| - min) / (max - min); mean=True divides by the group's mean distance instead, so the
    coefficients average 1 (they reweight a group, never rescale it). A zero range (all equally far) gives
    d_i = 1. The printed form is unbounded (nearly equal distances make the range tiny): clip > 0 caps d_i."""
    dist = (emb - emb.mean(dim=0, keepdim=True)).norm(dim=1)  # (G,)
    lo, hi = dist.min(), dist.max()
    # "zero range" is relative: two clusters of 4 identical answers are equally far from the mean,
    # but float rounding leaves hi - lo ~ 1e-7, and dividing by it would make d_i ~ 1e7
    if float(hi - lo) <= 1e-4 * float(hi) + 1e-12:
        d = torch.ones_like(dist)
    elif mean:
        d = dist / dist.mean()
    else:
        d = ((dist - lo) if minmax else dist) / (hi - lo)
    return d.clamp(max=clip) if clip > 0 else d


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              dr_norm: float | None = None):
    """The negated GRPO objective, Eq. 4, and its diagnostics (the fraction of tokens whose ratio left
    [1-ε, 1+ε], whatever the sign of A; the mean k3 KL, 0 without a reference (β = 0); the mean ratio).
    logp, old_logp, ref_logp, mask: (N, T) per completion token; adv: (N,) one per rollout.
    Per token min(ρ A, clip(ρ, 1-ε, 1+ε) A) - β KL_t with ρ = exp(logp - old_logp) (Eq. 5); GRPO averages
    over a rollout's tokens then over rollouts; Dr. GRPO (dr_norm) divides each sum by a constant instead."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token - beta * kl
    norm = mask.sum(1).clamp_min(1) if dr_norm is None else dr_norm  # |o_i| (GRPO) or a constant (Dr. GRPO)
    per_seq = (per_token * mask).sum(1) / norm
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
# Stage 2: ExIt.


@dataclass
class Instance:
    """A task instance (m, k, τ) of §3: iterate turn `turn` of base task `problem`, whose latest iterate
    `answer` is the output of `depth` = k steps (k = 0: a base task, no answer yet; k = 1: a first attempt;
    a single-turn family: turn 0, no prev)."""
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
    """Everything a run holds; state_dict() resumes it exactly. One process, fp32 weights (more: scale.ScaleTrainer)."""
    world_size, is_main = 1, True  # data parallel (scale.py): this process's view of the run

    def __init__(self, cfg: Config, checked: dict, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.div_stats = {}  # Eq. 6 coefficients of the current iteration, for its log line
        self.device = model_lib.pick_device(cfg.device)
        # the family, its held-out evaluation family, the training pool and the base's loader (runs.preflight)
        self.family, self.eval_family, self.train_pool = checked["family"], checked["eval_family"], checked["train_pool"]
        self.base_loader = checked["base"]
        t0 = time.time()
        self.policy, self.tok, self.tok_spec, self.base_path = self.load_base()
        self.timing = dict(warm_start=time.time() - t0, sampling=0.0, update=0.0, buffer=0.0)  # the run's summary
        # compact marker prompts for the toy tokenizer, the checkpoint's chat template for a real one
        self.style = tasks_lib.prompt_style(self.tok)
        self.policy.train()
        self.ref, self.embedder = self.reference_and_embedder()
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.buffer = buffer_lib.TaskBuffer(cfg.buffer_size, cfg.min_size, cfg.replay_prob, cfg.kappa,
                                            seed=cfg.seed, admission=cfg.admission)
        self.rng = np.random.default_rng(cfg.seed + 1)          # task choice, improve/diverge, children
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)  # rollouts
        self.iter = 0
        self.skipped = 0            # updates skipped for a non-finite loss or gradient
        self.elapsed = 0.0          # seconds of RL so far, across resumes
        # task diversity (Tables 2, 7): a sample of the prompts trained on (remember); its own generator
        self.seen = dict(ids=[], n=0, rng=np.random.default_rng(cfg.seed + 3))

    def load_base(self) -> tuple:
        """Stage 1's base (base.load): (policy, tokenizer, how a checkpoint rebuilds it, the base's path)."""
        return self.base_loader(self.device, self.quiet)

    def base_policy(self):
        """The base this run started from, loaded again (for the evaluation's Base row and the diversity)."""
        return self.base_loader(self.device, quiet=True)[0]

    def reference_and_embedder(self) -> tuple:
        """Frozen copies of the base: the KL's reference (β > 0) and Eq. 6's embedder (full ExIt), else None."""
        ref = self.frozen_copy() if self.cfg.beta > 0 else None
        return ref, (self.frozen_copy() if self.cfg.diversity_bonus else None)

    def frozen_copy(self):
        return copy.deepcopy(self.policy).eval().requires_grad_(False)

    # ---- one RL iteration, steps 1-6 of the module docstring. A single-turn family is the one-turn case
    # of a multi-turn one: its problem is its only turn, and there is nothing to finish after the step.
    def iteration(self) -> dict:
        G, fam = self.cfg.group_size, self.family
        t0 = time.time()
        insts = self.draw_instances()                                                  # 1
        prompts = [self.prompt_ids(i) for i in insts]
        ro, responses = self.sample(prompts, G)                                        # 2
        # the new iterates: the responses, except where a family lets one refer to the current answer ("=")
        iterates = [fam.next_answer(inst.answer, responses[i * G + j], inst.mode) for i, inst in enumerate(insts)
                    for j in range(G)]
        episodes = self.finish_episodes(insts, iterates) if fam.multi_turn else [[a] for a in iterates]
        t_sample = time.time() - t0
        rewards = torch.tensor([[self.reward(inst, episodes[i * G + j]) for j in range(G)]
                                for i, inst in enumerate(insts)])  # (P, G)
        adv = self.advantages(rewards, iterates)                                       # 3
        t1 = time.time()
        stats = self.update(prompts, ro, adv.flatten(), self.kept(responses))          # 4
        t2 = time.time()
        # data parallel: every rank's share, gathered (one process: the same objects)
        insts, episodes, responses, rewards, lengths = self.whole_batch(insts, episodes, responses, rewards, ro.lengths)
        self.update_buffer(insts, episodes, rewards)                                   # 5
        self.remember(insts)
        self.refresh_reference()                                                       # 6
        self.timing["sampling"] += t_sample
        self.timing["update"] += t2 - t1
        self.timing["buffer"] += time.time() - t2
        self.iter += 1
        dt = time.time() - t0
        self.elapsed += dt
        log = self.log_line(insts, responses, rewards, lengths, stats, dt, t_sample)
        return dict(log=log, insts=insts, responses=responses, rewards=rewards, answers=episodes)

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
        """A uniform sample of SEEN of all the prompts trained on, for the whole run's task diversity."""
        for inst in insts:
            eval_lib.reservoir_add(self.seen["ids"], self.seen["n"], self.prompt_ids(inst), self.SEEN, self.seen["rng"])
            self.seen["n"] += 1

    def prompt_ids(self, inst: Instance) -> list[int]:
        """The instance's prompt as token ids; fills in inst.step_problem, the problem this step answers."""
        if inst.step_problem is None:  # turn t in the state the earlier turns left (single-turn: the problem)
            inst.step_problem = self.family.turn_problem(inst.problem, inst.turn, [h["answer"] for h in inst.prev])
        return tasks_lib.encode_prompt(self.tok, self.family, inst.step_problem, inst.answer, inst.mode, self.style)

    def sample(self, prompts, n) -> tuple:
        """n rollouts per prompt from the current policy at the training temperature, and their text."""
        return model_lib.sample_texts(self.policy, self.tok, prompts, n, self.cfg.max_new_tokens,
                                      temperature=self.cfg.temperature, generator=self.gen)

    def finish_episodes(self, insts, iterates) -> list[list[str]]:
        """Multi-turn: each row's answers to all turns, its new answer to turn t, then one policy sample per
        later turn, all rows batched turn by turn (the later turns are the step's environment: METHOD.md)."""
        G, fam = self.cfg.group_size, self.family
        problems = [inst.problem for inst in insts for _ in range(G)]
        answers = [[h["answer"] for h in inst.prev] + [iterates[i * G + j]] for i, inst in enumerate(insts) for j in range(G)]
        while True:
            rows = [r for r, (p, a) in enumerate(zip(problems, answers)) if len(a) < fam.n_turns(p)]
            if not self.any_rank(len(rows)):  # data parallel: the ranks sample each turn together
                return answers
            prompts = [tasks_lib.encode_prompt(self.tok, fam, fam.turn_problem(problems[r], len(answers[r]), answers[r]),
                                              style=self.style) for r in rows]
            for r, text in zip(rows, self.sample(prompts, 1)[1]):
                answers[r].append(text)

    def reward(self, inst: Instance, episode: list[str]) -> float:
        """§4, App. A: the step's reward from its new iterate; multi-turn, the finished episode's."""
        if self.family.multi_turn:
            return self.family.episode_reward(inst.problem, episode)
        return self.family.step_reward(inst.problem, episode[0], inst.mode, inst.answer)

    def advantages(self, rewards, iterates) -> torch.Tensor:
        """Eq. 3 within each group, times Eq. 6's coefficients of the new iterates for full ExIt; (P, G)."""
        cfg, G = self.cfg, self.cfg.group_size
        adv = group_advantages(rewards, scale_by_std=not cfg.dr_grpo)
        self.div_stats = {}
        if cfg.diversity_bonus:  # Eq. 6: d_i A_i
            # an empty solution embeds as end-of-text: embed needs a token
            sols = [self.tok.encode(self.family.solution_text(r)) or [self.tok.eos_id] for r in iterates]
            emb = model_lib.embed(self.embedder, sols).view(len(rewards), G, -1).cpu()
            d = torch.stack([diversity_coefficients(e, cfg.div_minmax, cfg.div_clip, cfg.div_mean) for e in emb])
            adv = adv * d
            # logged: the printed form of Eq. 6 is unbounded (d_i = dist_i / range), so its scale is worth watching
            self.div_stats = dict(div_mean=float(d.mean()), div_max=float(d.max()))
        return adv

    def kept(self, responses) -> torch.Tensor:
        """(N,) 1.0 for rollouts in the loss, 0.0 for those --filter_malformed drops (§5; METHOD.md)."""
        if not self.cfg.filter_malformed:
            return torch.ones(len(responses))
        return torch.tensor([float(self.family.valid(r)) for r in responses])

    def update(self, prompts, ro, adv, kept) -> dict:
        """`epochs` optimiser steps on Eq. 4 over the batch; a non-finite loss or gradient skips the step (and the
        logged loss and grad_norm average the steps taken: None if none was)."""
        cfg, N = self.cfg, len(adv)
        kept = kept.to(self.device)
        adv = adv.to(self.device) * kept  # a dropped rollout: no advantage, and no KL (its mask is 0)
        old, mask = ro.logprobs.to(self.device), ro.mask.to(self.device) * kept[:, None]
        stats, taken = dict(clip_frac=0.0, kl=0.0, ratio_mean=0.0, loss=0.0, grad_norm=0.0), 0
        for _ in range(cfg.epochs):
            self.opt.zero_grad(set_to_none=True)
            loss, st = self.policy_loss(prompts, ro, slice(0, N), old, adv, mask)
            loss.backward()
            for k in ("clip_frac", "kl", "ratio_mean"):
                stats[k] += st[k] / cfg.epochs
            gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            if not (math.isfinite(loss.item()) and torch.isfinite(gn)):
                self.skipped += 1
                self.opt.zero_grad(set_to_none=True)
                continue
            self.opt.step()
            taken += 1
            stats["loss"] += loss.item()
            stats["grad_norm"] += float(gn)
        return stats | {k: stats[k] / taken if taken else None for k in ("loss", "grad_norm")}

    def policy_loss(self, prompts, ro, rows: slice, old, adv, mask) -> tuple:
        """Eq. 4 on the rollouts `rows` (whole groups), their tempered log-probs recomputed with gradients."""
        cfg, G = self.cfg, self.cfg.group_size
        p_rows, tokens, lengths = prompts[rows.start // G:rows.stop // G], ro.tokens[rows], ro.lengths[rows]
        logp = model_lib.completion_logprobs(self.policy, p_rows, tokens, lengths, G, temperature=cfg.temperature)
        ref_logp = None
        if cfg.beta > 0:
            with torch.no_grad():
                ref_logp = model_lib.completion_logprobs(self.ref, p_rows, tokens, lengths, G, temperature=cfg.temperature)
        return grpo_loss(logp, old[rows], adv[rows], mask[rows], cfg.clip_eps, ref_logp, cfg.beta,
                         dr_norm=cfg.max_new_tokens if cfg.dr_grpo else None)

    def update_buffer(self, insts, episodes, rewards):
        """§4.1: what was trained on gets its fresh learnability S (a fresh base task first enters the buffer itself,
        k = 0); its rollouts' histories (depth k + 1 at the iterated turn) inherit S, and so the curriculum deepens."""
        cfg, G, fam = self.cfg, self.cfg.group_size, self.family
        if not cfg.uses_buffer:
            return
        for i, inst in enumerate(insts):
            task, score = dataclasses.asdict(inst.problem), buffer_lib.learnability(rewards[i].tolist())
            uid = inst.uid  # its buffer entry, the parent of the histories below; None for a fresh base task
            if not inst.replay:
                entry = self.buffer.insert(inst.problem.id, task, [], 0, score)
                uid = None if entry is None else entry.uid  # None: it found no room
            if uid is not None:
                self.buffer.update_score(uid, score)
            if not cfg.self_iterates:
                continue
            js = range(G) if cfg.children == "all" else [int(self.rng.integers(G))]
            for j in js:
                answers, turns = episodes[i * G + j], list(inst.prev)
                for t in range(inst.turn, len(answers)):
                    q = fam.turn_problem(inst.problem, t, answers)  # feedback: for the record; prompts recompute it
                    turns.append(dict(answer=answers[t], feedback=fam.feedback(q, answers[t]),
                                      depth=inst.depth + 1 if t == inst.turn else 1))
                self.buffer.insert_history(inst.problem.id, task, turns, [h["depth"] for h in turns], score, uid,
                                           start=inst.turn)  # the prefixes before turn t were given, not produced

    def refresh_reference(self):
        """§2.2: every M iterations the reference policy of the KL moves to the current policy (β > 0 only)."""
        if self.cfg.beta > 0 and (self.iter + 1) % self.cfg.ref_every == 0:
            ema_update(self.ref, self.policy, self.cfg.ref_alpha)

    # ---- data parallel (scale.ScaleTrainer); in one process each is the identity
    def whole_batch(self, *shares):
        return shares

    def any_rank(self, x):
        return x

    # ---- evaluation during training, and what each iteration logs
    def evaluate(self, **settings) -> dict:
        return eval_lib.evaluate_policy(self.policy, self.tok, self.eval_family, **settings)

    def heldout_point(self) -> dict:
        """One point of the held-out curve (--eval_every): the score at k = 0 and k = K (first-turn accuracy
        for a multi-turn family) of a fixed held-out slice, one chain per problem. Its sampler has its own
        seeded generator, so the training's random streams are untouched: a run trains the same with or without it."""
        cfg = self.cfg
        res = self.evaluate(n_problems=cfg.eval_every_problems, K=cfg.eval_k, n_samples=1, temperature=cfg.eval_temperature,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, split=cfg.eval_split)
        score = res.get("first_turn", res)["score"]
        return dict(heldout_k0=score[0], heldout_kK=score[-1])

    def log_line(self, insts, responses, rewards, lengths, stats, dt, t_sample) -> dict:
        """The iteration's line of log.jsonl: rewards by step type, the curriculum's signals, the update's."""
        def mean_where(mode):
            rows = [i for i, x in enumerate(insts) if x.mode == mode]
            return float(rewards[rows].mean()) if rows else None
        n_tok = int(lengths.sum())
        log = dict(iter=self.iter, reward=float(rewards.mean()), reward_base=mean_where("base"),
                   reward_improve=mean_where("improve"), reward_diverge=mean_where("diverge"),
                   zero_var_frac=float(((rewards.amax(1) - rewards.amin(1)) <= 1e-6).float().mean()),
                   replay_frac=float(np.mean([i.replay for i in insts])),
                   depth=float(np.mean([i.depth for i in insts])),
                   difficulty=float(np.mean([i.problem.difficulty for i in insts])),
                   **{f"buf_{k}": v for k, v in self.buffer.stats().items()},  # the curriculum: buf_size, ...
                   resp_len=n_tok / len(responses), tok_per_s=n_tok / dt, sample_frac=t_sample / dt,
                   skipped=self.skipped, elapsed=self.elapsed, world_size=self.world_size, **self.div_stats, **stats)
        return log | (self.episode_log(insts, responses) if self.family.multi_turn else {})

    def episode_log(self, insts, responses) -> dict:
        """Multi-turn: the replays' mean starting turn (Fig. 6, 1-based), the episodes' complexity, malformed replies."""
        replayed = [i.turn + 1 for i in insts if i.replay]
        return dict(turn=float(np.mean(replayed)) if replayed else None,
                    ref_calls=mean_or_none([self.family.reference_calls(i.problem) for i in insts]),
                    malformed_frac=float(np.mean([not self.family.valid(r) for r in responses])))

    def show(self, out, n=3):
        for i in range(min(n, len(out["insts"]))):
            inst, G = out["insts"][i], self.cfg.group_size
            prompt = self.family.prompt(inst.step_problem, inst.answer, inst.mode, style=self.style)
            tqdm.write(f"  [{inst.mode} d={inst.depth}] {prompt!r} -> {out['responses'][i * G]!r} "
                       f"reward {float(out['rewards'][i, 0]):.2f}")

    # ---- checkpoints
    def state_dict(self) -> dict:
        return dict(
            kind="run", config=dataclasses.asdict(self.cfg), world_size=self.world_size, iter=self.iter, skipped=self.skipped,
            elapsed=self.elapsed, timing=self.timing, base_path=self.base_path,
            policy=model_lib.policy_state(self.policy, self.tok_spec), optimizer=self.opt.state_dict(),
            ref=None if self.ref is None else self.ref.state_dict(),
            embedder=None if any(self.embedder is m for m in (None, self.ref, self.policy)) else self.embedder.state_dict(),
            master=None, buffer=self.buffer.state_dict(),
            seen=dict(ids=self.seen["ids"], n=self.seen["n"], rng=self.seen["rng"].bit_generator.state),
            rng=dict(numpy=self.rng.bit_generator.state, gen=self.gen.get_state(),
                     torch=torch.get_rng_state(), python=random.getstate()))

    def load_state_dict(self, ck: dict):
        self.policy.load_state_dict(ck["policy"]["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if ck["ref"] is not None and self.ref is None:  # saved when β = 0 kept Eq. 6's embedder under "ref"
            ck = dict(ck, ref=None, embedder=ck["ref"])
        if ck["ref"] is not None:
            self.ref.load_state_dict(ck["ref"])
        if ck["embedder"] is not None:
            self.embedder.load_state_dict(ck["embedder"])
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
        model_lib.atomic_save(self.state_dict(), path or os.path.join(self.cfg.out_dir, "ckpt.pt"))
        self.saved = self.iter  # what a failure later leaves intact


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


# -----------------------------------------------------------------------------
# The run: stage 2's loop, the final evaluation, and `python exit.py`.


def train(trainer: Trainer, stop=()) -> Trainer:
    """Stage 2: RL iterations up to cfg.iters, logged and checkpointed; a non-empty `stop` ends it early."""
    cfg = trainer.cfg
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    bar = tqdm(total=cfg.iters, initial=trainer.iter, desc=f"ExIt[{cfg.method}]", disable=trainer.quiet, dynamic_ncols=True)
    while trainer.iter < cfg.iters and not trainer.any_rank(len(stop)):  # data parallel: every rank stops at the same one
        out = trainer.iteration()
        log = out["log"]
        if cfg.eval_every and trainer.iter % cfg.eval_every == 0:  # the held-out curve (sample efficiency)
            log.update(trainer.heldout_point())
        if trainer.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(log) + "\n")
        bar.update(1)
        bar.set_postfix(r=f"{log['reward']:.3f}", buf=log["buf_size"])
        if not trainer.quiet and (trainer.iter % cfg.log_every == 0 or trainer.iter == 1):
            tqdm.write(format_log(log))
        if not trainer.quiet and cfg.show_every and trainer.iter % cfg.show_every == 0:
            trainer.show(out)
        if trainer.iter % cfg.ckpt_every == 0 and trainer.iter < cfg.iters:
            trainer.save()
    bar.close()
    trainer.save()
    return trainer


def final_evaluation(trainer: Trainer) -> dict | None:
    """The held-out K-step evaluation of the trained policy (Table 1) at the run's settings; None if skipped."""
    if not trainer.cfg.eval_problems:
        return None
    t0 = time.time()
    res = trainer.evaluate(**eval_lib.eval_settings(dataclasses.asdict(trainer.cfg)))  # data parallel: rank 0 gets the whole
    trainer.timing["evaluation"] = time.time() - t0
    return res


def main(argv=None):
    """`python exit.py [--key=value ...]`: the base (base.py), stage 2, the final evaluation."""
    import runs  # the one seam into the optional modules: the command line, the run folder and its safety
    with runs.run(sys.argv[1:] if argv is None else argv) as trainer:  # checked, locked, fresh or resumed
        with runs.stop_signals() as stop:  # Ctrl-C or kill: finish the iteration, save, stop
            train(trainer, stop)
        runs.finish(trainer, stop)  # exit 130 if stopped
        runs.write_results(trainer, final_evaluation(trainer))  # eval.json: beside the base's row, the task diversity


if __name__ == "__main__":
    main()
