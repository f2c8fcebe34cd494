"""
The task buffer: ExIt's curriculum (§4.1 of the paper; METHOD.md, "The task buffer").

Every GRPO group leaves G new answers; each, with its request, is a partial history τ, and "improve τ"
is a new self-iteration task instance (m, k, τ). The buffer keeps the N instances of highest learnability
(rules: `TaskBuffer`). exit.py uses it like this, once per task instance of an iteration:

    if buf.should_replay():  entry = buf.sample()[0]       # iterate a buffered partial history
    else:                    draw a fresh base task m from tasks.py
    ... roll out a group of G, get rewards r ...
    S = learnability(r)
    if fresh: entry = buf.insert(m.id, asdict(m), [], 0, S)  # the base task is an instance too (k = 0);
                                                            # None when full and S is below every entry's
    if entry: buf.update_score(entry.uid, S)                # the tried instance: its fresh S
    buf.insert_history(..., score=S, parent=entry and entry.uid)  # its children: they inherit S
(a child is a list of turns {answer, feedback, depth}; insert_history makes each new turn prefix an instance)

Randomness: one seeded numpy Generator, saved in state_dict(), is the only source; should_replay() draws one
uniform per call, even below B_min, so the stream does not depend on the buffer's size.
"""
from __future__ import annotations

import copy
import json
import numbers
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

# -----------------------------------------------------------------------------
# the math, as pure functions of arrays


def learnability(rewards) -> float:
    """S = Var(r), the population variance of a group's rewards (§4.1): p(1 - p) for 0/1 rewards."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        raise ValueError("learnability: rewards is empty")
    return float(np.var(r))  # ddof=0: population variance (the paper does not say)


def sampling_probs(scores, kappa) -> np.ndarray:
    """P(i) = exp(κ S_i) / Σ_j exp(κ S_j) (§4.1)."""
    s = np.asarray(scores, dtype=np.float64)  # float64 always: one precision whatever the caller passes
    if s.size == 0:
        return s
    z = kappa * s
    w = np.exp(z - z.max())  # subtracting the max keeps exp() <= 1: no overflow for large κS
    return w / w.sum()


def entropy(p) -> float:
    """H(P) = -Σ p log p in nats; log(n) for uniform over n. Falling entropy = a narrowing curriculum."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# argument checks: a clear message naming the argument, at construction rather than mid-run


def _range(lo, hi):
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _check_real(name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not np.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be finite and in {_range(lo, hi)}, got {value}")
    return float(value)


def _check_int(name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in {_range(lo, hi)}, got {value}")
    return int(value)


def _content_key(base_id, turns, name="turns") -> str:
    """Dedupe key: base_id and the turns' content, not "depth" (the same answers by another path = one instance)."""
    if isinstance(turns, list):
        turns = [{k: v for k, v in t.items() if k != "depth"} if isinstance(t, dict) else t for t in turns]
    try:
        return json.dumps([base_id, turns], sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable (dicts, lists, str, numbers): {e}") from None


# -----------------------------------------------------------------------------
# the buffer


@dataclass
class Entry:
    """One self-iteration task instance (m, k, τ) (§3 of the paper; METHOD.md)."""
    uid: int               # unique, increasing id assigned by the buffer (also insertion order)
    base_id: str           # id of the base task m this history belongs to
    task: dict             # the base task itself, opaque and JSON-able: a checkpoint is self-contained
    turns: list            # partial history τ as given by the caller, one dict per turn
    depth: int             # iteration depth k of the latest iterate
    parent: int | None     # uid of its parent entry (maybe evicted since); None: a base task, or its parent found no room
    score: float           # learnability S: inherited from the parent, then measured when its group runs
    measured: bool = False  # True once S is this entry's own group variance (update_score), not a guess


class TaskBuffer:
    """Top-N buffer of self-iteration task instances (§4.1). The rules, each stated once:
      score      learnability S = Var(r) of a group's rewards. The tried instance gets its group's measured S
                 (update_score); its children inherit that S as a guess (insert). A measurement is replaced
                 only by a newer one; a guess by the newest guess, never over a measurement.
      sampling   P(i) ∝ exp(κ S_i); replay with probability p, and only once len(buffer) >= B_min (min_size).
      capacity   when full, a newcomer enters only if its S >= the lowest S, and evicts that entry (the oldest
                 among ties). admission="fifo", a control, not the paper: every newcomer enters, the oldest goes.
      dedupe     the same content (base_id and its turns' answers and feedback, not depths) is not stored
                 again: the stored entry keeps its lineage (uid, parent, depth); its score follows the rule.
    """

    def __init__(self, capacity: int, min_size: int, replay_prob: float, kappa: float, *,
                 seed: int = 0, admission: str = "score"):
        self.capacity = _check_int("capacity", capacity, lo=1)
        self.min_size = _check_int("min_size", min_size, lo=1, hi=self.capacity)  # B_min <= N
        self.replay_prob = _check_real("replay_prob", replay_prob, lo=0.0, hi=1.0)
        self.kappa = _check_real("kappa", kappa, lo=0.0)
        self.seed = _check_int("seed", seed, lo=0)
        if admission not in ("score", "fifo"):
            raise ValueError(f"admission must be 'score' or 'fifo', got {admission!r}")
        self.admission = admission
        self.rng = np.random.default_rng(self.seed)
        self.entries: dict[int, Entry] = {}  # uid -> Entry; dict order = insertion order
        self._keys: dict[str, int] = {}      # content key -> uid, for de-duplication
        self.next_uid = 0

    def __len__(self):
        return len(self.entries)

    # --- replay gate -------------------------------------------------------------

    def should_replay(self) -> bool:
        """True: sample a buffered instance; False: draw a fresh base task (§4.1). Always draws one uniform."""
        u = self.rng.random()
        return len(self) >= self.min_size and u < self.replay_prob

    # --- insertion ---------------------------------------------------------------

    def insert(self, base_id, task, turns, depth, score, parent=None) -> Entry | None:
        """Insert with score S (a child's: inherited, §4.1) -> the entry (a duplicate: the old one); None: no room."""
        if not isinstance(base_id, str):
            raise TypeError(f"base_id must be a str, got {type(base_id).__name__}")
        if not isinstance(turns, list):
            raise TypeError(f"turns must be a list of turns, got {type(turns).__name__}")
        depth = _check_int("depth", depth, lo=0)
        score = _check_real("score", score)
        key = _content_key(base_id, turns)
        if key in self._keys:  # dedupe; a newer guess replaces a guess, never a measurement
            old = self.entries[self._keys[key]]
            if not old.measured:
                old.score = score
            return old
        _content_key(base_id, task, "task")  # checks the task is JSON-able too, so checkpoints never fail
        if len(self) >= self.capacity and not self._make_room(score):
            return None
        entry = Entry(uid=self.next_uid, base_id=base_id, task=copy.deepcopy(task),
                      turns=copy.deepcopy(turns), depth=depth, parent=parent, score=score)
        self.next_uid += 1
        self.entries[entry.uid] = entry
        self._keys[key] = entry.uid
        return entry

    def _make_room(self, score) -> bool:
        """Top-N: if score >= the lowest, evict it (the oldest of ties: min() takes the first); fifo: the oldest."""
        if self.admission == "fifo":
            victim = next(iter(self.entries.values()))  # dict order = insertion order
        else:
            victim = min(self.entries.values(), key=lambda e: e.score)
            if score < victim.score:
                return False
        del self.entries[victim.uid]
        del self._keys[_content_key(victim.base_id, victim.turns)]
        return True

    def insert_history(self, base_id, task, turns, depths, score, parent=None, start=0) -> list:
        """Multi-turn (§4.1): each prefix turns[:t+1], t >= start, is an instance of depth depths[t], with the shared
        score and parent. Shorter prefixes were given to this group, not answered by it: not inserted."""
        if len(depths) != len(turns):
            raise ValueError(f"depths has {len(depths)} items but turns has {len(turns)}")
        return [self.insert(base_id, task, turns[:t + 1], depths[t], score, parent)
                for t in range(start, len(turns))]

    # --- scores and sampling -----------------------------------------------------

    def update_score(self, uid: int, score: float) -> None:
        """The sampled instance gets its fresh, measured learnability (§4.1). A no-op if uid was evicted."""
        score = _check_real("score", score)
        if uid in self.entries:
            self.entries[uid].score = score
            self.entries[uid].measured = True

    def probs(self) -> np.ndarray:
        """P over entries in uid order (§4.1)."""
        return sampling_probs([e.score for e in self.entries.values()], self.kappa)

    def sample(self, n: int = 1) -> list[Entry]:
        """Draw n live entries with replacement from probs()."""
        n = _check_int("n", n, lo=1)
        if not self.entries:
            raise ValueError("sample: the buffer is empty (gate replay with should_replay())")
        es = list(self.entries.values())
        return [es[i] for i in self.rng.choice(len(es), size=n, p=self.probs())]

    # --- logging -----------------------------------------------------------------

    def stats(self) -> dict:
        """Logger numbers, log.jsonl's buf_*: depth (the mean) and depth_hist track depth (Claims 1, 4); distinct
        (base tasks) and entropy, diversity (Claim 3); measured: the fraction of scores measured, not inherited."""
        es = list(self.entries.values())
        scores = [e.score for e in es]
        return {
            "size": len(es),
            "score_mean": float(np.mean(scores)) if es else 0.0,
            "score_max": float(np.max(scores)) if es else 0.0,
            "entropy": entropy(self.probs()),
            "distinct": len({e.base_id for e in es}),
            "depth": float(np.mean([e.depth for e in es])) if es else 0.0,
            "depth_hist": dict(sorted(Counter(e.depth for e in es).items())),
            "measured": float(np.mean([e.measured for e in es])) if es else 0.0,
        }

    # --- checkpointing: the buffer is the curriculum, so it round-trips exactly ---------

    def state_dict(self) -> dict:
        """Everything, in plain JSON-able Python types, including the generator's state."""
        return {
            "config": {"capacity": self.capacity, "min_size": self.min_size,
                       "replay_prob": self.replay_prob, "kappa": self.kappa, "seed": self.seed,
                       "admission": self.admission},
            "entries": [asdict(e) for e in self.entries.values()],  # asdict copies deeply: nothing shared
            "next_uid": self.next_uid,
            "rng": copy.deepcopy(self.rng.bit_generator.state),  # ints may exceed 64 bits: JSON is fine
        }

    def load_state_dict(self, d) -> None:
        """Restore exactly, configuration included (the checkpoint wins over constructor args)."""
        config = dict(d["config"])
        for k in ("rank_temperature", "staleness_coef"):  # PLR's extensions, since removed: off, they changed nothing
            if config.pop(k, None):
                raise ValueError(f"the buffer was saved with {k}={d['config'][k]}, which this version no longer has")
        self.__init__(**config)
        for e in d["entries"]:
            # inserted_at, last_sampled: the clock of PLR's staleness, since removed; older checkpoints have it
            entry = Entry(**{k: copy.deepcopy(v) for k, v in e.items() if k not in ("inserted_at", "last_sampled")})
            self.entries[entry.uid] = entry
            self._keys[_content_key(entry.base_id, entry.turns)] = entry.uid
        self.next_uid = d["next_uid"]
        self.rng.bit_generator.state = copy.deepcopy(d["rng"])
