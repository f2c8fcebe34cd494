"""
Beyond the toy on one process: real checkpoints (--init), bf16 weights with fp32 master copies, micro-
batches, gradient checkpointing, and several processes (torchrun, data parallel). None of it runs in
`python exit.py` at its defaults: runs.prepare builds a ScaleTrainer only when a setting asks for it
(`needed`), and every method here is exit.Trainer's with these concerns added, on the same numbers.

Data parallel, `torchrun --nproc_per_node=N exit.py ...`: the iteration's tasks_per_iter instances are
split into N contiguous equal shares; each rank samples, scores and back-propagates its share; gradients
are averaged across ranks. Rank 0 alone holds the curriculum (buffer, draws) and writes the run folder.
The helpers below are the identity in one process (no WORLD_SIZE in the environment: rank 0 of 1).
"""

import contextlib
import math
import os

import torch

import eval as eval_lib
import exit as exit_lib
import hf
import model as model_lib


def needed(cfg) -> bool:
    """Whether a run needs ScaleTrainer: --init, bf16, micro-batches, grad checkpointing or several processes."""
    return bool(cfg.init or cfg.dtype != "fp32" or cfg.micro_batch or cfg.grad_checkpoint or world_size() > 1)


class ScaleTrainer(exit_lib.Trainer):
    """exit.Trainer plus real checkpoints, bf16 masters, micro-batches and data parallelism. On one process
    with none of them set, its update is Trainer.update's, number for number."""

    def __init__(self, cfg, checked: dict, quiet: bool = False):
        super().__init__(cfg, checked, quiet or not is_main())  # data parallel: rank 0 prints
        self.policy.grad_checkpoint = cfg.grad_checkpoint
        # --dtype=bf16: the policy samples and trains in bf16, but AdamW steps fp32 master copies. At the
        # paper's lr 1e-6 an update is ~1e-4 of a weight, below bf16's resolution (2^-8): bf16 weights updated
        # in place would mostly not move. (fp32: the policy is its own master.)
        self.master = self.ref_master = None
        if self.policy.lm_head.weight.dtype != torch.float32:
            self.master = [p.detach().float().clone() for p in self.policy.parameters()]
            self.opt = torch.optim.AdamW(self.master, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
            # the reference's EMA step, (1 - α) of the way to θ, is as small: it moves an fp32 copy too
            if self.ref is not None:
                self.ref_master = [p.detach().float().clone() for p in self.ref.parameters()]

    world_size = property(lambda self: world_size())
    is_main = property(lambda self: is_main())

    def load_base(self):
        """--init: an exit checkpoint (.pt) or a Hugging Face directory; else the warm start, which rank 0
        trains and saves (an atomic write) before the other ranks load it."""
        cfg = self.cfg
        if cfg.init:
            policy, tok, spec = hf.load_policy(cfg.init, self.device)
            path = os.path.abspath(cfg.init)
        else:
            with main_first():
                policy, tok, spec, path = super().load_base()
        policy.to(exit_lib.DTYPES[cfg.dtype])
        broadcast_params(policy)  # every rank starts from rank 0's weights
        return policy, tok, spec, path

    def base_policy(self):
        return hf.load_policy(self.cfg.init, self.device)[0] if self.cfg.init else super().base_policy()

    def reference_and_embedder(self):
        """A real checkpoint (a Hugging Face directory) gets no extra copy for the diversity bonus: it embeds
        with the reference when β > 0, else with the current policy (no grad). Eq. 6 compares answers within
        one group at one moment, so a slowly moving embedder is fine, and a 1B-parameter copy is not free."""
        if not os.path.isdir(self.cfg.init):
            return super().reference_and_embedder()
        ref = self.frozen_copy() if self.cfg.beta > 0 else None
        embedder = (self.policy if ref is None else ref) if self.cfg.diversity_bonus else ref
        return ref, embedder

    def refresh_reference(self):
        """Under bf16 the EMA of §2.2 runs on fp32 copies (ref_master <- α master + (1 - α) ref_master), which
        the bf16 reference then takes; else Trainer's."""
        if self.ref_master is None:
            return super().refresh_reference()
        if (self.iter + 1) % self.cfg.ref_every == 0:
            with torch.no_grad():
                for r, m, p in zip(self.ref.parameters(), self.ref_master, self.master):
                    r.copy_(m.lerp_(p, self.cfg.ref_alpha))

    def state_dict(self) -> dict:
        return dict(super().state_dict(), master=None if self.master is None else [m.cpu() for m in self.master],
                    ref_master=None if self.ref_master is None else [m.cpu() for m in self.ref_master])

    def load_state_dict(self, ck: dict):
        super().load_state_dict(ck)
        with torch.no_grad():
            if self.master is not None:
                for m, saved in zip(self.master, ck["master"]):
                    m.copy_(saved)
            if self.ref_master is not None:  # a checkpoint from before ref_master has the bf16 reference's weights
                for m, saved in zip(self.ref_master, ck.get("ref_master") or [r.float() for r in self.ref.parameters()]):
                    m.copy_(saved)

    def save(self, path=None):
        if is_main():  # the ranks hold the same run, rank 0 writes it
            super().save(path)

    # ---- data parallel: rank 0 draws, every rank takes its share, rank 0 keeps the curriculum
    def draw_instances(self):
        insts = broadcast_object(super().draw_instances() if is_main() else None)
        return insts[my_share(len(insts))]

    def whole_batch(self, *shares):
        return gather_shares(*shares)

    def update_buffer(self, insts, episodes, rewards):
        if is_main():  # the one curriculum lives on rank 0
            super().update_buffer(insts, episodes, rewards)

    def remember(self, insts):
        if is_main():
            super().remember(insts)

    def any_rank(self, x):
        return max_over_ranks(x)

    def advantages(self, rewards, iterates):
        adv = super().advantages(rewards, iterates)
        if self.div_stats:
            self.div_stats = dict(div_mean=mean_over_ranks(self.div_stats["div_mean"]),
                                  div_max=max_over_ranks(self.div_stats["div_max"]))
        return adv

    def evaluate(self, **settings) -> dict:
        """Each rank runs the chains of its part of the held-out problems; the parts are joined."""
        return eval_lib.evaluate_policy(self.policy, self.tok, self.eval_family, **settings,
                                        part=(rank(), world_size()), gather=all_gather_objects)

    def sample(self, prompts, n) -> tuple:
        """These prompts are this rank's share of the ranks' batch; each rank draws every row's uniforms
        from the same generator and uses its own rows' (model.generate's rows=), so any number of ranks
        samples exactly the rollouts one process would. A share that finishes early draws the steps the
        longest share still takes, keeping the generators in step. A rank may have no prompts (multi-turn:
        all its episodes finished): it then only keeps its generator in step."""
        counts = all_gather_objects(len(prompts) * n)  # [N] in one process
        first, total = sum(counts[:rank()]), sum(counts)
        ro, texts = (None, []) if not prompts else model_lib.sample_texts(
            self.policy, self.tok, prompts, n, self.cfg.max_new_tokens, temperature=self.cfg.temperature,
            generator=self.gen, rows=(first, total))
        steps = 0 if ro is None else ro.tokens.shape[1]
        for _ in range(max_over_ranks(steps) - steps):  # 0 in one process
            torch.rand(total, 1, generator=self.gen, device=self.device)
        return ro, texts

    def update(self, prompts, ro, adv, kept) -> dict:
        """Trainer.update, each step accumulating gradients over micro-batches of whole groups (the same
        update whatever micro_batch is), onto fp32 masters under bf16, averaged over the ranks."""
        cfg, N, G = self.cfg, len(adv), self.cfg.group_size
        mb = cfg.micro_batch or N
        mb = max(G, mb - mb % G)  # whole groups per micro-batch: rows of one prompt stay together
        kept = kept.to(self.device)
        adv, old, mask = adv.to(self.device) * kept, ro.logprobs.to(self.device), ro.mask.to(self.device) * kept[:, None]
        agg, taken, tokens = dict(clip_frac=0.0, kl=0.0, ratio_mean=0.0, loss=0.0, grad_norm=0.0), 0, 0.0
        params = self.master or list(self.policy.parameters())  # what AdamW steps
        for _ in range(cfg.epochs):
            self.policy.zero_grad(set_to_none=True)
            self.opt.zero_grad(set_to_none=True)
            loss_total = 0.0
            for s in range(0, N, mb):
                rows = slice(s, min(N, s + mb))
                loss, st = self.policy_loss(prompts, ro, rows, old, adv, mask)
                frac = (rows.stop - rows.start) / N  # the mean over rollouts, split across micro-batches
                (loss * frac).backward()
                loss_total += loss.item() * frac
                n = float(mask[rows].sum())  # the per-token statistics' weight: their token count
                for k in ("clip_frac", "kl", "ratio_mean"):
                    agg[k] += st[k] * n
                tokens += n
            if self.master is not None:  # bf16 gradients onto the fp32 masters
                for m, p in zip(self.master, self.policy.parameters()):
                    m.grad = None if p.grad is None else p.grad.float()
            # each rank's loss is the mean over its share's rollouts; the shares are equal, so the mean of the
            # ranks' gradients is the gradient of the mean over the whole batch, and the clip below sees the
            # global norm: the single-process update on the same batch
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
            taken += 1
            agg["loss"] += loss_total
            agg["grad_norm"] += float(gn)
        # the log line's statistics: loss and grad_norm are global already (the mean over the steps taken, as
        # Trainer.update's); clip_frac, kl and ratio_mean are means over every token of every micro-batch, epoch and
        # rank, as Trainer.update's over its batch, so how the batch is split never changes them
        agg |= {k: agg[k] / taken if taken else None for k in ("loss", "grad_norm")}
        tokens = max(mean_over_ranks(tokens), 1e-30)  # a ratio of means over ranks = the ratio of the sums
        return {k: v if v is None else mean_over_ranks(v) / (tokens if k in ("clip_frac", "kl", "ratio_mean") else 1)
                for k, v in agg.items()}


# -----------------------------------------------------------------------------
# Several processes (torchrun): the helpers, each the identity in one process.


def dist_init(cfg):
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


def dist_end() -> bool:
    """Leave the process group at the end of a run; True on rank 0, which reports it."""
    main = is_main()
    torch.distributed.destroy_process_group()
    return main


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


def check_world(cfg):
    if cfg.tasks_per_iter % world_size():
        raise ValueError(f"tasks_per_iter ({cfg.tasks_per_iter}) must be a multiple of the world size ({world_size()})"
                         ": every rank takes an equal share of the iteration's task instances")
