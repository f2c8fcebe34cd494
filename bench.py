"""
Speed of the toy policy's GRPO iteration and sampler, against the peers people would use instead.

    python bench.py                        # sampler vs generate, warm start packed vs padded, iteration vs TRL
    python bench.py --only sampler         # no TRL needed (also --only warmstart, and --only iteration --peer none)
    python bench.py --repeats 9 --threads 1

Three comparisons, each on the same weights and the same work:

  sampler    model.generate vs transformers' generate (our model written with hf.save_hf,
             read back with AutoModelForCausalLM): P task prompts x G samples, up to
             --new-tokens tokens, rows stopping at end of text (what training does), and again
             at a fixed length (no early stop on either side).
  iteration  one exit.Trainer.iteration() (method grpo: draw P tasks, sample G rollouts each,
             rewards, group advantages, one AdamW step on Eq. 4) vs one step of TRL's
             GRPOTrainer configured the same way: num_generations = G, the same completion
             budget, beta = 0 (no reference model), epsilon 0.2, loss_type "grpo" (the mean over
             rollouts of each rollout's token mean, as ours), rewards scaled by the group std,
             AdamW lr 2e-4, betas (0.9, 0.99), no weight decay, grad clip 1, fp32 and no
             gradient checkpointing (TRL's defaults are bf16, checkpointing and fused AdamW),
             prompts from the same task pool as text, and a reward function that calls the
             same family.step_reward. TRL is an optional dependency (requirements-bench.txt):
                 pip install --no-deps -r requirements-bench.txt
  warmstart  one warm-start step (forward and backward of the supervised loss, base.warm_start)
             on base.sft_batch's packed rows (exit.py --warm_pack) vs the same --warm-batch
             demonstrations padded to the longest, one per row (the warm start's default, and how
             a plain SFT loop runs); the two losses are printed too: they agree to float rounding.

How the numbers are made honest on a shared machine: both sides run in one process on the same
number of threads (default 1: two threads on a two-core machine that others use measure the
machine, not the code), they alternate (ours, peer, ours, peer, ...) so that both see the same
load, the first pair is a discarded warm-up, and the result is the median of the per-pair
ratios (peer time / our time, > 1 means ours is faster) with their range. Absolute times are
printed for reading along, but only the ratios mean anything across machines.

The policy is the default toy policy: exit.py's warm start for the task (cached under
--base-dir; built once if missing, which takes minutes). A trained policy matters here: a
random one almost never writes end of text, so every row would run the whole budget and
early stopping would not be measured. --warm-steps trades a cheaper warm start for that.
"""

import argparse
import importlib.util
import contextlib
import io
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network: everything is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import base as base_lib
import exit as exit_lib
import hf
import runs
import model
import tasks


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ratios(pairs):
    """pairs of (ours, peer) seconds -> 'median ratio (range lo-hi)', peer / ours."""
    r = [p / o for o, p in pairs]
    return f"{statistics.median(r):.2f}x (per-pair range {min(r):.2f}-{max(r):.2f}, {len(r)} pairs)"


def make_trainer(args) -> exit_lib.Trainer:
    cfg = exit_lib.Config(task=args.task, method="grpo", seed=args.seed, tasks_per_iter=args.prompts,
                          group_size=args.samples, max_new_tokens=args.new_tokens, base_dir=args.base_dir,
                          device="cpu",  # out_dir stays unused: iteration() writes nothing
                          **({"warm_steps": args.warm_steps} if args.warm_steps else {}))
    return exit_lib.Trainer(cfg, runs.preflight(cfg, quiet=True), quiet=False)


def hf_copy(tr, d):
    """The trainer's policy and tokenizer through the Hugging Face export: AutoModelForCausalLM and
    AutoTokenizer read them back (the tokenizer through transformers' tiktoken converter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf.save_hf(tr.policy, tr.tok, d)
    return AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)


# -----------------------------------------------------------------------------


def bench_sampler(tr, args):
    P, G, T = args.prompts, args.samples, args.new_tokens
    probs = [tr.train_pool[i] for i in range(P)]
    prompts = [tr.prompt_ids(exit_lib.Instance(p)) for p in probs]
    L = max(len(p) for p in prompts)
    tok, policy = tr.tok, tr.policy
    with tempfile.TemporaryDirectory() as d:
        hf, _ = hf_copy(tr, d)
    hf.eval()
    # transformers wants the prompts left-padded with an attention mask; ours right-aligns itself
    ids = torch.full((P, L), tok.pad_id, dtype=torch.long)
    att = torch.zeros((P, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], att[i, L - len(p):] = torch.tensor(p), 1
    gen = torch.Generator().manual_seed(args.seed)
    print(f"\nsampler: {P} prompts ({min(map(len, prompts))}-{L} tokens) x {G} samples, up to {T} new tokens")

    for early in (True, False):
        stop = tok.stop_ids if early else ()

        def ours():
            out = model.generate(policy, prompts, G, T, stop_ids=stop, pad_id=tok.pad_id, generator=gen)
            return float(out.lengths.float().mean())

        def peer():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  num_return_sequences=G, max_new_tokens=T, pad_token_id=tok.pad_id,
                                  eos_token_id=sorted(stop) if early else None,
                                  min_new_tokens=None if early else T)
            new = out[:, L:]
            if not early:
                return float(new.shape[1])
            # length up to and including the first end of text, as ours counts it
            ended = torch.isin(new, torch.tensor(sorted(stop)))
            first = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.tensor(new.shape[1]))
            return float(first.float().mean())

        pairs, lens = [], []
        for k in range(args.repeats + 1):
            (to, lo), (tp, lp) = timed(ours), timed(peer)
            if k:  # the first pair warms up both
                pairs.append((to, tp))
                lens.append((lo, lp))
        what = "rows stop at end of text" if early else f"fixed {T} tokens"
        print(f"  {what:25s}: ours {statistics.median(o for o, _ in pairs) * 1e3:7.0f} ms, transformers "
              f"{statistics.median(p for _, p in pairs) * 1e3:7.0f} ms; mean completion length ours "
              f"{statistics.mean(o for o, _ in lens):.1f}, transformers {statistics.mean(p for _, p in lens):.1f}")
        print(f"  {'':25s}  speed-up {ratios(pairs)}")


# -----------------------------------------------------------------------------


def our_iteration_timer(tr):
    """Time Trainer.iteration() and split it into sampling (its own t_sample: drawing the instances,
    encoding, sampling, decoding, and finishing multi-turn episodes), update (the call to
    Trainer.update, wrapped here) and the rest (rewards, advantages, the buffer, the log line)."""
    inner_update = tr.update
    spent = {}

    def update(*a, **kw):
        t, out = timed(lambda: inner_update(*a, **kw))
        spent["update"] = t
        return out

    tr.update = update

    def run():
        t, out = timed(tr.iteration)
        sample = out["log"]["sample_frac"] * t  # the trainer's own clock, as a fraction
        return t, dict(sampling=sample, update=spent["update"], other=t - sample - spent["update"],
                       resp_len=out["log"]["resp_len"])
    return run


def trl_trainer(tr, args, d, on_step):
    """TRL's GRPOTrainer on the same weights, task pool, group size, budget, loss and optimiser.
    on_step(seconds) is called after each optimiser step with that step's time."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    hf, hf_tok = hf_copy(tr, d)
    fam, pool = tr.family, tr.train_pool
    # the prompts as text: the marker tokens render as their strings, which the exported
    # tokenizer reads back as the same special tokens (checked below)
    texts = [tr.tok.decode(tr.prompt_ids(exit_lib.Instance(p)), special=True) for p in pool]
    for t, p in zip(texts[:50], pool):
        assert hf_tok(text=t)["input_ids"] == tr.prompt_ids(exit_lib.Instance(p)), t
    data = Dataset.from_dict({"prompt": texts, "task": list(range(len(pool)))})

    def reward(prompts, completions, task, **kw):
        # exactly what Trainer.iteration computes for a base-mode rollout
        return [fam.step_reward(pool[i], fam.next_answer(None, c, "base"), "base", None)
                for c, i in zip(completions, task)]

    steps = args.repeats + 1
    conf = GRPOConfig(
        output_dir=os.path.join(d, "trl"), max_steps=steps, per_device_train_batch_size=args.prompts * args.samples,
        num_generations=args.samples, max_completion_length=args.new_tokens, steps_per_generation=1,
        gradient_accumulation_steps=1, num_iterations=1, beta=0.0, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", mask_truncated_completions=False, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=tr.cfg.lr, adam_beta1=0.9, adam_beta2=0.99, weight_decay=tr.cfg.weight_decay,
        max_grad_norm=tr.cfg.grad_clip, lr_scheduler_type="constant", warmup_steps=0, use_cpu=True,
        bf16=False, gradient_checkpointing=False, optim="adamw_torch",  # ours, not TRL's defaults
        report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
        seed=args.seed, dataloader_num_workers=0)

    class Clock(TrainerCallback):  # one TRL step: generation, rewards, forward, backward, AdamW
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            on_step(time.perf_counter() - self.t0)

    return GRPOTrainer(model=hf, reward_funcs=reward, args=conf, train_dataset=data, processing_class=hf_tok,
                       callbacks=[Clock()])


def bench_warm_start(tr, args):
    tok, policy = tr.tok, tr.policy
    pairs = [base_lib.encode_pair(tok, p, r) for p, r in tr.family.demonstrations(4000, seed=args.seed)]
    gen = torch.Generator().manual_seed(args.seed)
    batches = [[pairs[i] for i in torch.randint(len(pairs), (args.warm_batch,), generator=gen).tolist()]
               for _ in range(args.repeats + 1)]

    def step(inputs):  # forward and backward; the weights are not stepped
        loss = policy(**inputs)[1]
        loss.backward()
        policy.zero_grad(set_to_none=True)
        return loss.item()

    pairs_t, cells, diffs = [], [], []
    for k, batch in enumerate(batches):
        a, b = base_lib.sft_batch(batch, tok.pad_id, packed=True), base_lib.sft_batch(batch, tok.pad_id)
        (to, lo), (tp, lp) = timed(lambda: step(a)), timed(lambda: step(b))
        if k:  # the first pair warms up both
            pairs_t.append((to, tp))
            cells.append(a["idx"].numel() / b["idx"].numel())
            diffs.append(abs(lo - lp))
    print(f"\nwarm start: one step (forward + backward) on {args.warm_batch} demonstrations")
    print(f"  packed {statistics.median(o for o, _ in pairs_t) * 1e3:.0f} ms, padded "
          f"{statistics.median(p for _, p in pairs_t) * 1e3:.0f} ms; packed rows hold "
          f"{statistics.mean(cells):.0%} of the padded positions; largest loss difference {max(diffs):.1e}")
    print(f"  speed-up {ratios(pairs_t)}")


# -----------------------------------------------------------------------------


def bench_iteration(tr, args):
    P, G, T = args.prompts, args.samples, args.new_tokens
    print(f"\niteration: {P} {args.task} tasks x {G} rollouts, up to {T} new tokens, stop at end of text, "
          f"GRPO loss, no KL, one AdamW step")
    ours = our_iteration_timer(tr)
    rows = []  # (ours seconds, ours breakdown, peer seconds or None)
    if args.peer == "none":
        for _ in range(args.repeats + 1):
            t, parts = ours()
            rows.append((t, parts, None))
    else:
        # TRL drives its own loop; its step callback runs our iteration right after each of its
        # steps, so the two alternate in one process
        def after_trl_step(t_peer):
            t, parts = ours()
            rows.append((t, parts, t_peer))

        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):  # TRL's warnings and its end-of-training log dict
            warnings.simplefilter("ignore")
            trl_trainer(tr, args, d, after_trl_step).train()
    rows = rows[1:]  # warm-up pair
    parts = {k: statistics.median(r[1][k] for r in rows) for k in ("sampling", "update", "other")}
    total = sum(parts.values())
    print(f"  ours: {statistics.median(r[0] for r in rows) * 1e3:.0f} ms per iteration; "
          + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items())
          + f" (medians); mean completion length {statistics.mean(r[1]['resp_len'] for r in rows):.1f}")
    if args.peer != "none":
        print(f"  TRL GRPOTrainer: {statistics.median(r[2] for r in rows) * 1e3:.0f} ms per step")
        print(f"  speed-up over TRL: {ratios([(r[0], r[2]) for r in rows])}")


def check_args(p, args):
    """bench.py's arguments checked before any work, as exit.py checks its own: a bad one is a one-line error."""
    for name, lo in (("prompts", 1), ("samples", 2), ("new_tokens", 1), ("warm_batch", 1), ("repeats", 1),
                     ("threads", 0), ("warm_steps", 0)):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if args.prompts > runs.TRAIN_POOL:  # the sampler's prompts are the first of the training pool
        p.error(f"--prompts must be <= {runs.TRAIN_POOL} (the training pool), got {args.prompts}")
    trl = args.peer == "trl" and args.only in (None, "iteration")  # the iteration's comparison runs TRL
    top = 2 ** 32 if trl else 2 ** 63  # transformers' set_seed takes 32 bits
    if not 0 <= args.seed < top:  # what torch, the task draws and the peer accept
        p.error(f"--seed must be in [0, {top - 1}], got {args.seed}")
    family = tasks.FAMILIES.get(args.task)
    if family is None or not family.has_demonstrations or family.multi_turn:
        p.error(f"--task must be a single-turn toy family with demonstrations, one of "
                f"{sorted(n for n, f in tasks.FAMILIES.items() if f.has_demonstrations and not f.multi_turn)}; got {args.task!r}")
    if trl:  # found missing now, not after minutes of work
        missing = [m for m in ("trl", "datasets", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            p.error(f"the iteration's peer, TRL, needs the optional packages ({', '.join(missing)} missing): "
                    "pip install --no-deps -r requirements-bench.txt; or run without it: --peer none, "
                    "or --only sampler / --only warmstart")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["sampler", "warmstart", "iteration"], default=None, help="run one comparison")
    p.add_argument("--peer", choices=["trl", "none"], default="trl",
                   help="the iteration's peer; none times our iteration and its breakdown alone")
    p.add_argument("--task", default="exactsumfb")
    p.add_argument("--prompts", type=int, default=16, help="task prompts per batch (tasks_per_iter)")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (GRPO group size G)")
    p.add_argument("--new-tokens", type=int, default=48, help="generation budget per completion")
    p.add_argument("--warm-batch", type=int, default=exit_lib.Config.warm_batch, help="demonstrations per warm-start step")
    p.add_argument("--repeats", type=int, default=7, help="timed pairs (after one warm-up pair)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (1: stable ratios on a shared machine; 0: torch's default)")
    p.add_argument("--base-dir", default="runs/base", help="exit.py's cache of warm-started toy policies")
    p.add_argument("--warm-steps", type=int, default=0, help="warm start steps if it must be built (0: exit.py's default)")
    args = p.parse_args()
    check_args(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    try:  # a bad input is one line: e.g. runs.preflight finding prompt + --new-tokens past the context
        tr = make_trainer(args)
    except ValueError as e:
        p.error(str(e))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); toy policy "
          f"{sum(q.numel() for q in tr.policy.parameters()) / 1e6:.2f}M params ({tr.base_path})")
    if args.only in (None, "sampler"):
        bench_sampler(tr, args)
    if args.only in (None, "warmstart"):
        bench_warm_start(tr, args)
    if args.only in (None, "iteration"):
        bench_iteration(tr, args)


if __name__ == "__main__":
    main()
