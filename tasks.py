"""
Task spaces, prompts, rewards and warm-start demonstrations for ExIt.

A task family is one task space M of the paper (§3): it samples base tasks m (`Problem`), writes the
three prompts ExIt needs (base, self-improve, self-diverge), scores answers, and turns scores into
the per-step rewards of the paper's §4 and Appendix A. exit.py only calls into this file (data flows
one way: no torch, no model here): it draws from a pool of sampled problems, builds prompts from the
request and the latest iterate, and asks for `step_reward` of each rollout; the buffer stores partial
histories as turns {answer, feedback, depth}.

Reading order: `Problem`; `TaskFamily`, the interface a family implements and the rules it keeps;
the per-step rewards and the train/val/test split it uses; then the families, the default first; the
real-data parser; the registry `FAMILIES`; then prompt encoding. README, "Adding a task family", has a
worked example.

Families:
  exactsum binary, no feedback, cheap to check: pick numbers that sum exactly to a target, counted down
           to 0 in the answer (math with a generation-verification gap); exactsumfb (the default): the
           same, with the environment's feedback ("sum 14, 17 short") on the current answer
  math     binary, no feedback: a left-to-right integer chain "7+5*2-9" (the competition-math analogue)
  subset   graded, with feedback: pick numbers whose sum hits a target (the ML-engineering analogue)
  tools    binary, multi-turn: requests to a tiny bank served by tool calls (the BFCL v3 analogue)
  realmath binary: GSM8K/MATH-style problems read from a JSONL file, for real instruct checkpoints

Two prompt styles: "compact" strings with MARKERS for the toy byte-level policy (one marker = one
token), and "chat" plain-text user messages that `encode_prompt` (end of this file) wraps in a
real model's chat template.

The toy policy starts from supervised `demonstrations` that follow a documented error model, so that
it behaves like the paper's instruct models: it can attempt a task and follow an improve/diverge
request, but it is a weak self-improver (its accuracy barely moves over K improve steps).
"""
import cmath
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import warnings
from dataclasses import dataclass

MARKERS = ["<|request|>", "<|answer|>", "<|feedback|>", "<|improve|>", "<|diverge|>"]
ALT_TAG = "~"  # first character of an answer written in a family's alternative solution style
MODES = ("base", "improve", "diverge")


@dataclass(frozen=True)
class Problem:
    """One base task m. JSON-able: Problem(**dataclasses.asdict(p)) == p (so `data` holds lists, not tuples)."""
    id: str
    family: str
    request: str      # the plain request text, verbatim inside every prompt
    difficulty: int   # the family's difficulty knob (exactsum, subset: list length; math: steps; MATH: level)
    target: str       # a reference answer
    data: dict        # whatever else scoring needs


def n_tokens(text: str) -> int:
    """Length under the toy byte-level tokenizer: one token per UTF-8 byte, one per marker."""
    return len(text.encode()) - sum(text.count(m) * (len(m.encode()) - 1) for m in MARKERS)


# ---------------------------------------------------------------- reading answers

def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (MATH uses both; nested braces allowed), or None."""
    i, cmd = max((text.rfind(c), c) for c in ("\\boxed", "\\fbox"))
    if i < 0:
        return None
    rest = text[i + len(cmd):]
    if not rest.lstrip().startswith("{"):  # "\boxed 5"
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    depth, j = 0, rest.index("{")
    for k in range(j, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[k], 0)
        if depth == 0:
            return rest[j + 1:k]
    return None  # unbalanced


# ---------------------------------------------------------------- the family interface

class TaskFamily:
    """One task space M (paper §3). A family is a subclass that sets the class attributes below and
    provides the methods this class declares as required (they raise NotImplementedError here); the
    others have working defaults. `check` (run when a family is built) names any piece that is missing.
    README, "Adding a task family", walks through a complete example; register it in FAMILIES.

    Required of every family:
      score(problem, response)              quality in [0, 1]; never raises, whatever the text (None too)
      make(rng, difficulty)                 one candidate problem, drawn from rng only (unless the family
                                            overrides `sample`, as realmath does with a file of problems)
    Required of a family with warm-start demonstrations (has_demonstrations, the toy families):
      attempt(problem, alt, rng)            a first attempt, with the error model's slips
      solve(problem, alt)                   the right answer (no rng: nothing is drawn)
      break_answer(problem, alt, rng)       the right answer with exactly one slip
      (one argument order for all three: problem, the style `alt` (True: the alternative style), rng)
    Required when has_feedback: feedback(problem, response). When multi_turn: n_turns, turn_problem,
    episode_reward (ToolsFamily). Optional, with defaults: chat_request, prompt, step_reward, next_answer,
    solution_text, valid, sample, reference_calls, revise, expected_accuracy, demo_record, demo_records,
    demonstrations.

    The rules a family keeps (the contract tests in test_exit.py check them for every family in FAMILIES):
      1. Problems are JSON-able: `data` holds str / int / float / lists / dicts, never tuples or sets, so
         Problem(**dataclasses.asdict(p)) == p (the buffer and checkpoints store problems as JSON).
      2. `make` draws only from the rng it is given, so `sample` is reproducible, and the base `sample`
         keeps train, val and test disjoint by the request's hash. Each difficulty should have comfortably more
         distinct problems than its share of the 5000-problem training pool runs.preflight draws; `sample` warns
         when one runs out (the difficulty mix is then skewed).
      3. `score` never raises and stays in [0, 1]; on a binary family 1.0 means right. `solve` scores 1
         in both styles. The compact prompt and answers stay short for the toy policy (a prompt of at most
         ~110 tokens, a response of at most ~50 bytes).
      4. A slip always makes the answer wrong: slips never cancel each other or land back on the right
         answer, so a first attempt with `difficulty` independent slip chances q is right with probability
         exactly a0(d) = (1 - q)^d, and `break_answer` is always wrong. (A family where slips can land on
         another right answer, as exactsum's on another exact subset, overrides `expected_accuracy` with
         a simulation, and `revise` too when its improve step is not the two-state chain.)
      5. Two solution styles: an answer in the alternative style starts with ALT_TAG ("~"), `score` reads
         both, and a diverge demonstration switches style (it is what diverge can switch to).
      6. The error model (ERROR_MODEL: q, q_break) puts the demonstrated first-attempt accuracy on the
         training mix near 0.5 (expected_accuracy(0) in 0.45..0.55: GRPO learns only from groups with
         both outcomes), and makes the demonstrated policy a weak self-improver: expected_accuracy(16) a
         little below expected_accuracy(0) (at most 0.02 above), and at most a few points above it on the
         held-out difficulties (0.05; exactsum's demonstrated local move repairs some near misses there).
      7. Demonstrations draw from their rng in a fixed order: family.demonstrations(32, seed) is part of
         the warm-start cache key (base.warm_start_key), so a change to what they say retrains the base.
      8. The chat answer_format asks for the final answer in \\boxed{...}, and `score` reads the last one
         (a chat model's answer); the multi-turn tools family is the exception.
    """
    name = "base"              # the registry key (FAMILIES), also the start of every problem id
    summary = ""               # one line for `exit.py -h` (default: the docstring's first line)
    graded = False             # True: scores in [0, 1] and the graded improve reward; False: binary
    has_feedback = False       # True: improve/diverge prompts carry `feedback` on the current answer
    multi_turn = False         # True: a base task is an episode of turns (ToolsFamily; exit.py and eval.py branch on it)
    has_demonstrations = True  # False: no warm-start demonstrations (realmath: start from an instruct checkpoint)
    reads_data = False         # True: the problems come from the --data file (realmath), given to the family as path=
    recommended: dict = {}     # exit.py settings this family trains with unless the command line sets them
    train_difficulties: tuple = ()     # the training mix (difficulty=None samples uniformly from it)
    heldout_difficulties: tuple = ()   # harder settings for held-out evaluation
    answer_format = "give the final answer as \\boxed{...}"
    # Error model of the warm-start demonstrations (see `attempt`, `revise`); each family sets q, q_break.
    # Per difficulty d: a0 = (1-q)^d, p_fix_eff = p_fix + (1 - p_fix - p_copy) a0 (a fix, or a lucky re-attempt),
    # p_break = 1 - (1-q_break)^d, and the improve chain settles at a* = p_fix_eff / (p_fix_eff + p_break).
    # q_break is chosen so that a* is a little below a0 on the training mix and about a0 on harder held-out
    # problems: a weak self-improver that RL can make stronger (raise p_fix, lower p_break). A constant
    # p_break would instead let hard problems drift UP towards the middle, i.e. a base policy that
    # "self-improves".
    ERROR_MODEL = dict(
        q=0.0,             # slip rate of a first attempt (per step / per item, see the family)
        p_alt_style=0.25,  # first attempts written in the alternative style: gives diverge something to switch to
        p_fix=0.10,        # wrong current answer -> written correctly (recomputed from the first mistake)
        p_copy=0.70,       # wrong current answer -> copied verbatim (the typical weak "improvement")
                           # otherwise (0.20): re-attempted from scratch with first-attempt slips
        q_break=0.0,       # right current answer -> each step / item re-checked wrongly with this chance
                           # (one mistake introduced), else kept verbatim; more steps, more to break
        max_depth=2,       # the current answer of an improve/diverge demo has been revised 0..max_depth times
        mix_base=0.50, mix_improve=0.35,  # share of base and improve prompts in the demos; diverge: the rest
    )
    STALE_DRAWS = 200  # `sample`: this many repeats of one difficulty, and more than its new problems = it ran out

    def __init__(self, error_model: dict | None = None):
        self.error_model = {**self.ERROR_MODEL, **(error_model or {})}
        self._warned = set()
        self.check()

    def check(self):
        """Raise TypeError naming every missing piece, so a family fails when it is built, not at warm start."""
        cls, problems = type(self), []
        provides = lambda m: getattr(cls, m) is not getattr(TaskFamily, m)
        required = ["score"]
        if not provides("sample"):
            required.append("make")
            if not self.train_difficulties or not all(isinstance(d, int) for d in self.train_difficulties):
                problems.append("train_difficulties must be a non-empty tuple of ints (the training mix of `sample`)")
            if not all(isinstance(d, int) for d in self.heldout_difficulties):
                problems.append("heldout_difficulties must be a tuple of ints")
        if self.has_demonstrations:
            required += ["attempt", "solve", "break_answer"]
        if self.has_feedback:
            required.append("feedback")
        if self.multi_turn:
            required += ["n_turns", "turn_problem", "episode_reward"]
        problems += [f"missing method {m}{_signature(getattr(TaskFamily, m))}" for m in required if not provides(m)]
        for m in ("attempt", "break_answer"):
            args = list(inspect.signature(getattr(cls, m)).parameters)
            if provides(m) and "rng" in args and "alt" in args and args.index("rng") < args.index("alt"):
                problems.append(f"{m} takes (problem, alt, rng), got ({', '.join(args[1:])})")
        if cls.name == TaskFamily.name:
            problems.append("set the class attribute `name` (its key in FAMILIES)")
        if problems:
            raise TypeError(f"task family {cls.name!r} ({cls.__name__}): " + "; ".join(problems))

    # ---- sampling
    def make(self, rng: random.Random, difficulty: int) -> Problem | None:
        """REQUIRED (unless `sample` is overridden). One candidate problem of this difficulty, drawn from
        `rng` only; `id` may be "" (sample fills it in); None rejects the draw (sample draws again)."""
        raise NotImplementedError(f"{type(self).__name__} must define make(rng, difficulty)")

    def sample(self, split: str, n: int, seed: int, difficulty: int | None = None) -> list[Problem]:
        """n distinct problems of one split, the same for the same arguments. difficulty=None: uniform over
        train_difficulties, less where distinct problems thin out (repeats); one that runs out is filled in by the
        others, with a warning."""
        check_split(split)
        if difficulty is None and not self.train_difficulties:
            raise ValueError(f"{self.name}: no train_difficulties to draw from; pass difficulty=")
        rng = random.Random(f"{self.name}/{split}/{seed}/{difficulty}")  # str seeds are stable across runs
        out, seen, misses, kept = [], set(), 0, None
        stale, got = {}, {}  # per difficulty: repeats drawn, problems accepted (bookkeeping only: no draws)
        for _ in range(200 * n + 1000):
            if len(out) == n or misses > 20000 + 10 * n:  # done, or nothing new for this long: the space is exhausted
                break
            misses += 1
            d = kept if kept is not None else difficulty if difficulty is not None else rng.choice(self.train_difficulties)
            try:
                p = self.make(rng, d)
            except (ValueError, IndexError) as e:  # e.g. a subset of 1 item: no problem of that size exists
                raise ValueError(f"{self.name}: cannot make a problem at difficulty {d} ({e}); choose other "
                                 "--difficulties") from None
            kept = d if p is None else None  # a draw make rejects is made again at its difficulty: the mix stays even
            if p is not None and p.request in seen:
                stale[d] = stale.get(d, 0) + 1
            # a multi-turn episode is split by its first turn, so that no held-out first turn is ever trained on
            if p is None or p.request in seen or split_of(self.turn_problem(p, 0, []).request) != split:
                continue
            seen.add(p.request)
            misses = 0
            got[d] = got.get(d, 0) + 1
            out.append(Problem(f"{self.name}/{split}/{_digest(p.request) % 10**10:010d}",
                               p.family, p.request, p.difficulty, p.target, p.data))
        if len(out) < n or any(k >= self.STALE_DRAWS and k > got.get(d, 0) for d, k in stale.items()):
            self._ran_out(split, n, difficulty, len(out), stale, got)
        return out

    def _ran_out(self, split, n, difficulty, found, stale, got):
        """`sample` drew repeats: warn of each difficulty that ran out (the others fill its share, so the mix is
        skewed); fewer than n distinct problems in all is an error."""
        for d, k in stale.items():
            if (k >= self.STALE_DRAWS and k > got.get(d, 0) and difficulty is None and len(self.train_difficulties) > 1
                    and (split, d) not in self._warned):  # with one difficulty, running out is the error below
                self._warned.add((split, d))
                warnings.warn(f"{self.name}: difficulty {d} ran out of distinct {split} problems after {got.get(d, 0)} "
                              f"(its share of the {n} asked is ~{n // len(self.train_difficulties)}); the other "
                              f"difficulties fill the list, so the mix is skewed: {dict(sorted(got.items()))}",
                              stacklevel=3)
        if found < n:
            diffs = [difficulty] if difficulty is not None else list(self.train_difficulties)
            raise ValueError(f"{self.name}: could not draw {n} distinct {split} problems at difficulties {diffs} "
                             f"(found {found}: {dict(sorted(got.items()))} by difficulty): too few exist there; "
                             "widen --difficulties")

    # ---- prompts
    def chat_request(self, problem: Problem) -> str:
        """The request as a chat model reads it: the plain request and `answer_format`. Override to explain
        the task's notation to a real model."""
        return f"{problem.request}\n\nPlease {self.answer_format}."

    def prompt(self, problem: Problem, answer: str | None = None, mode: str = "base",
               style: str = "compact") -> str:
        """A base (k=0), self-improve or self-diverge prompt (§4), with feedback computed afresh from `answer`."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if style not in ("compact", "chat"):
            raise ValueError(f"unknown style {style!r}; expected 'compact' or 'chat'")
        if mode != "base" and answer is None:
            raise ValueError(f"a {mode} prompt needs the current answer")
        feedback = self.feedback(problem, answer) if mode != "base" and self.has_feedback else None
        if style == "chat":
            return self.chat_prompt(problem, answer, mode, feedback)
        if mode == "base":
            return f"<|request|>{problem.request}<|answer|>"
        fb = f"<|feedback|>{feedback}" if feedback is not None else ""
        return f"<|request|>{problem.request}<|answer|>{answer}{fb}<|{mode}|>"

    def chat_prompt(self, problem: Problem, answer: str | None, mode: str, feedback: str | None) -> str:
        """`prompt` in words, for a chat model (a real checkpoint's chat template wraps it)."""
        text = self.chat_request(problem)
        if mode == "base":
            return text
        text += f"\n\nCurrent answer:\n{answer}"
        if feedback is not None:
            text += f"\n\nFeedback on the current answer: {feedback}"
        if mode == "improve":
            return text + (f"\n\nImprove the current answer: check it, fix any mistakes, keep what is "
                           f"right, then {self.answer_format}.")
        return text + ("\n\nGive a new answer that takes a significantly different approach. First, "
                       "briefly summarise the approach of the current answer. Then describe a "
                       "significantly different approach. Then solve the problem with that new "
                       f"approach and {self.answer_format}.")

    # ---- scoring
    def score(self, problem: Problem, response: str) -> float:
        """REQUIRED. Quality in [0, 1] (binary families: 1.0 iff right); anything unparseable, including a
        response that is not a str, scores 0 and never raises. Read both styles and a chat answer's last \\boxed{}."""
        raise NotImplementedError(f"{type(self).__name__} must define score(problem, response)")

    def feedback(self, problem: Problem, response: str) -> str | None:
        """REQUIRED when has_feedback. The environment's short comment on an answer, computed from what the
        answer really does (the policy cannot fake it); shown in improve/diverge prompts. Never raises."""
        return None

    def step_reward(self, problem: Problem, response: str, mode: str, prev_response: str | None) -> float:
        """The per-step reward of the paper's §4 from `score` (binary, or graded by improvement). response: the
        new iterate (what `next_answer` left); prev_response: the answer it iterated, None for a first attempt."""
        r_new = self.score(problem, response)
        if not self.graded:
            return binary_step_reward(r_new)
        r_prev = self.score(problem, prev_response) if prev_response is not None else None
        return graded_step_reward(r_new, r_prev, mode)

    def next_answer(self, answer: str | None, response: str, mode: str) -> str:
        """The new iterate after a step: the response itself. (exactsum lets an improve response "="
        stand for "keep the current answer"; exit.py and eval.py score and store what this returns.)"""
        return response

    def solution_text(self, response: str) -> str:
        """The part of a response the diversity bonus (Eq. 6) embeds (e.g. the work without the final answer)."""
        return response if isinstance(response, str) else ""

    def valid(self, response: str) -> bool:
        """Is the response of a valid type at all? (--filter_malformed drops those that are not from the loss.)"""
        return isinstance(response, str)

    # ---- multi-turn families (multi_turn = True): an episode of turns; each turn is a Problem of its own
    def n_turns(self, episode: Problem) -> int:
        """REQUIRED when multi_turn. Turns of an episode; a single-turn problem is one turn (one code path)."""
        return 1

    def turn_problem(self, episode: Problem, t: int, prev_answers: list) -> Problem:
        """REQUIRED when multi_turn. Turn t as a Problem, after the answers prev_answers[:t] (single-turn: itself)."""
        if t != 0:
            raise ValueError(f"{type(self).__name__} is single-turn: it has no turn {t}")
        return episode

    def reference_calls(self, episode: Problem) -> int | None:
        """Optional, multi-turn: how many calls the reference makes over the episode (a curriculum signal
        exit.py logs as ref_calls); None when the family has no such count."""
        return None

    def episode_reward(self, episode: Problem, answers: list) -> float:
        """REQUIRED when multi_turn. The binary reward of a whole episode, one answer per turn."""
        raise NotImplementedError(f"{type(self).__name__} is multi_turn and must define episode_reward(episode, answers)")

    # ---- warm-start demonstrations (has_demonstrations): attempt / solve / break_answer, under ERROR_MODEL
    def attempt(self, problem: Problem, alt: bool, rng: random.Random) -> str:
        """REQUIRED for demonstrations. A first attempt in the main (alt=False) or alternative (alt=True,
        starts with ALT_TAG) style: each of its `difficulty` steps or items slips with probability
        error_model["q"], and any slip makes it wrong (so it is right with probability exactly a0(d))."""
        raise NotImplementedError(f"{type(self).__name__} must define attempt(problem, alt, rng)")

    def solve(self, problem: Problem, alt: bool) -> str:
        """REQUIRED for demonstrations. The right answer in the given style; draws nothing."""
        raise NotImplementedError(f"{type(self).__name__} must define solve(problem, alt)")

    def break_answer(self, problem: Problem, alt: bool, rng: random.Random) -> str:
        """REQUIRED for demonstrations. The right answer with exactly one slip: always wrong."""
        raise NotImplementedError(f"{type(self).__name__} must define break_answer(problem, alt, rng)")

    def a0(self, difficulty: int) -> float:
        """Probability that a first attempt is right: no slip in any of its `difficulty` steps or items."""
        return (1 - self.error_model["q"]) ** difficulty

    def p_fix_eff(self, difficulty: int) -> float:
        """Chance a revision turns a wrong answer right: a fix, or a lucky re-attempt."""
        em = self.error_model
        return em["p_fix"] + (1 - em["p_fix"] - em["p_copy"]) * self.a0(difficulty)

    def p_break(self, difficulty: int) -> float:
        """Chance a revision breaks a right answer."""
        return 1 - (1 - self.error_model["q_break"]) ** difficulty

    def expected_accuracy(self, k: int, difficulties=None) -> float:
        """Expected accuracy of the demonstrated policy after k improve steps, averaged over difficulties."""
        ds = difficulties or self.train_difficulties
        return sum(two_state_accuracy(self.a0(d), self.p_fix_eff(d), self.p_break(d), k)
                   for d in ds) / len(ds)

    def revise(self, problem: Problem, answer: str, rng: random.Random) -> str:
        """The demonstrated improve step. A right answer is kept verbatim, or broken with p_break(d); a wrong
        one is fixed (p_fix), copied verbatim (p_copy), or else re-attempted from scratch with slips."""
        em, u, alt = self.error_model, rng.random(), answer.startswith(ALT_TAG)
        if self.score(problem, answer) >= 1.0:
            return self.break_answer(problem, alt, rng) if u < self.p_break(problem.difficulty) else answer
        if u < em["p_fix"]:
            return self.solve(problem, alt)
        if u < em["p_fix"] + em["p_copy"]:
            return answer
        return self.attempt(problem, alt, rng)

    def demo_records(self, n: int, seed: int) -> list[dict]:
        """Demonstrations with their provenance (problem, mode, current answer), for tests and analysis."""
        rng = random.Random(f"{self.name}/demos/{seed}")
        return [self.demo_record(p, rng) for p in self.sample("train", n, seed)]

    def demo_record(self, p: Problem, rng: random.Random) -> dict:
        """One demonstration on problem p: a base, improve or diverge step under the error model."""
        em, u = self.error_model, rng.random()
        mode = "base" if u < em["mix_base"] else "improve" if u < em["mix_base"] + em["mix_improve"] else "diverge"
        answer = self.attempt(p, rng.random() < em["p_alt_style"], rng)
        if mode == "base":
            answer, response = None, answer
        else:
            for _ in range(rng.randint(0, em["max_depth"])):
                answer = self.revise(p, answer, rng)
            if mode == "improve":
                response = self.revise(p, answer, rng)
            else:  # diverge: a fresh attempt in the other style, with first-attempt slips
                response = self.attempt(p, not answer.startswith(ALT_TAG), rng)
        return dict(problem=p, mode=mode, answer=answer, response=response, prompt=self.prompt(p, answer, mode))

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        """(compact prompt, response) pairs for warm-start SFT; the model appends end-of-text itself."""
        if not self.has_demonstrations:
            raise NotImplementedError(f"{self.name} has no warm-start demonstrations: start from an instruct checkpoint")
        return [(r["prompt"], r["response"]) for r in self.demo_records(n, seed)]


def _signature(method) -> str:
    """"(problem, alt)": a method's parameters without self or annotations, for error messages."""
    return "(" + ", ".join(list(inspect.signature(method).parameters)[1:]) + ")"


# ---------------------------------------------------------------- rewards (paper §4, Appendix A), pure functions

def graded_step_reward(r_new: float, r_prev: float | None, mode: str) -> float:
    """Graded domains: base/diverge -> r_k; improve -> max(0, (r_k - r_{k-1}) / (1 - r_{k-1})).
    r_{k-1} = 1 divides by zero (the paper is silent: METHOD.md, Choices): 1 if r_k >= r_{k-1} else 0."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if mode != "improve" or r_prev is None:  # an improve step without a previous answer is a first attempt
        return r_new
    if r_prev >= 1.0:
        return 1.0 if r_new >= r_prev else 0.0
    return max(0.0, (r_new - r_prev) / (1.0 - r_prev))


def binary_step_reward(correct: float) -> float:
    """Binary domains: every step, whatever its mode, earns the correctness of the new answer."""
    return 1.0 if correct >= 1.0 else 0.0


def two_state_accuracy(a0: float, p_fix_eff: float, p_break: float, k: int) -> float:
    """Accuracy after k improve steps of the demonstrated policy, a Markov chain on right/wrong:
    a_{k+1} = a_k (1 - p_break) + (1 - a_k) p_fix_eff, with fixed point a* = p_fix_eff / (p_fix_eff + p_break)."""
    a = a0
    for _ in range(k):
        a = a * (1 - p_break) + (1 - a) * p_fix_eff
    return a


# ---------------------------------------------------------------- splits

def _digest(text: str) -> int:
    # md5, not hash(): Python salts str hashes per process, and splits must be identical across runs
    return int(hashlib.md5(text.encode()).hexdigest(), 16)


SPLITS = ("train", "val", "test")


def split_of(request: str) -> str:
    """A request's one split, by its hash: 4/5 train, 1/10 val (for tuning), 1/10 test (reported, never tuned on)."""
    d = _digest(request) % 10
    return "test" if d == 0 else "val" if d == 5 else "train"


def check_split(split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


# ---------------------------------------------------------------- exactsum and exactsumfb (the default): binary, cheap to check

KEEP = "="  # exactsum: an improve response that keeps the current answer (`next_answer`)
_COUNTDOWN = re.compile(r"([0-9]{1,3})((?:-[0-9]{1,2}=-?[0-9]{1,3})*)")


def _countdown(picks, target: int, alt: bool) -> str:
    """An exactsum answer: the target counted down by the picks, ascending (main) or descending (~alt)."""
    out, r = str(target), target
    for x in sorted(picks, reverse=alt):
        r -= x
        out += f"-{x}={r}"
    return (ALT_TAG if alt else "") + out


class ExactSumFamily(TaskFamily):
    """Request "3 7 11 14 17>31": pick listed numbers, each at most once, summing EXACTLY to the target.
    Binary, no feedback, like `math`, but with a generation-verification gap: an answer counts the target
    down, "31-3=28-11=17-17=0" (alt: descending, "~31-17=14-11=3-3=0"), and is right iff it is well formed
    and ends at 0. Checking is reading the last number; finding is a search over subsets. An improve step
    can keep an answer ("=", KEEP) or repair one by a `local_move`. Numbers 1..19; the target is the sum
    of a planted subset of 2-4 of the d numbers, fewer than d (any exact subset is right). First attempts
    flip each number in or out of the planted subset with probability q, so a wrong one is often one move
    from right."""
    name, graded, has_feedback = "exactsum", False, False
    summary = "binary, no feedback: numbers that sum exactly to a target, cheap to check"
    train_difficulties, heldout_difficulties = (4, 5, 6), (7, 8)
    answer_format = ("count the target down by the chosen numbers and box it, e.g. \\boxed{31-3=28-11=17-17=0} "
                     "(when improving, \\boxed{=} keeps the current answer)")
    ERROR_MODEL = {**TaskFamily.ERROR_MODEL, "q": 0.12, "p_fix": 0.30, "p_copy": 0.50, "q_break": 0.09}

    def make(self, rng, difficulty):
        numbers = sorted(rng.sample(range(1, 20), difficulty))
        best = sorted(rng.sample(numbers, rng.randint(2, min(4, difficulty - 1))))
        request = " ".join(map(str, numbers)) + f">{sum(best)}"
        return Problem("", self.name, request, difficulty, _countdown(best, sum(best), False),
                       {"numbers": numbers, "target": sum(best), "best": best})

    def chat_request(self, problem):
        return (f"Task {problem.request}: choose numbers from the list before '>', each at most once, "
                f"whose sum is exactly the number after '>'. Then {self.answer_format}.")

    def picks(self, problem, response: str) -> list[int] | None:
        """The picks of a well-formed answer (from the target, right subtractions, distinct listed picks), or None."""
        if not isinstance(response, str):
            return None
        boxed = _last_boxed(response)
        m = _COUNTDOWN.fullmatch((boxed if boxed is not None else response).replace(" ", "").removeprefix(ALT_TAG))
        if not m or int(m.group(1)) != problem.data["target"]:
            return None
        r, picks = problem.data["target"], []
        for x, rest in re.findall(r"-([0-9]+)=(-?[0-9]+)", m.group(2)):
            r -= int(x)
            if int(rest) != r or int(x) not in problem.data["numbers"] or int(x) in picks:
                return None
            picks.append(int(x))
        return picks

    def score(self, problem, response):
        picks = self.picks(problem, response)
        return 1.0 if picks and sum(picks) == problem.data["target"] else 0.0

    def next_answer(self, answer, response, mode):
        keep = isinstance(response, str) and (response.strip() == KEEP or _last_boxed(response) == KEEP)
        return answer if keep and mode == "improve" and answer is not None else response

    def local_move(self, problem, picks: list[int]) -> list[int] | None:
        """Repair an answer ending at r = target - sum by one number: pick r, or drop -r; None if neither works."""
        r = problem.data["target"] - sum(picks)
        if r > 0 and r in problem.data["numbers"] and r not in picks:
            return picks + [r]
        if r < 0 and -r in picks and len(picks) > 1:
            return [x for x in picks if x != -r]
        return None

    # -- demonstrations
    def render(self, problem, picks, alt):
        return _countdown(picks, problem.data["target"], alt)

    def attempt(self, problem, alt, rng):
        picks = [x for x in problem.data["numbers"]
                 if (x in problem.data["best"]) != (rng.random() < self.error_model["q"])]
        return self.render(problem, picks or [rng.choice(problem.data["numbers"])], alt)

    def solve(self, problem, alt):
        return self.render(problem, problem.data["best"], alt)

    def break_answer(self, problem, alt, rng, picks=None):
        """Flip one listed number in or out of `picks` (default: the planted subset): always wrong, the sum moves."""
        picks = set(problem.data["best"] if picks is None else picks)
        x = rng.choice([x for x in problem.data["numbers"] if picks != {x}])  # never leave nothing picked
        return self.render(problem, picks ^ {x}, alt)

    def revise(self, problem, answer, rng):
        """TaskFamily.revise, but p_fix tries the one-number `local_move` (else a re-attempt), not `solve`."""
        em, u, alt = self.error_model, rng.random(), answer.startswith(ALT_TAG)
        picks = self.picks(problem, answer)
        if picks and sum(picks) == problem.data["target"]:  # it checks out: kept, or over-edited with p_break(d)
            return self.break_answer(problem, alt, rng, picks) if u < self.p_break(problem.difficulty) else answer
        if u < em["p_fix"]:
            move = self.local_move(problem, picks or [])  # malformed (None): as if nothing were picked
            return self.render(problem, move, alt) if move is not None else self.attempt(problem, alt, rng)
        if u < em["p_fix"] + em["p_copy"]:
            return answer
        return self.attempt(problem, alt, rng)

    def demo_record(self, p, rng):
        rec = super().demo_record(p, rng)
        if rec["mode"] == "improve" and rec["response"] == rec["answer"]:
            rec["response"] = KEEP
        return rec

    def expected_accuracy(self, k, difficulties=None, n=2000):
        """The demonstrated policy's accuracy after k improve steps. Whether a wrong answer can be repaired
        depends on the answer (one move away or not), so this simulates `revise` (n problems per
        difficulty, fixed seeds) instead of the two-state Markov chain of the other families."""
        total, count = 0.0, 0
        for d in difficulties or self.train_difficulties:
            rng = random.Random(f"{self.name}/expected/{d}")
            for p in self.sample("train", n, seed=0, difficulty=d):
                a = self.attempt(p, rng.random() < self.error_model["p_alt_style"], rng)
                for _ in range(k):
                    a = self.revise(p, a, rng)
                total, count = total + self.score(p, a), count + 1
        return total / count


class ExactSumFeedbackFamily(ExactSumFamily):
    """exactsum with the environment's feedback on the current answer ("sum 28, 3 short"), which the policy
    cannot fake (on `exactsum` it learns to fake its own check: RESULTS.md)."""
    name, has_feedback = "exactsumfb", True
    summary = "exactsum with the environment's feedback on the current answer"

    def feedback(self, problem, response):
        picks = self.picks(problem, response)
        if not picks:  # malformed (None), or the bare target with no pick ([]), which no demonstration writes
            return "unreadable"
        r = problem.data["target"] - sum(picks)
        return f"sum {sum(picks)}, " + ("exact" if r == 0 else f"{r} short" if r > 0 else f"{-r} over")


# ---------------------------------------------------------------- math: binary, no feedback

_INT = re.compile(r"\s*(-?[0-9]{1,9})\s*")  # at most 9 digits: int() of huge strings is slow or raises


class MathFamily(TaskFamily):
    """Integer chains evaluated strictly LEFT TO RIGHT (no precedence): 7+5*2-9 = ((7+5)*2)-9 = 15.
    Every intermediate value stays in 0..99 and operands are small (+/- 1..9, * 2..3), so a 0.86M-param
    byte model can learn each step. Two solution styles, the same work in different layouts:
      main  7+5=12,12*2=24,24-9=15#15   (one equation per step)
      alt  ~7+5=12*2=24-9=15#15         (one running chain)
    The final number follows the last '#' (or sits in the last \\boxed{} of a chat answer).
    First-attempt slips: each step is wrong with probability q, by 1..3; later steps compute correctly
    from the wrong value, and a slip never lands back on the true value, so a0 = (1 - q)^steps."""
    name, graded, has_feedback = "math", False, False
    summary = "binary, no feedback: left-to-right integer chains"
    train_difficulties, heldout_difficulties = (2, 3, 4), (5, 6)
    answer_format = "give the final number as \\boxed{N}"
    ERROR_MODEL = {**TaskFamily.ERROR_MODEL, "q": 0.21, "q_break": 0.09}  # a0 over 2..4 steps = 0.502

    def make(self, rng, difficulty):
        start, ops = rng.randint(1, 20), []
        v = start
        while len(ops) < difficulty:
            op = rng.choice("+-*")
            x = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
            w = _apply(op, v, x)
            if 0 <= w <= 99:  # resample the step, not the chain, when it leaves the range
                ops.append([op, x])
                v = w
        request = str(start) + "".join(f"{op}{x}" for op, x in ops)
        return Problem("", self.name, request, difficulty, str(v), {"start": start, "ops": ops})

    def chat_request(self, problem):
        return (f"Compute {problem.request}, applying the operations strictly from left to right "
                f"(ignore the usual precedence: 1+2*3 means (1+2)*3 = 9). Show each step, then "
                f"{self.answer_format}.")

    def final_number(self, response: str) -> int | None:
        if not isinstance(response, str):
            return None
        boxed = _last_boxed(response)
        tail = boxed if boxed is not None else response.rsplit("#", 1)[1] if "#" in response else None
        m = _INT.fullmatch(tail) if tail is not None else None
        return int(m.group(1)) if m else None

    def score(self, problem, response):
        return 1.0 if self.final_number(response) == int(problem.target) else 0.0

    def solution_text(self, response):
        return response.rsplit("#", 1)[0] if isinstance(response, str) else ""

    # -- demonstrations
    def _work(self, problem, alt, slip_steps, rng):
        """Write the worked solution, slipping at the given steps."""
        v = true = problem.data["start"]
        parts = []
        for i, (op, x) in enumerate(problem.data["ops"]):
            w, true = _apply(op, v, x), _apply(op, true, x)
            if i in slip_steps:  # off by 1..3, never below 0 (or, once negative, further down), never back on true
                w += rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if (w + d >= 0 or d > 0) and w + d != true])
            parts.append(f"{op}{x}={w}" if alt else f"{v}{op}{x}={w}")
            v = w
        body = ALT_TAG + str(problem.data["start"]) + "".join(parts) if alt else ",".join(parts)
        return f"{body}#{v}"

    def attempt(self, problem, alt, rng):
        slips = {i for i in range(problem.difficulty) if rng.random() < self.error_model["q"]}
        return self._work(problem, alt, slips, rng)

    def solve(self, problem, alt):
        return self._work(problem, alt, set(), None)

    def break_answer(self, problem, alt, rng):
        return self._work(problem, alt, {rng.randrange(problem.difficulty)}, rng)


def _apply(op: str, v: int, x: int) -> int:
    return v + x if op == "+" else v - x if op == "-" else v * x


# ---------------------------------------------------------------- subset: graded, with feedback

_PICKS = re.compile(r"([0-9]{1,4}(?:\+[0-9]{1,4})*)(?:=(-?[0-9]{1,6}))?")


class SubsetFamily(TaskFamily):
    """Request "3 9 14 22 31>40": pick numbers from the list (each at most once) whose sum is as close as
    possible to the target. Quality = max(0, 1 - |sum - target| / target), sum = the TRUE sum of the picks
    (a wrong written sum after '=' is ignored; the feedback reports the true one). A pick not in the list,
    or used twice, or unreadable text scores 0. Targets are built so exactly one subset hits them (so the
    optimum is 1 and "right" means that subset). Styles: main "9+31=40" (ascending), alt "~31+9=40"
    (largest first). First-attempt slips: each list number's in/out choice is flipped with probability q,
    so a0 = (1 - q)^list_length. Difficulty = list length."""
    name, graded, has_feedback = "subset", True, True
    summary = "graded, with feedback: numbers whose sum comes close to a target"
    train_difficulties, heldout_difficulties = (5, 6, 7), (8,)
    answer_format = "give the chosen numbers joined by + as \\boxed{...}, e.g. \\boxed{3+9}"
    ERROR_MODEL = {**TaskFamily.ERROR_MODEL, "q": 0.11, "q_break": 0.045}  # a0 over lists of 5..7 = 0.499

    def make(self, rng, difficulty):
        numbers = sorted(rng.sample(range(1, 41), difficulty))
        best = sorted(rng.sample(numbers, rng.randint(2, min(4, difficulty - 1))))
        target = sum(best)
        hits = sum(sum(c) == target for r in range(1, difficulty + 1) for c in itertools.combinations(numbers, r))
        if hits != 1:
            return None
        request = " ".join(map(str, numbers)) + f">{target}"
        return Problem("", self.name, request, difficulty, _render(best, False),
                       {"numbers": numbers, "target": target, "best": best})

    def chat_request(self, problem):
        return (f"Task {problem.request}: choose numbers from the list before '>', each at most once, "
                f"so that their sum is as close as possible to the number after '>'. Then "
                f"{self.answer_format}.")

    def picks(self, problem, response: str):
        """(picks, true sum), or (None, why) when the answer is unreadable or picks illegally."""
        if not isinstance(response, str):
            return None, "unreadable"
        boxed = _last_boxed(response)
        text = (boxed if boxed is not None else response).replace(" ", "").strip().removeprefix(ALT_TAG)
        m = _PICKS.fullmatch(text)
        if not m:
            return None, "unreadable"
        picks = [int(x) for x in m.group(1).split("+")]
        for x in picks:
            if x not in problem.data["numbers"] or picks.count(x) > 1:
                return None, f"bad pick {x}"
        return picks, sum(picks)

    def score(self, problem, response):
        picks, s = self.picks(problem, response)
        t = problem.data["target"]
        return 0.0 if picks is None else max(0.0, 1.0 - abs(s - t) / t)

    def feedback(self, problem, response):
        picks, s = self.picks(problem, response)
        if picks is None:
            return s
        t = problem.data["target"]
        return f"sum {s}, " + ("exact" if s == t else f"{t - s} short" if s < t else f"{s - t} over")

    def solution_text(self, response):
        return response.split("=", 1)[0] if isinstance(response, str) else ""

    # -- demonstrations
    def attempt(self, problem, alt, rng):
        picks = {x for x in problem.data["numbers"]
                 if (x in problem.data["best"]) != (rng.random() < self.error_model["q"])}
        if not picks:  # an empty answer is unwritable; any single number is still wrong (best has >= 2)
            picks = {rng.choice(problem.data["numbers"])}
        return _render(picks, alt)

    def solve(self, problem, alt):
        return _render(problem.data["best"], alt)

    def break_answer(self, problem, alt, rng):
        return _render(set(problem.data["best"]) ^ {rng.choice(problem.data["numbers"])}, alt)


def _render(picks, alt: bool) -> str:
    picks = sorted(picks, reverse=alt)
    return (ALT_TAG if alt else "") + "+".join(map(str, picks)) + f"={sum(picks)}"


# ---------------------------------------------------------------- tools: multi-turn function calling

ACCOUNTS = "abc"
END_MARKERS = ("done", "err")  # end of a request: fulfilled, or cannot be fulfilled
BUDGET = 4                     # assistant messages per request (calls + the end marker); the rest is ignored
_CALL = re.compile(r"(dep|wd|set) ([abc]) ([0-9]{1,2})")
_REQ = re.compile(r"([+-])([abc])([0-9]+)|([abc])>([abc])([0-9]+)|([abc])=([0-9]+)")


def render_state(state) -> str:
    return " ".join(f"{a}{v}" for a, v in zip(ACCOUNTS, state))


def run_calls(state, response) -> tuple[list, list, list]:
    """The environment: execute one turn's assistant messages ("wd a 3;dep b 3;done") against the accounts,
    one message at a time, as a tool-calling loop would. Returns (new state, the messages as executed:
    normalised calls then the end marker if one came, the tool outputs). A malformed message gets the
    output "err:bad" and changes nothing; a withdrawal beyond the balance gets "err:low"; nothing raises."""
    state, seq, outs = list(state), [], []
    if not isinstance(response, str):
        return state, seq, ["err:bad"]
    for msg in response.removeprefix(ALT_TAG).split(";")[:BUDGET]:
        msg = msg.strip()
        if msg in END_MARKERS:
            seq.append(msg)
            break
        m = _CALL.fullmatch(msg)
        if m is None:
            outs.append("err:bad")
            continue
        op, acct, x = m.group(1), m.group(2), int(m.group(3))
        i = ACCOUNTS.index(acct)
        seq.append(f"{op} {acct} {x}")
        if op == "wd" and state[i] < x:
            outs.append("err:low")
            continue
        state[i] = x if op == "set" else state[i] + x if op == "dep" else state[i] - x
        outs.append(f"{acct}={state[i]}")
    return state, seq, outs


def reference(state, request: str) -> tuple[list, list]:
    """The reference of one request from one state: (state after it, [main calls, alternative calls]),
    each call list ending with its end marker. Main style: the request's own verb (dep / wd, a move as
    wd + dep, set for "="); alternative style: the same effect the other way (absolute set, or relative
    dep / wd). A request that cannot be fulfilled has the single reference ["err"] and changes nothing."""
    m, s = _REQ.fullmatch(request), list(state)
    if m is None:
        raise ValueError(f"not a request: {request!r}")
    if m.group(1):  # +a3 / -a3
        op, a, x = m.group(1), m.group(2), int(m.group(3))
        i = ACCOUNTS.index(a)
        if op == "-" and s[i] < x:
            return s, [["err"]]
        s[i] += x if op == "+" else -x
        return s, [[f"{'dep' if op == '+' else 'wd'} {a} {x}", "done"], [f"set {a} {s[i]}", "done"]]
    if m.group(4):  # a>b3: move 3 from a to b
        a, b, x = m.group(4), m.group(5), int(m.group(6))
        i, j = ACCOUNTS.index(a), ACCOUNTS.index(b)
        if s[i] < x:
            return s, [["err"]]
        s[i], s[j] = s[i] - x, s[j] + x
        return s, [[f"wd {a} {x}", f"dep {b} {x}", "done"], [f"set {a} {s[i]}", f"set {b} {s[j]}", "done"]]
    a, x = m.group(7), int(m.group(8))  # a=5
    i = ACCOUNTS.index(a)
    d, s[i] = x - s[i], x
    return s, [[f"set {a} {x}", "done"], [f"{'dep' if d > 0 else 'wd'} {a} {abs(d)}", "done"]]


def contains(seq: list, ref: list) -> bool:
    """Is ref a subsequence of seq (its items in order, others allowed in between)? (BFCL's call check.)"""
    it = iter(seq)
    return all(any(x == y for y in it) for x in ref)


class ToolsFamily(TaskFamily):
    """Multi-turn function calling on a tiny bank (the paper's BFCL v3 analogue, paper §5).

    An episode (the base task m) is a starting state of three accounts and 2-4 user requests, one per
    turn: "+a3" deposit, "-a3" withdraw, "a>b3" move, "a=5" set. The tools are `dep a 3`, `wd a 3` and
    `set a 5`; the environment answers each call ("a=7", "err:low", "err:bad": `run_calls`). The policy
    answers one turn with its assistant messages joined by ';': calls, then "done", or "err" when the
    request cannot be fulfilled (too little money), at most BUDGET messages. Simplification: the whole
    turn is one completion, executed call by call afterwards; the environment's outputs reach the policy
    as the state shown in the next turn's prompt, and as feedback when it iterates this turn's answer.

    The turn prompt (`turn_problem`) holds the current state and the current request,
    "a3 b7 c0|a>b3", not the earlier turns' text: the state is what they left, and it is shorter.
    Reward (binary, `episode_reward`): 1 if the final state equals the reference final state AND every
    turn's reference sequence (calls and end marker, either style) is contained, in order, in what the
    policy sent in that turn; else 0. `score` is the same check for one turn from its own start state.
    Difficulty = number of turns."""
    name, graded, has_feedback, multi_turn = "tools", False, True, True
    # the paper's tool-use recipe (its §5 and Table 5), which exit.py applies unless the command line sets a
    # key: Dr. GRPO, 2 epochs per batch, p = 0.5, p_div = 0.5, malformed responses filtered, a buffer of
    # 640 with B_min = 320 at 16 x 8 rollouts (the paper's batch, and exit.py's), and K = 4 at test time
    recommended = dict(dr_grpo=True, epochs=2, replay_prob=0.5, p_div=0.5, filter_malformed=True,
                       buffer_size=640, min_size=320, eval_k=4)
    summary = "binary, multi-turn: tool calls on a tiny bank"
    train_difficulties, heldout_difficulties = (2, 3), (4,)
    answer_format = "give the tool calls then done (or err), joined by ';'"
    # per call q: a turn of 1 call is right 80% of the time, of 2 calls 64%: an episode ~45%
    ERROR_MODEL = {**TaskFamily.ERROR_MODEL, "q": 0.2, "q_break": 0.08}

    # ---- episodes and turns
    def make(self, rng, difficulty):
        start = [rng.randint(0, 9) for _ in ACCOUNTS]
        s, requests = start, []
        for _ in range(difficulty):
            kind, a = rng.choice("+->="), rng.choice(ACCOUNTS)
            i = ACCOUNTS.index(a)
            if kind == "+":
                req = f"+{a}{rng.randint(1, 9)}"
            elif kind == "=":
                req = f"{a}={rng.choice([v for v in range(0, 20) if v != s[i]])}"
            else:  # a withdrawal or move: fulfillable with the money there, else (or 1 in 5) beyond it
                x = rng.randint(1, s[i]) if s[i] and rng.random() > 0.2 else rng.randint(s[i] + 1, s[i] + 5)
                req = f"-{a}{x}" if kind == "-" else f"{a}>{rng.choice([b for b in ACCOUNTS if b != a])}{x}"
            requests.append(req)
            s = reference(s, req)[0]
        answers = self.reference_answers(start, requests)
        return Problem("", self.name, "|".join([render_state(start)] + requests), difficulty, "|".join(answers),
                       {"start": start, "requests": requests})

    @staticmethod
    def reference_answers(start, requests) -> list[str]:
        s, out = start, []
        for req in requests:
            s, refs = reference(s, req)
            out.append(";".join(refs[0]))
        return out

    def reference_calls(self, episode: Problem) -> int:
        """How many tool calls the reference makes over the whole episode (end markers and refusals not
        counted): the complexity of what is being trained on, a curriculum signal (the paper's Fig. 6)."""
        s, n = episode.data["start"], 0
        for req in episode.data["requests"]:
            s, refs = reference(s, req)
            n += sum(c not in ("done", "err") for c in refs[0])
        return n

    def expected_accuracy(self, k, difficulties=None):
        """Per turn: a turn's difficulty is its number of calls (1 or 2), not the episode's number of turns."""
        return super().expected_accuracy(k, difficulties or (1, 2))

    def n_turns(self, episode: Problem) -> int:
        return len(episode.data["requests"])

    def turn_problem(self, episode: Problem, t: int, prev_answers: list) -> Problem:
        """Turn t of an episode after the earlier turns' answers: the state they left (executed by the
        environment, mistakes included) and request t. Its prompts are the family's usual prompts."""
        state = episode.data["start"]
        for a in prev_answers[:t]:
            state = run_calls(state, a)[0]
        req = episode.data["requests"][t]
        _, refs = reference(state, req)
        return Problem(f"{episode.id}/{t}", self.name, f"{render_state(state)}|{req}", len(refs[0]) - 1 or 1,
                       ";".join(refs[0]), {"state": list(state), "request": req, "turn": t})

    def chat_request(self, problem):
        return (f"Accounts {render_state(problem.data['state'])}. Request {problem.data['request']} "
                f"(+a3 deposit, -a3 withdraw, a>b3 move, a=5 set). Tools: dep a N, wd a N, set a N. Call them, "
                f"one per message, end with done, or err if the request cannot be fulfilled; "
                f"{self.answer_format}.")

    # ---- scoring
    def score(self, problem, response):
        """One turn, from its own start state: the state it leaves and its calls match the reference."""
        new, seq, _ = run_calls(problem.data["state"], response)
        ref_state, refs = reference(problem.data["state"], problem.data["request"])
        return 1.0 if new == ref_state and any(contains(seq, r) for r in refs) else 0.0

    def episode_reward(self, episode: Problem, answers: list) -> float:
        """The binary reward of a whole episode (§3): final state = the reference final state, and in
        every turn the reference calls are contained, in order, in the policy's calls."""
        if len(answers) != self.n_turns(episode):
            return 0.0
        state = ref_state = episode.data["start"]
        for req, answer in zip(episode.data["requests"], answers):
            ref_state, refs = reference(ref_state, req)
            state, seq, _ = run_calls(state, answer)
            if not any(contains(seq, r) for r in refs):
                return 0.0
        return 1.0 if state == ref_state else 0.0

    def feedback(self, problem, response):
        """The environment's outputs to the current iterate's calls, which the policy saw."""
        outs = run_calls(problem.data["state"], response)[2]
        return " ".join(outs) or "none"

    def valid(self, response):
        """True iff the response has at least one well-formed call or end marker (else it is of no valid type)."""
        return bool(run_calls([0] * len(ACCOUNTS), response)[1])

    # ---- demonstrations: per turn, on turns reached by the demonstrated policy's own first attempts
    def _calls(self, problem, alt, slip_at, rng):
        s, req = problem.data["state"], problem.data["request"]
        _, refs = reference(s, req)
        if refs[0] == ["err"]:  # the slip: trying the request anyway, as if there were enough money
            if not slip_at:
                return ALT_TAG + "err" if alt else "err"
            calls = reference([99] * len(ACCOUNTS), req)[1][0][:-1]
            return (ALT_TAG if alt else "") + ";".join(calls + ["done"])
        calls = refs[1 if alt else 0][:-1]
        for k in slip_at:  # an amount off by 1 or 2 (never below 0): a different state, never right
            op, a, x = calls[k].split()
            x = int(x) + rng.choice([d for d in (-2, -1, 1, 2) if int(x) + d >= (0 if op == "set" else 1)])
            calls[k] = f"{op} {a} {x}"
        return (ALT_TAG if alt else "") + ";".join(calls + ["done"])

    def attempt(self, problem, alt, rng):
        return self._calls(problem, alt, [k for k in range(problem.difficulty) if rng.random() < self.error_model["q"]], rng)

    def solve(self, problem, alt):
        return self._calls(problem, alt, [], None)

    def break_answer(self, problem, alt, rng):
        return self._calls(problem, alt, [rng.randrange(problem.difficulty)], rng)

    def demo_records(self, n, seed):
        """Each demonstration is one turn of an episode, the earlier turns answered with first attempts
        (so the states seen include ones a mistake left); then the usual base / improve / diverge step."""
        rng = random.Random(f"{self.name}/demos/{seed}")
        records = []
        for ep in self.sample("train", n, seed):
            t, prev = rng.randrange(self.n_turns(ep)), []
            for i in range(t):
                prev.append(self.attempt(self.turn_problem(ep, i, prev), rng.random() < self.error_model["p_alt_style"], rng))
            records.append(self.demo_record(self.turn_problem(ep, t, prev), rng))
        return records


# ---------------------------------------------------------------- real data (GSM8K / MATH JSONL)

def extract_answer(text: str) -> str:
    """The final answer of a response: the last \\boxed{}, else what follows '####', else the last number, whole
    with the expression it ends (3/4, 2^4, 10-4: not a wrong answer 4)."""
    if not isinstance(text, str):
        return ""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        lines = text.rsplit("####", 1)[1].strip().splitlines()
        return lines[0].strip() if lines else ""
    number = r"(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)"  # .5 too
    numbers = re.findall(rf"-?{number}(?:\s*[-+*/^]\s*{number})*", text)
    return numbers[-1].rstrip(",") if numbers else ""


def _normalise(s: str) -> str:
    s = re.sub(r"(?<=[0-9])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z]{1,8}\.?\s*\}\s*$", "", s)  # a unit: 5 \text{ cm}
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for a, b in [("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\$", ""), ("$", ""),
                 ("\\!", ""), ("\\,", ""), ("\\ ", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""),
                 ("{,}", ","), ("\u2212", "-")]:  # 1{,}000; a Unicode minus sign
        s = s.replace(a, b)
    s = re.sub(r"^\s*[A-Za-z]\s*=\s*", "", s).strip()  # x = 5 -> 5
    if re.fullmatch(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?", s):  # 1,234 -> 1234; never (3,100) or 2, 500
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return re.sub(r"^(-?[0-9]+)\.0+$", r"\1", s)


def _brace_group(s: str, i: int) -> tuple[str, int]:
    """The argument starting at s[i]: a {...} group or a single character; returns (content, next index)."""
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for k in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[k], 0)
        if depth == 0:
            return s[i + 1:k], k + 1
    raise ValueError("unbalanced braces")


def _latex_to_python(s: str) -> str:
    for cmd, fmt in (("\\frac", "(({})/({}))"), ("\\sqrt", "sqrt({})")):
        while cmd in s:
            i = s.index(cmd) + len(cmd)
            a, i = _brace_group(s, i)
            if cmd == "\\frac":
                b, i = _brace_group(s, i)
                j = start = s.index(cmd)
                while j and s[j - 1].isdigit():
                    j -= 1
                frac = fmt.format(_latex_to_python(a), _latex_to_python(b))
                if j < start and (j == 0 or s[j - 1] in "+-*/(=,") and a.isdigit() and b.isdigit():  # 2\frac{1}{4}: 2 + 1/4
                    frac, start = f"({s[j:start]}+{frac})", j
                s = s[:start] + frac + s[i:]
            else:
                s = s[:s.index(cmd)] + fmt.format(_latex_to_python(a)) + s[i:]
    for a, b in [("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("^", "**"), ("{", "("), ("}", ")")]:
        s = s.replace(a, b)
    return s


# an exponent must be a tiny literal or one letter, and never itself raised: 9**99**99 would never finish
_POW = re.compile(r"\*\*(\(-?[0-9]{1,2}(/[0-9]{1,2})?\)|-?[0-9]{1,2}(?![0-9.])|[A-Za-z](?![A-Za-z0-9]))(?!\*\*)")


def _to_sympy(s: str):
    """A sympy expression, or None when the text is not a small, safe arithmetic expression.
    sympy parses with eval(), so only digits, operators, single-letter symbols, sqrt and pi pass."""
    if len(s) > 120:
        return None
    try:
        py = _latex_to_python(s)
    except (ValueError, RecursionError):
        return None
    if (len(py) > 120 or not re.fullmatch(r"[0-9A-Za-z+\-*/(). ]+", py) or re.search(r"[A-Za-z_]\.", py)
            or any(len(w) > 1 and w not in ("sqrt", "pi") for w in re.findall(r"[A-Za-z]+", py))
            or py.count("**") > 2 or any(not _POW.match(py, m.start()) for m in re.finditer(r"\*\*", py))):
        return None
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication
    try:
        return parse_expr(py, transformations=standard_transformations + (implicit_multiplication,))
    except Exception:  # sympy raises many types (SyntaxError, TypeError, TokenError...)
        return None


def answers_equal(a: str, b: str) -> bool:
    """Same final answer? String normalisation first, then sympy equivalence. Never raises."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    na, nb = _normalise(a), _normalise(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    ea, eb = _to_sympy(na), _to_sympy(nb)
    if ea is None or eb is None:
        return False
    try:  # not sympy.simplify: on one answer, (a+b+c+d)^{50}, it took a minute
        names = sorted((ea - eb).free_symbols, key=str)
        if not names:  # numbers: exact integers and fractions stay exact (10^9 is not 10^9 + 1)
            return abs(complex((ea - eb).evalf(30))) < 1e-9
        return _same_at_points(ea, eb, names)
    except Exception:
        return False


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)


def _same_at_points(ea, eb, names) -> bool:
    """Two expressions in letters as functions: equal at 4 points where each letter takes its own value (a + c and
    2b differ), relative to their size; a point where either is undefined (a pole) is skipped."""
    import sympy
    seen = 0
    for k in range(4):
        point = {x: sympy.Rational(_PRIMES[(5 * i + 7 * k) % len(_PRIMES)], 13) for i, x in enumerate(names)}
        try:
            x, y = complex(ea.evalf(subs=point)), complex(eb.evalf(subs=point))
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if not (cmath.isfinite(x) and cmath.isfinite(y)):
            continue
        if abs(x - y) > 1e-9 * max(1.0, abs(x), abs(y)):
            return False
        seen += 1
    return seen > 0


def load_jsonl(path: str, fmt: str = "auto") -> list[Problem]:
    """GSM8K lines {"question", "answer": "... #### 42"} or MATH lines {"problem", "solution" with \\boxed{}
    or "answer"}. A malformed line raises ValueError naming file and line."""
    if fmt not in ("auto", "gsm8k", "math"):
        raise ValueError(f"fmt must be 'auto', 'gsm8k' or 'math', got {fmt!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a JSON-lines file")
    stem, out, seen = os.path.splitext(os.path.basename(path))[0], [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}, line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text (is it a JSON-lines file?)") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: expected a JSON object")
            kind = fmt if fmt != "auto" else "gsm8k" if "question" in d else "math" if "problem" in d else None
            answer = d.get("answer")  # a MATH answer may be a JSON number; never null, NaN, a list or an object
            if kind == "gsm8k" and isinstance(d.get("question"), str) and isinstance(answer, str) and "####" in answer:
                request, target = d["question"], (answer.rsplit("####", 1)[1].strip().splitlines() or [""])[0]
            elif kind == "math" and isinstance(d.get("problem"), str) and (
                    isinstance(answer, (str, int)) and not isinstance(answer, bool)
                    or isinstance(answer, float) and math.isfinite(answer)
                    or "answer" not in d):
                request = d["problem"]
                target = str(answer) if "answer" in d else _last_boxed(str(d.get("solution", ""))) or ""
            else:
                raise ValueError(f"{where}: need 'question' + 'answer' with '####' (GSM8K) or "
                                 f"'problem' + 'solution' with \\boxed{{}} or 'answer' (MATH), as text")
            if not target.strip() or not request.strip():
                raise ValueError(f"{where}: " + ("no final answer found" if request.strip() else "an empty question"))
            first = seen.setdefault(request.strip(), (line_no, target.strip()))
            if first[0] != line_no:  # a question twice: once, or an error if its answers differ
                if not answers_equal(target, first[1]):
                    raise ValueError(f"{where}: the question of line {first[0]} again, with another answer "
                                     f"({target.strip()!r}, not {first[1]!r})")
                continue
            level = re.search(r"[0-9]+", str(d.get("level", "")))
            out.append(Problem(f"{stem}/{line_no}", "realmath", request, int(level.group()) if level else 0,
                               target.strip(), {"line": line_no}))
    if not out:
        raise ValueError(f"{path}: no problems (the file is empty)")
    return out


class RealMath(TaskFamily):
    """Real math problems for instruct checkpoints; binary reward = the final answer is equivalent."""
    name, graded, has_feedback, has_demonstrations, reads_data = "realmath", False, False, False, True
    summary = "binary: GSM8K/MATH-style problems from a JSONL file (needs --data and --init)"
    answer_format = "put the final answer in \\boxed{}"

    def __init__(self, problems: list[Problem] | None = None, path: str | None = None, error_model=None,
                 heldout_file: bool = False):
        """heldout_file: every problem is a test problem (a separate evaluation file, exit.py --eval_data);
        otherwise the split is by request hash (split_of): a tenth of the file is test, a tenth validation."""
        super().__init__(error_model)
        if problems is None and path is None:
            raise ValueError("realmath needs problems=[...] or path='file.jsonl'")
        self.problems = list(problems) if problems is not None else load_jsonl(path)
        self.path, self.heldout_file = path or "the problems given", heldout_file

    def pool(self, split, difficulty=None) -> list[Problem]:
        """The distinct problems of a split."""
        check_split(split)
        return [p for p in self.problems if (split == "test" if self.heldout_file else split_of(p.request) == split)
                and (difficulty is None or p.difficulty == difficulty)]

    def sample(self, split, n, seed, difficulty=None):
        """n problems of the split (by the same request hash); when n exceeds the pool, it is cycled
        through again in a new order, so repeats appear only then."""
        pool = self.pool(split, difficulty)
        if not pool:
            how = ("it is an evaluation file" if self.heldout_file else
                   f"the {split} split is the {'four fifths' if split == 'train' else 'tenth'} of lines whose request "
                   f"hashes there (tasks.split_of), and none of its {len(self.problems)} did")
            hint = "; add lines, or give a held-out file with --eval_data" if split == "test" else "; add lines"
            raise ValueError(f"realmath: {self.path} has no {split} problems"
                             + (f" at level {difficulty}" if difficulty is not None else "") + f" ({how}){hint}")
        rng, out = random.Random(f"{self.name}/{split}/{seed}/{difficulty}"), []
        while len(out) < n:
            out += rng.sample(pool, len(pool))
        return out[:n]

    def score(self, problem, response):
        return 1.0 if answers_equal(extract_answer(response), problem.target) else 0.0

    def solution_text(self, response):
        if not isinstance(response, str):
            return ""
        i = response.rfind("\\boxed")
        return response[:i] if i > 0 else response


# ---------------------------------------------------------------- registry: add a family here

FAMILIES = {  # name -> class; `exit.py --task=NAME`, `-h` lists them (describe_families)
    "math": MathFamily,
    "subset": SubsetFamily,
    "exactsum": ExactSumFamily,
    "exactsumfb": ExactSumFeedbackFamily,
    "tools": ToolsFamily,
    "realmath": RealMath,
}


def get_family(name: str, **kwargs) -> TaskFamily:
    """The family registered under `name`, built (and so checked: TaskFamily.check) with kwargs."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; valid names: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name](**kwargs)


def describe_families() -> str:
    """One line per registered family, "name: summary" (for `exit.py -h`)."""
    def summary(cls):
        return cls.summary or (cls.__doc__ or "").strip().split("\n")[0]
    return "; ".join(f"{name}: {summary(cls)}" for name, cls in FAMILIES.items())


# -----------------------------------------------------------------------------
# Prompts as token ids (the one place training and evaluation build them), and a run's family.


def prompt_ids(tok, text: str) -> list[int]:
    """Token ids of a compact prompt: begin-of-text, then the text with its markers as special tokens."""
    return ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(text, special=True)


def prompt_style(tok) -> str:
    """"compact" if the tokenizer has MARKERS as special tokens (the toy's, also after save_hf), else "chat"."""
    return "compact" if all(len(tok.encode(m, special=True)) == 1 for m in MARKERS) else "chat"


def encode_prompt(tok, family, problem, answer=None, mode="base", style="compact") -> list[int]:
    """Token ids of a base / improve / diverge prompt (§4): compact markers, or chat text in the chat template."""
    if style == "compact":
        text = family.prompt(problem, answer, mode)
        if answer is None:
            return prompt_ids(tok, text)
        head, _, tail = text.partition(f"<|answer|>{answer}")  # the policy's text stays text, even one that spells a marker
        return prompt_ids(tok, head + "<|answer|>") + tok.encode(answer) + tok.encode(tail, special=True)
    return tok.render_chat([{"role": "user", "content": family.prompt(problem, answer, mode, style="chat")}])


MAX_DIFFICULTY = 100  # far past what fits a toy's context (a problem of 100 numbers, steps or turns)


def parse_difficulties(text: str, task: str = "") -> tuple:
    """'2-6' -> (2, 3, 4, 5, 6); '2,3,5' -> (2, 3, 5). A family that reads its problems from a file has the levels
    the file gives (a mix would cycle through its pool: repeated problems)."""
    if getattr(FAMILIES.get(task), "reads_data", False):
        raise ValueError(f"config: --difficulties does not apply to {task} (its file sets the levels)")
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            out = tuple(range(lo, min(hi, MAX_DIFFICULTY + 1) + 1))  # a larger hi is refused below, never built
        else:
            out = tuple(int(x) for x in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1 or max(out) > MAX_DIFFICULTY:
        raise ValueError(f"config: difficulties looks like '2-6' or '2,3,5' (integers from 1 to {MAX_DIFFICULTY}), "
                         f"got {text!r}")
    return out


def make_family(task: str, data: str = "", difficulties: str = ""):
    """The run's family: realmath reads --data; --difficulties replaces the training mix (and so the eval mix)."""
    reads_data = getattr(FAMILIES.get(task), "reads_data", False)  # an unknown name: get_family says so
    mix = parse_difficulties(difficulties, task) if difficulties else None  # before a data file is read
    family = get_family(task, path=data) if reads_data else get_family(task)
    if mix:
        family.train_difficulties = mix
    return family


def eval_family(eval_data: str, family):
    """The final evaluation's family: all of --eval_data's file, else the training family (its test split)."""
    return RealMath(path=eval_data, heldout_file=True) if eval_data else family
