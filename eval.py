"""
The held-out K-step self-improvement evaluation (the paper's §5, Table 1; METHOD.md).

At test time ExIt never diverges: a first answer to the base prompt (k = 0), then K improve steps, each
seeing the request, the latest iterate and the feedback on it where the family gives some.
`evaluate_policy` runs that protocol on held-out base tasks (never trained on: tasks.py keeps the splits
disjoint) and reports per step k the mean score, Δ_K = score(K) - score(0), the net corrections (Fig. 4)
and the fix/break rates, overall and by difficulty; a multi-turn family is scored on whole episodes by
the same `chain_scores`. Also here: the task diversity of what a run trained on (Tables 2, 7). The
base's row (cached, or recorded with a shipped base) is base.py's (`evaluate_base`); one improvement
chain as text is report.py's (`show_chain`).

Comparisons of runs, plots, and the ablation ladder are report.py's (`python eval.py RUN ...` and
`python eval.py --ladder` run it); this file needs only model.py and tasks.py.
"""

import math
import sys

import numpy as np
import torch

import model as model_lib
import tasks as tasks_lib


def chain_scores(policy, tok, family, problems, K: int, n_samples: int = 1, temperature: float = 1.0,
                 max_new_tokens: int = 48, seed: int = 0, batch_prompts: int = 128, style: str | None = None,
                 trace: list | None = None):
    """The K-step evaluation: n_samples improve chains per problem, problem-major, as (K + 1, chains) arrays of the
    score, the first turn's correctness and the mean per-turn correctness. A single-turn problem is a one-turn episode;
    step k improves turn t given the state left by turns < t at step k. trace: a list that gets each step's answers."""
    style = style or tasks_lib.prompt_style(tok)
    gen = torch.Generator(device=policy.inv_freq.device).manual_seed(seed)
    rows = [p for p in problems for _ in range(n_samples)]
    n_turns = [family.n_turns(p) for p in rows]
    prev = [[] for _ in rows]
    score, first, per_turn = (np.zeros((K + 1, len(rows))) for _ in range(3))

    def run(prompts, num_samples):
        out = []
        for s in range(0, len(prompts), batch_prompts):
            out += model_lib.sample_texts(policy, tok, prompts[s:s + batch_prompts], num_samples, max_new_tokens,
                                          temperature=temperature, generator=gen)[1]
        return out

    for k in range(K + 1):
        cur = [[] for _ in rows]
        mode = "base" if k == 0 else "improve"
        for t in range(max(n_turns, default=0)):  # default: a process whose part is empty (torchrun)
            live = [r for r in range(len(rows)) if t < n_turns[r]]
            answers = [None if k == 0 else prev[r][t] for r in live]  # turn t's answer at step k - 1
            if k == 0 and t == 0:  # every chain of a problem starts from the same prompt: one prefill, n_samples rows
                texts = run([tasks_lib.encode_prompt(tok, family, family.turn_problem(p, 0, []), style=style)
                             for p in problems], n_samples)
            else:
                texts = run([tasks_lib.encode_prompt(tok, family, family.turn_problem(rows[r], t, cur[r]), a, mode, style)
                             for r, a in zip(live, answers)], 1)
            for r, a, text in zip(live, answers, texts):
                cur[r].append(family.next_answer(a, text, mode))
        prev = cur
        turn_ok = [[family.score(family.turn_problem(p, t, a), a[t]) for t in range(len(a))] for p, a in zip(rows, cur)]
        score[k] = [family.episode_reward(p, a) if family.multi_turn else ok[0] for p, a, ok in zip(rows, cur, turn_ok)]
        first[k] = [ok[0] for ok in turn_ok]
        per_turn[k] = [np.mean(ok) for ok in turn_ok]
        if trace is not None:
            trace.append([a if family.multi_turn else a[0] for a in cur])
    return score, first, per_turn


def net_corrections(correct: np.ndarray) -> np.ndarray:
    """Cumulative (wrong -> right) - (right -> wrong) per step k, a fraction of chains: (K+1, N) bool -> (K+1,).
    The sum telescopes to solved[k] - solved[0]: the Δ curve of the solved fraction, counted as fixes and breaks."""
    c = correct.astype(int)
    per_step = (c[1:] - c[:-1]).sum(axis=1) / c.shape[1]  # +1 for each fix, -1 for each break
    return np.concatenate([[0.0], np.cumsum(per_step)])


def transition_rates(correct: np.ndarray) -> tuple[list, list]:
    """Fix and break rates per step k -> k+1: P(right | wrong at k), P(wrong | right at k); None where no chain was."""
    fix, brk = [], []
    for a, b in zip(correct[:-1], correct[1:]):
        fix.append(float((b & ~a).sum() / (~a).sum()) if (~a).any() else None)
        brk.append(float((~b & a).sum() / a.sum()) if a.any() else None)
    return fix, brk


def summarise(scores: np.ndarray, difficulties: list, binary: bool) -> dict:
    """Per-step means, Δ_K, net corrections and a breakdown by difficulty, in plain Python types."""
    correct = scores >= 1.0 - 1e-9
    acc = scores.mean(axis=1)
    res = dict(score=acc.tolist(), delta=float(acc[-1] - acc[0]), K=scores.shape[0] - 1, n=scores.shape[1],
               solved=correct.mean(axis=1).tolist())
    if binary:
        res["net_corrections"] = net_corrections(correct).tolist()
        res["fix_rate"], res["break_rate"] = transition_rates(correct)
    d = np.array(difficulties)
    res["by_difficulty"] = {str(v): scores[:, d == v].mean(axis=1).tolist() for v in sorted(set(difficulties))}
    return res


def heldout_problems(family, n_problems: int, seed: int = 0, harder: bool = False, warn: bool = True,
                     split: str = "test"):
    """Held-out tasks of `split` (test or val): equal shares of the training difficulties, the same for every run."""
    if not family.train_difficulties:
        return file_problems(family, n_problems, seed, warn, split)
    diffs = list(family.train_difficulties)
    if harder:
        diffs += [d for d in family.heldout_difficulties if d not in diffs]
    per = [n_problems // len(diffs) + (i < n_problems % len(diffs)) for i in range(len(diffs))]
    return [p for d, n in zip(diffs, per) if n for p in family.sample(split, n, seed=seed, difficulty=d)]


def file_problems(family, n_problems: int, seed: int, warn: bool, split: str):
    """The held-out set of a family without difficulties (a data file: realmath): at most the problems it has."""
    distinct = len(family.pool(split)) if hasattr(family, "pool") else n_problems
    if n_problems > distinct:  # cycling through the pool again would count a problem twice
        if warn and distinct:  # none: family.sample says so, as an error
            print(f"warning: {getattr(family, 'path', family.name)} has only {distinct} held-out problems; "
                  f"evaluating on those {distinct}, not {n_problems} (--eval_problems)", file=sys.stderr)
        n_problems = distinct
    return family.sample(split, n_problems, seed=seed)


def evaluate_policy(policy, tok, family, n_problems=200, K=16, n_samples=2, temperature=1.0,
                    max_new_tokens=48, seed=0, harder=False, style=None, part=(0, 1), gather=None,
                    split="test") -> dict:
    """The held-out K-step evaluation of one policy: `summarise` of n_problems x n_samples chains. part=(i, n):
    process i of n runs the i-th slice at seed + i, gather joins them (equal in distribution, not draw for draw);
    without gather, the evaluation of the slice alone."""
    problems = heldout_problems(family, n_problems, harder=harder, split=split)
    i, n = part
    mine = problems[i * len(problems) // n:(i + 1) * len(problems) // n]
    diffs = [p.difficulty for p in (mine if gather is None else problems) for _ in range(n_samples)]
    parts = chain_scores(policy, tok, family, mine, K, n_samples, temperature, max_new_tokens, seed + i, style=style)
    if gather is not None and n > 1:  # the chains are columns: join the parts' columns in order
        parts = [np.concatenate(xs, axis=1) for xs in zip(*gather(list(parts)))]
    scores, first, per_turn = parts
    res = summarise(scores, diffs, not family.graded)
    if family.multi_turn:  # the score is the episode's return; these are its first turn and its turns
        res["first_turn"] = summarise(first, diffs, True)
        res["turn_acc"] = per_turn.mean(axis=1).tolist()
    res["settings"] = dict(n_problems=n_problems, K=K, n_samples=n_samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, seed=seed, harder=harder, split=split)
    if n > 1:
        res["settings"]["parts"] = n  # split across n processes: other draws than one process's
    return res


def reservoir_add(sample: list, n_before: int, item, size: int, rng: np.random.Generator):
    """Reservoir sampling (Vitter's algorithm R): after n items, each is in `sample` with probability size / n."""
    if len(sample) < size:
        sample.append(item)
    else:
        j = int(rng.integers(n_before + 1))
        if j < size:
            sample[j] = item


def task_diversity(embedder, seqs: list[list[int]], batch: int = 256) -> dict:
    """Task diversity (Tables 2, 7): mean pairwise cosine and L2 distance of the instances' embeddings."""
    if len(seqs) < 2:
        raise ValueError("task diversity needs at least 2 instances")
    e = torch.cat([model_lib.embed(embedder, seqs[i:i + batch]) for i in range(0, len(seqs), batch)]).double()
    pairs = torch.triu_indices(len(seqs), len(seqs), offset=1)
    u = torch.nn.functional.normalize(e, dim=1)
    cos = (u @ u.T)[pairs[0], pairs[1]]
    l2 = torch.cdist(e, e)[pairs[0], pairs[1]]
    return dict(cosine=float((1 - cos).mean()), l2=float(l2.mean()), n=len(seqs))


def run_diversity(seen: list[list[int]], base) -> dict | None:
    """task_diversity of a run's sample of trained instances, embedded by its frozen base; None without either."""
    return task_diversity(base, seen) if base is not None and len(seen) >= 2 else None


def eval_settings(cfg: dict) -> dict:
    """evaluate_policy's keyword arguments from a run's config (a dict)."""
    return dict(n_problems=cfg["eval_problems"] or 200, K=cfg["eval_k"], n_samples=cfg["eval_samples"],
                temperature=cfg["eval_temperature"], max_new_tokens=cfg["max_new_tokens"], seed=cfg["seed"],
                harder=cfg.get("eval_harder", False), split=cfg.get("eval_split") or "test")


def summary_table(results: dict) -> str:
    """A small table: one row per evaluated policy, score at k = 0, 1, 4, K and Δ_K."""
    lines = []
    for name, r in results.items():
        s, K = r["score"], r["K"]
        cells = "  ".join(f"k={k}: {100 * s[k]:5.1f}" for k in sorted({0, 1, 4, K}) if k <= K)
        label = f"{name} return" if "first_turn" in r else name  # multi-turn: the episode's return; turn 1 leads
        line = f"{label:>12}  {cells}  Δ{K}: {100 * r['delta']:+5.1f}"
        fix, brk = ([x for x in r.get(k, []) if x is not None] for k in ("fix_rate", "break_rate"))
        if fix and brk:  # each over the steps it is defined at: iterating helps while fix / (fix + break) > accuracy
            line += f"  P(fix|wrong) {sum(fix) / len(fix):.2f}  P(break|right) {sum(brk) / len(brk):.3f}"
        if "first_turn" in r:
            lines.append(summary_table({f"{name} turn 1": r["first_turn"]}))
        lines.append(line)
    return "\n".join(lines)


def check_evaluation(ev, path: str, whole: bool = True) -> dict:
    """An evaluation read from disk (eval.json: {"policy", "base"}; whole=False: one policy's), or a
    ValueError naming the file."""
    res = ev.get("policy") if whole and isinstance(ev, dict) else ev
    if not isinstance(res, dict) or not all(k in res for k in ("K", "score", "delta", "n")):
        what = "eval.json's {\"policy\": {\"K\", \"score\", ...}, \"base\": ...}" if whole else "an evaluation"
        raise ValueError(f"{path}: not {what}; delete it, or pass --recompute to evaluate again")
    for name, r in [("policy", res)] + ([("base", ev["base"])] if whole and ev.get("base") is not None else []):
        r = r if isinstance(r, dict) else {}
        s, K = r.get("score"), r.get("K")
        if not (isinstance(K, int) and isinstance(r.get("n"), int)
                and all(isinstance(x, list) and len(x) == K + 1 for x in (s, r.get("solved")))
                and all(isinstance(x, (int, float)) and math.isfinite(x) for x in s + [r.get("delta")])):
            raise ValueError(f"{path}: the {name}'s scores are not K + 1 = {K} + 1 finite numbers (a missing step, or "
                             "NaN), or it has no count n or solved fractions; delete it, or pass --recompute to evaluate again")
    return ev


if __name__ == "__main__":  # the command line (comparisons, plots, the ladder) is report.py's: the one seam
    import report
    report.main()
