"""
Comparisons of finished runs, their plots, and the ablation ladder in one command (the paper's Table 1,
mean ± std over seeds; METHOD.md). `python eval.py ...` is this file's command line:

    python eval.py runs/ladder/*-s*         # table + plots of finished runs (eval.json reused)
    python eval.py --table results.json     # reprint (and redraw) a saved comparison
    python eval.py --ladder --jobs=2 --results=results/ladder   # the whole reproduction, 5 seeds with its controls, resumable

Top to bottom: what is on disk (`evaluate_checkpoint`, `load_run`: a run's eval.json, else its
ckpt.pt evaluated and written), the comparison (`comparison_table`, `format_table`), plots
(`plot_table`; one run's lineage: `plot_lineage`; one improvement chain as text: `show_chain`), `compare` (runs -> table, results.json, plots), the ladder (each run
is `python exit.py` as a user runs it), and the command line. It builds on eval.py (the evaluation)
and runs.py (run folders); nothing in the core imports it.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

import base as base_lib
import eval as eval_lib
import hf
import model as model_lib
import runs as runs_lib
import tasks as tasks_lib


_NUM = (lambda v: isinstance(v, (int, float)), "a number")
_MS = (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_NUM[0], v)), "[mean, std]")
_SE = (_MS[0], "[mean, standard error]")
# what format_table and plot_table read of a saved comparison: each row's fields, and the budget's
ROW_FIELDS = dict(method=(lambda v: isinstance(v, str), "text"), label=(lambda v: isinstance(v, str), "text"),
                  runs=(lambda v: isinstance(v, int), "a count"), k0=_MS, kK=_MS, delta=_MS,
                  **dict.fromkeys(("score_mean", "score_std"),
                                  (lambda v: isinstance(v, list) and all(map(_NUM[0], v)), "a list of numbers")),
                  problems=(lambda v: v is None or isinstance(v, list) and v != [] and all(  # tables from before: none
                      isinstance(x, int) and x > 0 for x in v), "a list of counts"))
BUDGET_FIELDS = dict(n=ROW_FIELDS["runs"], fresh_frac=_NUM, equal_iterations=_SE, equal_base_tasks=_SE)


def check_table(table, path: str) -> dict:
    """A saved comparison (results.json) as format_table and plot_table read it, or a ValueError naming the file."""
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list) or not isinstance(table.get("K"), int):
        raise ValueError(f"{path}: not a comparison (results.json with 'K' and 'rows')")
    paired, budget = table.get("paired") or [], table.get("budget")
    if not isinstance(paired, list):
        raise ValueError(f"{path}: paired is not a list")
    methods = [r.get("method") for r in table["rows"] if isinstance(r, dict)]
    row = (lambda v: v in methods, "a row's method")  # a paired difference is labelled by its rows
    pair_fields = dict(a=row, b=row, n=ROW_FIELDS["runs"], k0=_MS, kK=_MS,
                       zero_var=(lambda v: v is None or _MS[0](v), "[mean, std] or null"))
    parts = [(f"row {i + 1}", r, ROW_FIELDS) for i, r in enumerate(table["rows"])] \
        + [(f"paired {i + 1}", d, pair_fields) for i, d in enumerate(paired)] \
        + ([("budget", budget, BUDGET_FIELDS)] if budget is not None else [])
    for name, part, fields in parts:
        if not isinstance(part, dict):
            raise ValueError(f"{path}: {name} is not an object")
        bad = next((f"{k} is not {what}" for k, (ok, what) in fields.items() if not ok(part.get(k))), None)
        if bad:
            raise ValueError(f"{path}: {name}'s {bad}")
    return table


# What this file needs of a run's config where a checkpoint lacks it (a warm-start file has none): exit.Config's
# defaults for these keys. eval.py never imports exit.py (exit.py imports it); a test keeps the two equal.
RUN_DEFAULTS = dict(eval_problems=200, eval_k=16, eval_samples=2, eval_temperature=1.0, eval_harder=False,
                    eval_split="test", max_new_tokens=48, seed=0, data="", difficulties="", eval_data="",
                    kappa=10.0, admission="score")


METHODS = ("grpo", "curriculum", "improve", "diverge", "exit")  # the ladder's rungs, as exit.METHODS
# the config.json settings this file reads (run_label, the base key, eval_settings): another type is a damaged file
CONFIG_TYPES = {**dict.fromkeys(("method", "task", "admission", "data", "eval_data", "difficulties", "eval_split",
                                 "init"), (str, "text")),
                **dict.fromkeys(("seed", "base_seed", "eval_k", "eval_problems", "eval_samples", "max_new_tokens",
                                 "eval_temperature", "kappa", "div_clip"), ((int, float), "a number"))}


def truncate(res: dict, K: int) -> dict:
    """An evaluation cut to its first K steps. Exact, not an approximation: step k of a chain only
    depends on steps 0..k-1 (and the sampler's stream up to there), never on how many follow."""
    if K > res["K"]:
        raise ValueError(f"asked for K = {K}, but this evaluation has only {res['K']} steps; pass --recompute")
    out = dict(res, K=K, score=res["score"][:K + 1], solved=res["solved"][:K + 1])
    out["delta"] = out["score"][K] - out["score"][0]
    if "net_corrections" in res:
        out["net_corrections"] = res["net_corrections"][:K + 1]
    for key in ("fix_rate", "break_rate"):  # one entry per step k -> k+1
        if key in res:
            out[key] = res[key][:K]
    out["by_difficulty"] = {d: v[:K + 1] for d, v in res.get("by_difficulty", {}).items()}
    if "first_turn" in res:  # a multi-turn family's extra curves
        out["first_turn"], out["turn_acc"] = truncate(res["first_turn"], K), res["turn_acc"][:K + 1]
    return out


def _task_from_name(path: str):
    """A warm-start cache file is named {task}-{key}.pt (base.warm_start); it records no config."""
    task = os.path.basename(path).split("-")[0]
    return task if task in tasks_lib.FAMILIES else None


def frozen_base(base_path: str, device):
    """The base policy a run started from if a toy base (cached or shipped); None for a Hugging Face checkpoint."""
    return hf.load_policy(base_path, device)[0] if base_lib.toy_base(base_path) else None


def improvement_chain(policy, tok, family, problem, K: int, temperature: float = 1.0, max_new_tokens: int = 48,
                      seed: int = 0) -> list[tuple[str, float]]:
    """One held-out problem's chain as text, [(answer, score)] for k = 0..K, by the evaluation's own protocol."""
    was_training, trace = policy.training, []
    policy.eval()
    scores, _, _ = eval_lib.chain_scores(policy, tok, family, [problem], K, 1, temperature, max_new_tokens, seed, trace=trace)
    policy.train(was_training)
    return [(answers[0], float(scores[k, 0])) for k, answers in enumerate(trace)]


def format_chains(problem, chains: dict, width: int | None = None, title: str = "") -> str:
    """Chains of several policies on one problem, side by side, one line per step k; answers cut at `width`."""
    width = width or min(60, max(len(a) for c in chains.values() for a, _ in c))
    def cell(answer, score):
        text = answer.replace("\n", " ")
        text = text if len(text) <= width else text[:width - 1] + "…"
        return f"{text:<{width}} {score:4.2f}"
    names = list(chains)
    lines = [f"held-out problem {problem.id}: {problem.request!r}" + (f" ({title})" if title else ""),
             "  k | " + " | ".join(f"{n:<{width + 5}}" for n in names)]
    for k in range(len(chains[names[0]])):
        lines.append(f"{k:3d} | " + " | ".join(cell(*chains[n][k]) for n in names))
    return "\n".join(lines)


CHAIN_CANDIDATES = 8  # held-out problems show_chain looks through for a chain that improves


def show_chain(policy, tok, family, settings: dict, name: str, base=None) -> str:
    """One held-out chain as text, beside base's; the first of CHAIN_CANDIDATES problems whose chain improves."""
    if family.multi_turn:
        return ""
    kw = {k: settings[k] for k in ("K", "temperature", "max_new_tokens", "seed")}
    problems = eval_lib.heldout_problems(family, settings["n_problems"], harder=settings.get("harder", False),
                                warn=False, split=settings["split"])[:CHAIN_CANDIDATES]
    improves = lambda chain: chain[-1][1] > chain[0][1]
    problem, mine = problems[0], improvement_chain(policy, tok, family, problems[0], **kw)
    if settings["K"] and not improves(mine):  # K = 0: no improve step to look for
        for candidate in problems[1:]:
            chain = improvement_chain(policy, tok, family, candidate, **kw)
            if improves(chain):
                problem, mine = candidate, chain
                break
    if not settings["K"]:
        title = "K = 0: no improve steps"
    elif improves(mine):
        title = (f"the first of the evaluation's first {len(problems)} held-out problems whose {name} chain ends "
                 "better than it starts")
    else:
        title = f"none of the first {len(problems)} improved; the first"
    chains = {} if base is None else {"base": improvement_chain(base, tok, family, problem, **kw)}
    return format_chains(problem, chains | {name: mine}, title=title)


def evaluate_checkpoint(path: str, task: str | None = None, K: int | None = None, n_problems: int | None = None,
                        n_samples: int | None = None, device: str = "auto", with_base: bool = True,
                        temperature: float | None = None, split: str | None = None, chain: bool = False,
                        evaluate: bool = True) -> dict:
    """{"policy": ..., "base": ...} for a checkpoint file, as exit.main writes eval.json (chain=True adds
    "chain": show_chain's text, what chain.txt holds; evaluate=False: that chain alone).

    A run checkpoint brings its config: its eval_* settings and seed are the defaults, so this
    recomputes exactly what the run's own final evaluation did. Its base is the warm-started
    policy at ckpt["base_path"] (None, with a warning, if that file is gone). A warm-start cache
    file is a policy of its own, with no base."""
    ck = model_lib.load_checkpoint(path)
    # a run's saved config, with today's defaults for what it lacks (a base file has no config at all)
    cfg = {**RUN_DEFAULTS, **(ck.get("config") or {})}
    recorded = (ck.get("config") or {}).get("task")
    if task and recorded and task != recorded:
        raise ValueError(f"{path} was trained on --task={recorded}; --task={task} is only for a checkpoint "
                         "that records no task (a warm-start file)")
    task = recorded or task or _task_from_name(path)
    if task is None:
        raise ValueError(f"{path} records no task (not a run checkpoint); pass --task")
    family = tasks_lib.eval_family(cfg.get("eval_data", ""),
                                   tasks_lib.make_family(task, cfg.get("data", ""), cfg.get("difficulties", "")))
    dev = model_lib.pick_device(device)
    settings = eval_lib.eval_settings(cfg)
    settings.update({k: v for k, v in dict(n_problems=n_problems, K=K, n_samples=n_samples).items() if v is not None})
    if temperature is not None:  # 0 is a real choice (greedy), so not "if temperature"
        settings["temperature"] = temperature
    if split is not None:
        settings["split"] = split
    policy, tok = model_lib.policy_from_state(ck["policy"], dev, hf.build_tokenizer, path)
    out = dict(policy=eval_lib.evaluate_policy(policy, tok, family, **settings), base=None) if evaluate else {}
    base_path, base = ck.get("base_path"), None
    if with_base and ck.get("kind") == "run":
        if base_path and os.path.exists(base_path):
            seen = ((ck.get("seen") or {}).get("ids") or []) if evaluate else []  # the diversity: an evaluation's
            base = frozen_base(base_path, dev) if seen or chain else None
            if evaluate:  # a toy base loaded above serves its evaluation too (a cache miss): loaded once
                load = (lambda p, d: (base,)) if base is not None else hf.load_policy
                out["base"] = base_lib.evaluate_base(base_path, tok, family, dev, load, **settings)
            diversity = eval_lib.run_diversity(seen, base) if seen else None
            if diversity:
                out["diversity"] = diversity
        elif evaluate:
            print(f"warning: {path}: its base policy {base_path!r} is gone; no Base evaluation", file=sys.stderr)
    if chain:
        out["chain"] = show_chain(policy, tok, family, settings, run_label(cfg) if ck.get("kind") == "run" else "policy", base)
    return out


# the settings that make two runs' Base evaluations the same evaluation of the same policy
BASE_KEYS = ("task", "data", "eval_data", "difficulties", "seed", "base_seed", "init", "n_layer", "n_embd", "n_head", "n_kv_head",
             "warm_examples", "warm_steps", "warm_batch", "warm_lr", "warm_pack", "max_new_tokens", "eval_problems",
             "eval_k", "eval_samples", "eval_temperature", "eval_split", "eval_harder")


def _steps(n: int, gaps: bool = False):  # a list of K + n finite numbers (gaps: None where no chain was)
    return lambda v, K: isinstance(v, list) and len(v) == K + n and all(
        (gaps and x is None) or (isinstance(x, (int, float)) and math.isfinite(x)) for x in v)


# eval.json's optional fields, as truncate, comparison_table and eval.summary_table read them
OPTIONAL = dict(by_difficulty=(lambda v, K: isinstance(v, dict) and all(_steps(1)(c, K) for c in v.values()),
                               "an object of K + 1 finite numbers per difficulty"),
                settings=(lambda v, K: isinstance(v, dict) and isinstance(v.get("split", ""), str)
                          and isinstance(v.get("n_samples", 1), int) and v.get("n_samples", 1) >= 1,
                          "an object (split: text, n_samples: a count)"),
                net_corrections=(_steps(1), "K + 1 finite numbers"), turn_acc=(_steps(1), "K + 1 finite numbers"),
                **dict.fromkeys(("fix_rate", "break_rate"), (_steps(0, gaps=True), "K numbers (or nulls)")),
                # a multi-turn family's: an evaluation of the first turn, with these same optional fields
                first_turn=(lambda v, K: isinstance(v, dict) and v.get("K") == K and isinstance(v.get("n"), int)
                            and _steps(1)(v.get("score"), K)
                            and _steps(1)(v.get("solved"), K) and _steps(0)([v.get("delta")], 1) and not bad_field(v, K),
                            "the first turn's evaluation (K, n, K + 1 scores and solved fractions, delta)"))


def bad_field(r: dict, K: int) -> str | None:
    """The first of an evaluation's OPTIONAL fields that fails its check, said in words; None if none does."""
    bad = next((f"{k} is not {what}" for k, (ok, what) in OPTIONAL.items() if k in r and not ok(r[k], K)), None)
    if bad is None and "first_turn" in r and "turn_acc" not in r:  # a multi-turn evaluation has both
        return "turn_acc is missing (a multi-turn evaluation has it beside first_turn)"
    return bad


def check_fields(ev: dict, path: str) -> dict:
    """eval.json's optional fields (OPTIONAL), past what eval.check_evaluation checks, or a ValueError naming the field."""
    for name in ("policy", "base"):
        r = ev.get(name) if isinstance(ev.get(name), dict) else {}
        bad = bad_field(r, r.get("K"))
        if bad:
            raise ValueError(f"{path}: the {name}'s {bad}; delete it, or pass --recompute to evaluate again")
    return ev


def load_run(path: str, recompute: bool = False, task: str | None = None, K: int | None = None,
             n_problems: int | None = None, n_samples: int | None = None, device: str = "auto",
             temperature: float | None = None, split: str | None = None) -> dict:
    """One run for the comparison: {path, method, seed, task, base_key, policy, base, log, diversity, chain}
    (chain: the path of its improvement chain as text, or None).

    `path` is a run folder or a checkpoint file. Its eval.json (for a loose checkpoint file
    X.pt: X.eval.json) is used as it is; only when there is none, or with recompute, is the
    checkpoint evaluated, and the result written there for next time. An evaluation at another
    temperature than the run's own goes to eval.T{temperature}.json (split="val": eval.val.json; a larger
    K: eval.K{K}.json, where a smaller K reads the run's own, cut short), so eval.json stays the run's.
    `method` is the row the run joins: its method, with a suffix for a control setting (run_label:
    exit-kappa0, exit-fifo, exit-blind)."""
    if os.path.isfile(path) and os.path.basename(path) == "ckpt.pt":
        path = os.path.dirname(path) or "."  # a run's own checkpoint: the run folder says more
    if os.path.isdir(path):
        ev_file, ck_file = os.path.join(path, "eval.json"), os.path.join(path, "ckpt.pt")
        if not os.path.isfile(ev_file) and not os.path.isfile(ck_file):
            raise FileNotFoundError(f"{path} has neither eval.json nor ckpt.pt: is it a run folder (exit.py --out_dir)?")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{path} has no config.json, so its method is unknown")
        cfg = hf.read_json(cfg_file)
        bad = next((f"{k} is not {what}" for k, (typ, what) in CONFIG_TYPES.items()
                    if k in cfg and not isinstance(cfg[k], typ)), None)
        if bad:
            raise ValueError(f"{cfg_file}: {bad}")
        method, log = run_label(cfg), runs_lib.read_log(path)
    elif os.path.isfile(path):
        ck = model_lib.load_checkpoint(path)
        cfg = ck.get("config") or {"task": task or _task_from_name(path)}
        method = run_label(cfg) if ck.get("kind") == "run" else "base"
        ev_file, ck_file, log = os.path.splitext(path)[0] + ".eval.json", path, []
    else:
        raise FileNotFoundError(f"no run folder or checkpoint at {path}")

    # an evaluation with other settings than the run's own goes to a file of its own (eval.T0.json,
    # eval.K4.n50.json, ...): the run's eval.json is only ever replaced by the same evaluation
    own = eval_lib.eval_settings({**RUN_DEFAULTS, **cfg})
    asked = dict(K=K, n=n_problems, s=n_samples, T=temperature)
    mine = dict(K=own["K"], n=own["n_problems"], s=own["n_samples"], T=own["temperature"])

    plain = ev_file

    def named(keys):  # the file of an evaluation at these of the asked settings (the others the run's own)
        tags = [split] if split is not None and split != own["split"] else []
        tags += [f"{k}{v:g}" for k, v in asked.items() if k in keys and v is not None and v != mine[k]]
        return f"{plain[:-len('.json')]}.{'.'.join(tags)}.json" if tags else plain

    def stored(path):  # the evaluation in path; None if there is none, or with recompute
        return check_fields(eval_lib.check_evaluation(hf.read_json(path), path), path) \
            if os.path.isfile(path) and not recompute else None
    # a smaller K reads the evaluation at the run's K, cut short (exactly); a larger one (or one an older, shorter
    # file lacks) is a file of its own
    ev_file = named("nsT")
    ev = stored(ev_file)
    if K is not None and (ev is None or K > ev["policy"]["K"]):
        ev_file = named("KnsT")
        ev = stored(ev_file)
        if ev is not None and K > ev["policy"]["K"]:
            raise ValueError(f"{ev_file} has K = {ev['policy']['K']} < --k={K}; pass --recompute to evaluate again")
    else:
        asked["K"] = None
    # its improvement chain (show_chain) beside it: chain.txt beside eval.json, X.chain.txt beside X.json
    chain_file = os.path.join(os.path.dirname(ev_file), "chain.txt") if os.path.basename(ev_file) == "eval.json" \
        else ev_file[:-len(".json")] + ".chain.txt"
    if ev is None:
        if not os.path.isfile(ck_file):
            raise FileNotFoundError(f"{path}: no ckpt.pt to evaluate")
        # a run folder is locked while its run is live: never evaluate a checkpoint that is being replaced
        with runs_lib.run_lock(path) if os.path.isdir(path) else contextlib.nullcontext():
            print(f"evaluating {ck_file} ...", flush=True)
            ev = evaluate_checkpoint(ck_file, task=task, K=K, n_problems=n_problems, n_samples=n_samples,
                                     device=device, temperature=temperature, split=split, chain=True)
            text = ev.pop("chain")
            if text:  # before eval.json, whose presence says the evaluation is done
                hf.write_text(text + "\n", chain_file)
            hf.write_json(ev, ev_file)
    # unset and off settings are left out, so runs from before a setting existed still share their base;
    # runs from before --base_seed trained a base per seed (base_seed -1)
    cfg = {"base_seed": -1, **cfg}
    family = tasks_lib.FAMILIES.get(cfg.get("task"))
    if cfg.get("difficulties") and family and not family.reads_data and tuple(family.train_difficulties) == \
            tasks_lib.parse_difficulties(cfg["difficulties"], cfg["task"]):  # its own mix, named: the same base (base.py)
        cfg["difficulties"] = ""
    base_key = json.dumps({k: cfg.get(k) for k in BASE_KEYS if cfg.get(k) is not None and cfg.get(k) != "" and cfg.get(k) is not False},
                          sort_keys=True)  # not `in (None, "", False)`: 0 == False, and T = 0 is not T = 1
    if method == "base":
        base_key = os.path.abspath(path)
    ckpt = ck_file if os.path.isfile(ck_file) else None
    # a chain older than the checkpoint is of an earlier state of the run (--resume extended it): drawn again
    fresh = os.path.isfile(chain_file) and (ckpt is None or os.path.getmtime(chain_file) >= os.path.getmtime(ckpt))
    return dict(path=path, method=method, seed=cfg.get("seed", 0), task=cfg.get("task"), base_key=base_key, settings=cfg,
                eval_k=cfg.get("eval_k"),  # the K of its --eval_every points (heldout_kK)
                bonus=bonus_form({"method": method, **cfg}),
                policy=ev["policy"], base=ev.get("base"), log=log, diversity=ev.get("diversity"),
                chain=chain_file if fresh else None, chain_file=chain_file, ckpt=ckpt,
                # what draws its chain (compare) at the settings of the evaluation beside it: K only when its file says K
                chain_kw=dict(task=task, K=asked["K"], n_problems=n_problems, n_samples=n_samples, device=device,
                              temperature=temperature, split=split))


LABELS = {"base": "Base", "grpo": "GRPO", "curriculum": "Curriculum", "improve": "Improve",
          "diverge": "Diverge", "exit": "ExIt (full)",  # the ladder's order (exit.METHODS, the paper's §5.2)
          "improve-kappa0": "Improve, κ = 0", "improve-fifo": "Improve, FIFO",  # the curriculum's controls
          "exit-kappa0": "ExIt, κ = 0", "exit-fifo": "ExIt, FIFO",  # (CONTROLS), not the paper's rungs
          "improve-blind": "Improve, FIFO + κ = 0", "exit-blind": "ExIt, FIFO + κ = 0",  # (BLIND)
          "exit-minmax": "ExIt, Eq. 6 min-max", "exit-mean": "ExIt, Eq. 6 mean"}  # other forms of Eq. 6 (run_label)


# Two controls that ask what the learnability curriculum adds (METHOD.md), on Improve (the steadiest
# rung) and on full ExIt: the same buffer sampled uniformly (κ = 0), and admission blind to learnability
# (the oldest entry leaves, not the least learnable). A run is in a control's row when its config has
# that setting (run_label).
CONTROLS = {f"{m}-{name}": (m, setting) for m in ("improve", "exit")
            for name, setting in (("kappa0", dict(kappa=0.0)), ("fifo", dict(admission="fifo")))}
# Both halves off at once: a buffer of the newest children, sampled uniformly (RESULTS.md, the moonshot).
# Each half alone may be covered by the other; this one is blind to learnability. Not in the ladder.
BLIND = {f"{m}-blind": (m, dict(kappa=0.0, admission="fifo")) for m in ("improve", "exit")}


def run_label(cfg: dict) -> str:
    """The comparison row of a run: its method, or the control it is (CONTROLS) when it has a control's setting."""
    method = cfg.get("method", "?")
    for name, (m, setting) in (BLIND | CONTROLS).items():  # BLIND first: it has both controls' settings
        if m == method and all(cfg.get(k, RUN_DEFAULTS[k]) == v for k, v in setting.items()):
            return name
    if method == "exit" and _eq6(cfg)[0]:  # another form of Eq. 6: a row of its own
        return f"exit-{_eq6(cfg)[0]}"
    return method


CURVE_KEYS = ("reward_base", "reward_improve", "reward_diverge", "zero_var_frac",   # training
              "depth", "difficulty", "buf_score_mean", "buf_distinct",              # the curriculum
              "turn", "ref_calls", "malformed_frac", "buf_depth",                   # multi-turn (Fig. 6)
              "heldout_k0", "heldout_kK")                                           # exit.py --eval_every


SIGNAL_KEYS = ("zero_var_frac", "buf_score_mean", "buf_entropy", "buf_measured")  # what the curriculum trains on
LAST = 100  # signals: the mean over a run's last LAST iterations


def signals(log) -> dict | None:
    """A run's training signals (SIGNAL_KEYS), each the mean over its last LAST iterations where logged."""
    if not log:
        return None
    last = [e for e in log if e["iter"] > log[-1]["iter"] - LAST]
    vals = {k: [e[k] for e in last if e.get(k) is not None] for k in SIGNAL_KEYS}
    return {k: float(np.mean(v)) for k, v in vals.items() if v}


def mean_std(values) -> list[float]:
    """[mean, sample std (n - 1)] over runs; the std of a single run is 0, not NaN."""
    v = np.asarray(values, dtype=float)
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def _mean_curve(logs: list[list[dict]], key: str) -> list:
    """Per iteration, the mean over runs of log[key] (None where a run did not log it, e.g. no
    improve steps yet); runs of different lengths are cut to the shortest."""
    T = min(len(log) for log in logs)
    v = np.array([[np.nan if log[t].get(key) is None else log[t][key] for t in range(T)] for log in logs], float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (nothing logged) has mean NaN: fine
        m = np.nanmean(v, axis=0) if T else np.zeros(0)
    return [None if np.isnan(x) else float(x) for x in m]


# what a run's config says of where and how it ran and was evaluated, not of what it trained: runs that differ only in
# these (and the seed) are one experiment's
NOT_THE_EXPERIMENT = {"seed", "out_dir", "resume", "device", "log_every", "show_every", "ckpt_every", "base_dir",
                      "micro_batch", "grad_checkpoint",
                      *(f.name for f in dataclasses.fields(runs_lib.Config) if f.name.startswith("eval_"))}


LABEL_SETTINGS = {"method", "kappa", "admission", "div_minmax", "div_clip", "div_mean"}  # what run_label names


def split_by_settings(runs: list[dict]) -> list[dict]:
    """Runs that trained with settings another run of the table does not share (any but the seed and
    NOT_THE_EXPERIMENT's; across rows, also but those run_label names) are named by them where they are not the
    defaults ("exit, beta=0.001"), so a row is one experiment. Pooled, two experiments would be averaged, and their
    repeated (base, seed) pairs would drop every paired comparison; across rows, a difference would go unsaid."""
    defaults = {f.name: f.default for f in dataclasses.fields(runs_lib.Config)}
    value = lambda r, k: (r.get("settings") or {}).get(k, defaults[k])
    differ = lambda rs, k: len({json.dumps(value(r, k)) for r in rs}) > 1
    trained = [r for r in runs if r["method"] != "base"]
    keys = [k for k in defaults if k not in NOT_THE_EXPERIMENT]
    across = {k for k in keys if k not in LABEL_SETTINGS and differ(trained, k)}
    within = {m: {k for k in keys if differ([r for r in trained if r["method"] == m], k)}
              for m in {r["method"] for r in trained}}
    out = []
    for r in runs:
        own = "".join(f", {k}={value(r, k)}" for k in keys
                      if (k in across or k in within.get(r["method"], ())) and value(r, k) != defaults[k])
        out.append(dict(r, method=r["method"] + own) if own and r["method"] != "base" else r)
    return out


def row_label(method: str) -> str:
    """A row's name in tables and plots: LABELS', with the settings split_by_settings named after it."""
    m, _, settings = method.partition(", ")
    return LABELS.get(m, m.replace("exit-cap", "ExIt, Eq. 6 cap ")) + (f", {settings}" if settings else "")


def comparison_table(runs: list[dict], K: int | None = None) -> dict:
    """Group runs by method, Base from the runs' base evaluations (one per distinct base), and
    give each row mean ± std over its runs of score(0), score(K), Δ_K, plus the mean ± std curves
    of score and net corrections vs k and the mean training curves, so plots need nothing else.
    K defaults to the smallest K among the runs (longer evaluations are truncated, exactly)."""
    families = sorted({r["task"] for r in runs if r.get("task")})
    if len(families) > 1:
        raise ValueError(f"these runs are of different task families ({', '.join(families)}), each with its own "
                         "held-out problems: compare the runs of one family at a time")
    runs = split_by_settings(runs)
    groups, logs, divs, seen, pairs, heldout, bonus, sig = {}, {}, {}, set(), {}, {}, {}, {}
    for r in runs:
        if r["method"] != "base":
            groups.setdefault(r["method"], []).append(r["policy"])
            divs.setdefault(r["method"], []).append(r.get("diversity"))
            pairs.setdefault(r["method"], []).append([r["base_key"], r["seed"]])  # runs with one base and seed pair up
            heldout.setdefault(r["method"], []).append(heldout_points(r.get("log")))
            sig.setdefault(r["method"], []).append(signals(r.get("log")))
            if r.get("bonus"):
                bonus.setdefault(r["method"], set()).add(r["bonus"])
            if r.get("log"):
                logs.setdefault(r["method"], []).append(r["log"])
        base = r["policy"] if r["method"] == "base" else r.get("base")
        if base is not None and r["base_key"] not in seen:  # runs of one seed share one base: count it once
            seen.add(r["base_key"])
            groups.setdefault("base", []).append(base)
    if not groups:
        raise ValueError("no evaluations to compare")
    # evaluations from before the validation split existed are on the old test fifth: other problems
    splits = {x.get("settings", {}).get("split", "the old test fifth") for rs in groups.values() for x in rs}
    if len(splits) > 1:
        raise ValueError(f"these evaluations are on different held-out splits ({', '.join(sorted(splits))}): compare "
                         "runs evaluated on one split (python eval.py RUNS --recompute evaluates them again)")
    K = min(res["K"] for rs in groups.values() for res in rs) if K is None else K
    order = [m for m in LABELS if m in groups] + sorted(set(groups) - set(LABELS))
    rows = []
    # a multi-turn family's main metric is its first turn's accuracy, as the paper's Table 1 reports tool use;
    # the episode's return (its Fig. 3) goes beside it
    multi_turn = all("first_turn" in x for rs in groups.values() for x in rs)
    for m in order:
        whole = [truncate(x, K) for x in groups[m]]
        res = [x["first_turn"] for x in whole] if multi_turn else whole
        score = np.array([x["score"] for x in res])  # (runs, K + 1)
        row = dict(method=m, label=row_label(m), runs=len(res), n=[x["n"] for x in res],
                   problems=[x["n"] // x.get("settings", {}).get("n_samples", 1) for x in whole],  # chains / chains per problem
                   k0=mean_std(score[:, 0]), kK=mean_std(score[:, K]), delta=mean_std(score[:, K] - score[:, 0]),
                   score_mean=score.mean(0).tolist(), score_std=[mean_std(c)[1] for c in score.T],
                   score_runs=score.tolist())
        if all("net_corrections" in x for x in res):  # binary families only
            net = np.array([x["net_corrections"] for x in res])
            row.update(net_mean=net.mean(0).tolist(), net_std=[mean_std(c)[1] for c in net.T])
        if multi_turn:
            ret = np.array([x["score"] for x in whole])
            row["return"] = dict(k0=mean_std(ret[:, 0]), kK=mean_std(ret[:, K]), delta=mean_std(ret[:, K] - ret[:, 0]))
        if m in pairs:
            row.update(pairs=pairs[m], heldout_runs=heldout[m], signals_runs=sig[m])
            got = [x for x in sig[m] if x]
            if got:  # of the runs with a log.jsonl (a per-run copy of a result may have none)
                row["signals"] = {k: mean_std([x[k] for x in got if k in x]) for k in SIGNAL_KEYS if any(k in x for x in got)}
                row["signals_of"] = len(got)
        if m in bonus:  # which form of Eq. 6 the row's runs used
            row["bonus"] = ", ".join(sorted(bonus[m]))
        if m in logs:
            row["curves"] = {k: _mean_curve(logs[m], k) for k in CURVE_KEYS}
        if divs.get(m) and all(divs[m]):  # task diversity of the instances trained on (the paper's Tables 2, 7)
            row["diversity"] = {k: mean_std([d[k] for d in divs[m]]) for k in ("cosine", "l2")}
        rows.append(row)
    efficiency(rows)
    tasks = sorted({r["task"] for r in runs if r.get("task")})
    curve_k = sorted({r.get("eval_k") for r in runs if heldout_points(r.get("log"))} - {None})  # not --k: the runs'
    table = dict(K=K, task=",".join(tasks) or "?", metric="first-turn accuracy" if multi_turn else "score",
                 split=splits.pop(),
                 rows=rows, runs=[os.path.abspath(r["path"]) for r in runs], curve_K="/".join(map(str, curve_k)))
    table.update(paired=paired_differences(table), budget=budget_matched(table))
    return table


def heldout_points(log) -> list | None:
    """A run's held-out k = 0 curve (exit.py --eval_every) as [iteration, base tasks drawn so far (in
    batches: the sum of 1 - replay_frac), score]; None without one."""
    points, tasks = [], 0.0
    for rec in log or []:
        tasks += 1.0 - (rec.get("replay_frac") or 0.0)
        if rec.get("heldout_k0") is not None:
            points.append([rec["iter"], tasks, rec["heldout_k0"]])
    return points or None


def _eq6(cfg: dict) -> tuple[str, str]:
    """The form of Eq. 6 in a run's config (exit.py's div_* settings): (row suffix, "" as printed; description)."""
    if cfg.get("div_minmax"):
        return "minmax", "min-max"
    if cfg.get("div_mean"):
        return "mean", "mean-normalised"
    if cfg.get("div_clip"):
        return f"cap{cfg['div_clip']:g}", f"capped at {cfg['div_clip']:g}"
    return "", "as printed"


def bonus_form(cfg: dict) -> str | None:
    """The form of Eq. 6 a run of full ExIt used; None for other methods."""
    return _eq6(cfg)[1] if cfg.get("method") == "exit" else None


def efficiency(rows: list[dict]):
    """Sample efficiency from the held-out curves (exit.py --eval_every), against the strongest bars:
    for each row, the fraction of its iterations its mean curve over seeds needs to first reach
    Improve's final held-out score at k = K (iters_to_improve_kK) and GRPO's best at k = 0
    (iters_to_grpo_best_k0); None where it never does, absent where a row or the bar has no curve."""
    curve = lambda r, key: [(t + 1, v) for t, v in enumerate(r.get("curves", {}).get(key) or []) if v is not None]
    bars = dict(iters_to_improve_kK=("improve", "heldout_kK", lambda c: c[-1][1]),
                iters_to_grpo_best_k0=("grpo", "heldout_k0", lambda c: max(v for _, v in c)))
    for name, (method, key, bar) in bars.items():
        ref = next((curve(r, key) for r in rows if r["method"] == method), [])
        if not ref:
            continue
        target = bar(ref)
        for r in rows:
            mine = curve(r, key)
            if mine:
                reached = [t for t, v in mine if v >= target]
                r[name] = reached[0] / len(r["curves"][key]) if reached else None  # of the run's iterations


# The comparisons that answer the paper's claims and the curriculum's controls: (a, b) gives a - b.
PAIRED = (("exit", "grpo"), ("exit", "improve"), ("diverge", "improve"), ("exit", "diverge"),
          ("improve", "improve-fifo"), ("improve", "improve-kappa0"), ("exit", "exit-fifo"), ("exit", "exit-kappa0"),
          ("improve", "improve-blind"), ("exit", "exit-blind"))


def paired_differences(table: dict) -> list[dict]:
    """For each PAIRED comparison (each other form of Eq. 6 against full ExIt, each row of other settings against its
    row at the defaults), the mean over its pairs of the difference a - b at k = 0 and k = K, with
    its standard error (std of the differences, n - 1, over sqrt(n)). A pair is two runs with one base and
    one RL seed, so the base's quality and the seed's luck cancel; comparisons with < 2 pairs are left out."""
    rows, out = {r["method"]: r for r in table["rows"]}, []
    forms = [(m, "exit") for m in rows  # Eq. 6's other forms (a control's row, or one of other settings, is none)
             if m.startswith("exit-") and ", " not in m and m not in CONTROLS | BLIND]
    variants = [(m, m.partition(", ")[0]) for m in rows if ", " in m]  # split_by_settings' rows, against their own
    for a, b in (*PAIRED, *forms, *variants):
        if a not in rows or b not in rows:
            continue
        keys_a, keys_b = ([tuple(p) for p in rows[m].get("pairs", [])] for m in (a, b))
        where_b = {p: j for j, p in enumerate(keys_b) if keys_b.count(p) == 1}  # a repeated key pairs with nothing
        common = [(i, where_b[p]) for i, p in enumerate(keys_a) if p in where_b and keys_a.count(p) == 1]
        if len(common) < 2:
            continue
        res = dict(a=a, b=b, n=len(common))
        se = lambda d: [float(np.mean(d)), float(np.std(d, ddof=1) / np.sqrt(len(d)))]
        for name, col in (("k0", 0), ("kK", table["K"])):
            res[name] = se([rows[a]["score_runs"][i][col] - rows[b]["score_runs"][j][col] for i, j in common])
        sig_a, sig_b = rows[a].get("signals_runs"), rows[b].get("signals_runs")
        zv = [((sig_a[i] or {}).get("zero_var_frac"), (sig_b[j] or {}).get("zero_var_frac")) for i, j in common] \
            if sig_a and sig_b else []
        if zv and all(None not in p for p in zv):  # the share of flat groups (no gradient) over the last LAST iterations
            res["zero_var"] = se([x - y for x, y in zv])
        out.append(res)
    return out


def budget_matched(table: dict) -> dict | None:
    """Claim 2 at an equal number of base tasks (RESULTS.md): ExIt draws a fresh base task only when it
    does not replay (1 - replay_frac of a batch), GRPO always. Per seed, ExIt's last held-out k = 0 point
    against GRPO's held-out k = 0 at the iteration where GRPO has drawn as many base tasks (linear between
    its curve's points) and at the same iteration; mean ± standard error of the paired differences."""
    rows = {r["method"]: r for r in table["rows"]}
    if "exit" not in rows or "grpo" not in rows:
        return None
    keys = {m: [tuple(p) for p in rows[m].get("pairs", [])] for m in ("exit", "grpo")}
    # a repeated key pairs with nothing, as in paired_differences
    grpo = {p: h for p, h in zip(keys["grpo"], rows["grpo"].get("heldout_runs", [])) if h and keys["grpo"].count(p) == 1}
    equal_tasks, equal_iters, fresh = [], [], []
    for p, h in zip(keys["exit"], rows["exit"].get("heldout_runs", [])):
        g = grpo.get(p) if keys["exit"].count(p) == 1 else None
        if not h or not g:
            continue
        (t, tasks, v), gt, gv = h[-1], [x[0] for x in g], [x[2] for x in g]
        if tasks < gt[0] or t > gt[-1]:
            continue  # outside GRPO's curve: no extrapolation
        equal_tasks.append(v - float(np.interp(tasks, gt, gv)))
        equal_iters.append(v - float(np.interp(t, gt, gv)))
        fresh.append(tasks / t)
    if len(equal_tasks) < 2:
        return None
    ms = lambda d: [float(np.mean(d)), float(np.std(d, ddof=1) / np.sqrt(len(d)))]
    return dict(n=len(equal_tasks), equal_base_tasks=ms(equal_tasks), equal_iterations=ms(equal_iters),
                fresh_frac=float(np.mean(fresh)))


def format_table(table: dict) -> str:
    """The table as text, scores in % like the paper's Table 1."""
    K, metric = table["K"], table.get("metric", "score")
    pct = lambda ms, sign="": f"{100 * ms[0]:{sign}5.1f} ± {100 * ms[1]:4.1f}"
    w = max([12] + [len(r["label"]) for r in table["rows"]])
    cols = lambda name: f"  {name + ' k = 0':>12}  {f'k = {K}':>12}  {f'Δ{K}':>12}"
    split = table.get("split")  # comparisons saved before it was recorded have none
    split = f" ({dict(val='validation').get(split, split)} split)" if split in ("test", "val") \
        else f" ({split})" if split else ""
    lines = [f"held-out {table['task']}{split}, K = {K}: {metric} in % (mean ± std over runs)"
             + ("; the episode's return beside it" if any("return" in r for r in table["rows"]) else ""),
             f"{'method':<{w}} {'runs':>4}" + cols("") + (cols("return") if any("return" in r for r in table["rows"]) else "")]
    for r in table["rows"]:
        line = f"{r['label']:<{w}} {r['runs']:>4}  {pct(r['k0']):>12}  {pct(r['kK']):>12}  {pct(r['delta'], '+'):>12}"
        if "return" in r:
            ret = r["return"]
            line += f"  {pct(ret['k0']):>12}  {pct(ret['kK']):>12}  {pct(ret['delta'], '+'):>12}"
        lines.append(line)
    main = [r for r in table["rows"] if r["method"] != "base" and r.get("problems")]  # tables from before: no count
    if main:  # the noise of one run's score from the finite held-out set, beside the std over runs
        p, n = np.mean([r["kK"][0] for r in main]), min(min(r["problems"]) for r in main)
        lines.append(f"one run's standard error from its {n} held-out problems at k = {K}: ±{100 * np.sqrt(p * (1 - p) / n):.1f} "
                     f"points (binomial, at the rows' mean {100 * p:.1f}%; chains of one problem are not independent, so the "
                     "problems, not the chains, are counted)")
    div = [r for r in table["rows"] if "diversity" in r]
    if div:
        lines.append("task diversity of the instances trained on (mean pairwise distance of their embeddings by the frozen "
                     "base policy; the paper's Tables 2, 7): "
                     + "; ".join(f"{r['label']} cosine {r['diversity']['cosine'][0]:.4f} ± {r['diversity']['cosine'][1]:.4f}, "
                                 f"L2 {r['diversity']['l2'][0]:.3f} ± {r['diversity']['l2'][1]:.3f}" for r in div))
    sig = [r for r in table["rows"] if r.get("signals")]
    if sig:
        of = lambda r: f" ({r['signals_of']} of its {r['runs']} runs have a log)" \
            if r.get("signals_of", r["runs"]) < r["runs"] else ""
        lines.append(f"training signals over the last {LAST} iterations (mean over runs): "
                     + "; ".join(f"{r['label']}{of(r)} " + ", ".join(f"{k} {v[0]:.3f}" for k, v in r["signals"].items())
                                 for r in sig))
    bonus = [f"{r['label']}: Eq. 6 {r['bonus']}" for r in table["rows"] if r.get("bonus")]
    if bonus:
        lines.append("diversity bonus: " + "; ".join(bonus))
    for key, what in (("iters_to_improve_kK", f"Improve's final held-out k = {table.get('curve_K') or K} score"),
                      ("iters_to_grpo_best_k0", "GRPO's best held-out k = 0 score")):
        eff = [(r["label"], r[key]) for r in table["rows"] if key in r]
        if eff:  # exit.py --eval_every: held-out curves during training
            lines.append(f"fraction of its iterations a row needs to reach {what} (mean curves over seeds): "
                         + ", ".join(f"{m} {'not reached' if f is None else f'{f:.2f}'}" for m, f in eff))
    labels = {r["method"]: r["label"] for r in table["rows"]}
    if table.get("paired"):
        name = lambda d: f"{labels[d['a']]} - {labels[d['b']]}"
        w = max([34] + [len(name(d)) for d in table["paired"]])
        lines.append(f"paired differences (runs with one base and one RL seed; mean ± standard error over the pairs, in "
                     f"points; * beyond 2 s.e.; zero_var_frac over the last {LAST} iterations, in points too):\n"
                     f"{'':<{w}} {'pairs':>5}  {'k = 0':>13}  {f'k = {K}':>13}  {'zero_var_frac':>13}")
        star = lambda ms: "*" if abs(ms[0]) > 2 * ms[1] else " "
        for d in table["paired"]:
            lines.append(f"{name(d):<{w}} {d['n']:>5}  "
                         + "  ".join(f"{100 * d[k][0]:+6.1f} ± {100 * d[k][1]:3.1f}{star(d[k])}" for k in ("k0", "kK", "zero_var")
                                     if k in d))
    b = table.get("budget")
    if b:
        lines.append(f"claim 2 on the held-out curves, ExIt's last k = 0 minus GRPO's ({b['n']} pairs; ExIt drew a fresh base "
                     f"task in {100 * b['fresh_frac']:.0f}% of its batch slots; mean ± standard error over the pairs): "
                     f"at equal iterations "
                     f"{100 * b['equal_iterations'][0]:+.1f} ± {100 * b['equal_iterations'][1]:.1f}, at an equal number of "
                     f"base tasks {100 * b['equal_base_tasks'][0]:+.1f} ± {100 * b['equal_base_tasks'][1]:.1f} points")
    return "\n".join(lines)


def smooth(y, window: int) -> np.ndarray:
    """Moving average over the last `window` iterations that skips missing values (NaN)."""
    y = np.array([np.nan if v is None else v for v in y], dtype=float)
    ok = ~np.isnan(y)
    c = np.concatenate([[0], np.cumsum(np.where(ok, y, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(len(y)) + 1 - window, 0)
    hi = np.arange(len(y)) + 1
    cnt = n[hi] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (c[hi] - c[lo]) / np.maximum(cnt, 1), np.nan)


def _style(method: str) -> dict:
    """A row's line in every plot: its own colour; a control (CONTROLS, BLIND) its rung's colour, dotted (κ = 0),
    dash-dotted (FIFO) or dashed (both)."""
    if method in CONTROLS | BLIND:
        rung, setting = (CONTROLS | BLIND)[method]
        return dict(color=_style(rung)["color"], linestyle="--" if len(setting) > 1 else ":" if "kappa" in setting else "-.")
    names = [m for m in LABELS if m not in CONTROLS | BLIND]
    return dict(color=f"C{names.index(method) if method in names else len(names)}", linestyle="-")


def _plot_vs_k(fig, table, mean_key, std_key, ylabel, title, scale=100.0, runs_key=None):
    """Mean over runs with a ± std band; with runs_key, each run also as a thin line (seeds can differ
    so much that the band alone hides what happened)."""
    ax = fig.add_subplot(1, 1, 1)
    for r in table["rows"]:
        if mean_key not in r:
            continue
        m, s, k = scale * np.array(r[mean_key]), scale * np.array(r[std_key]), np.arange(len(r[mean_key]))
        st, single = _style(r["method"]), r.get(runs_key) if runs_key else None
        ax.plot(k, m, marker=".", **st, label=f"{r['label']} (n={r['runs']})")
        if single and len(single) > 1:
            for y in single:
                ax.plot(k, scale * np.array(y)[:len(k)], **st, lw=0.7, alpha=0.45)
        ax.fill_between(k, m - s, m + s, color=st["color"], alpha=0.08 if single else 0.15)
    ax.set(xlabel="improve step k", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_curves(fig, table, keys, titles, window):
    axes = []
    for i, (key, title) in enumerate(zip(keys, titles)):
        ax = fig.add_subplot(2, 2, i + 1)
        for r in table["rows"]:
            y = r.get("curves", {}).get(key)
            if y and any(v is not None for v in y):
                ax.plot(np.arange(1, len(y) + 1), smooth(y, window), **_style(r["method"]), label=r["label"])
        ax.set(xlabel="RL iteration", title=title)
        ax.grid(alpha=0.3)
        axes.append(ax)
    # one legend, in the panel that draws the most rows: a row absent from the first (GRPO replays nothing) is named too
    fullest = max(axes, key=lambda a: len(a.lines))
    if fullest.lines:
        fullest.legend(fontsize=7)


def _plot_heldout(fig, table):
    """The held-out curves of exit.py --eval_every, k = 0 and k = K side by side, mean over each row's runs."""
    for i, (key, k) in enumerate((("heldout_k0", 0), ("heldout_kK", table.get("curve_K") or table["K"]))):
        ax = fig.add_subplot(1, 2, i + 1)
        for r in table["rows"]:
            pts = [(t + 1, 100 * v) for t, v in enumerate(r.get("curves", {}).get(key) or []) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", **_style(r["method"]), label=r["label"])
        ax.set(xlabel="RL iteration", ylabel=f"held-out {table.get('metric', 'score')} (%)" if i == 0 else None,
               title=f"{table['task']}, held-out slice: k = {k}")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_table(table: dict, out: str, window: int | None = None) -> list[str] | None:
    """PNG plots of a comparison in `out`; None (and nothing written) without matplotlib.
    Training curves are smoothed over `window` iterations (default: 1/25 of the run)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if window is None:
        T = max((len(c) for r in table["rows"] for c in r.get("curves", {}).values()), default=0)
        window = max(1, T // 25)
    os.makedirs(out, exist_ok=True)
    task, paths = table["task"], []

    def save(name, draw, size=(6, 4.5)):
        fig = Figure(figsize=size, layout="constrained")
        draw(fig)
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=110)

    save("accuracy_vs_k.png", lambda f: _plot_vs_k(
        f, table, "score_mean", "score_std", f"held-out {table.get('metric', 'score')} (%)",
        f"{task}: {table.get('metric', 'score')} vs improve steps (mean ± std; thin: single runs)", runs_key="score_runs"))
    if any("net_mean" in r for r in table["rows"]):
        save("net_corrections.png", lambda f: _plot_vs_k(
            f, table, "net_mean", "net_std", "net corrections (% of chains)",
            f"{task}: cumulative (wrong→right) − (right→wrong)"))
    if any("curves" in r for r in table["rows"]):
        save("training.png", lambda f: _plot_curves(
            f, table, CURVE_KEYS[:4], ("reward, base tasks", "reward, improve steps", "reward, diverge steps",
                                       "zero-variance groups (fraction)"), window), size=(9, 6.5))
        save("curriculum.png", lambda f: _plot_curves(
            f, table, CURVE_KEYS[4:8], ("mean depth of sampled instances", "mean difficulty of sampled instances",
                                        "buffer: mean learnability score", "buffer: distinct base tasks"), window),
             size=(9, 6.5))
        if any(any(v is not None for v in r.get("curves", {}).get("heldout_kK", [])) for r in table["rows"]):
            save("heldout.png", lambda f: _plot_heldout(f, table), size=(10, 4.5))
        if any(any(v is not None for v in r.get("curves", {}).get("turn", [])) for r in table["rows"]):
            save("multi_turn.png", lambda f: _plot_curves(
                f, table, CURVE_KEYS[8:12], ("mean starting turn of replayed instances", "reference tool calls of "
                                           "trained episodes", "malformed responses (fraction)",
                                           "buffer: mean depth"), window), size=(9, 6.5))
    return paths


def plot_lineage(log: list[dict], path: str, title: str = "") -> str | None:
    """One run's buffer over training by iteration depth k (k = 0: a base task); None without matplotlib or data."""
    hists = [l.get("buf_depth_hist") for l in log]
    if not any(hists):
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    top = 4  # depths >= top share one band, so a long tail stays readable
    counts = np.zeros((top + 1, len(hists)))
    for i, h in enumerate(hists):
        for d, n in (h or {}).items():
            counts[min(int(d), top), i] += n
    x = np.arange(1, len(hists) + 1)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"k = {d}" for d in range(top)] + [f"k ≥ {top}"]
    ax.stackplot(x, counts, labels=labels, colors=[f"C{d}" for d in range(top + 1)], alpha=0.85)
    ax.set(xlabel="RL iteration", ylabel="buffered task instances",
           title=title or "the curriculum's lineage: buffer by iteration depth")
    ax.legend(loc="upper left", fontsize=8, reverse=True)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def compare(paths: list[str], out: str | None = None, K: int | None = None, overwrite: bool = False,
            **load_kw) -> dict:
    """Load (or evaluate) each run, print the table, write results.json and the plots in `out`
    (default: one run folder: that folder; several: their common parent folder, else runs/compare)."""
    runs = [load_run(p, K=K, **load_kw) for p in paths]
    table = comparison_table(runs, K)
    if out is None and len(runs) == 1 and os.path.isdir(runs[0]["path"]):
        out = runs[0]["path"]  # never the parent, which may hold a comparison of many runs (a ladder's)
    elif out is None:
        parents = [os.path.dirname(os.path.abspath(r["path"])) for r in runs]
        common = os.path.commonpath(parents)
        out = common if common not in (os.path.abspath(os.sep), os.getcwd()) else os.path.join("runs", "compare")
    table = report(table, out, overwrite)
    # the lineage of one run that built a curriculum (the most complete rung first), not of every seed
    order = {m: i for i, m in enumerate(reversed(METHODS))}  # full ExIt first; controls after every rung
    grown = sorted((r for r in runs if r["log"] and any(l.get("buf_depth_hist") for l in r["log"])),
                   key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
    if grown and plot_lineage(grown[0]["log"], os.path.join(out, "lineage.png"),
                              f"lineage of the buffer: {row_label(grown[0]['method'])}, "
                              f"seed {grown[0]['seed']}"):
        print(f"lineage: {os.path.join(out, 'lineage.png')} ({grown[0]['path']})")
    # and what one improvement chain looks like, from the same kind of run: drawn now if it has none yet
    single_turn = lambda r: not getattr(tasks_lib.FAMILIES.get(r["task"]), "multi_turn", False)  # an episode: no line
    shown = sorted((r for r in runs if r.get("chain") or (r.get("ckpt") and single_turn(r))),
                   key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
    if shown and not shown[0]["chain"]:
        r = shown[0]
        try:  # the chain illustrates; a checkpoint that cannot be read again costs it, not the comparison
            with runs_lib.run_lock(r["path"]) if os.path.isdir(r["path"]) else contextlib.nullcontext():
                text = evaluate_checkpoint(r["ckpt"], evaluate=False, chain=True, **r["chain_kw"])["chain"]
            if text:
                hf.write_text(text + "\n", r["chain_file"])
                r["chain"] = r["chain_file"]
        except (ValueError, OSError, RuntimeError) as e:
            print(f"warning: no improvement chain drawn from {r['ckpt']} ({e})", file=sys.stderr)
    if shown and shown[0]["chain"]:
        with open(shown[0]["chain"]) as f:
            print(f"one held-out improvement chain ({shown[0]['chain']}):\n{f.read().rstrip()}")
    return table


def report(table: dict, out: str, overwrite: bool = False) -> dict:
    """Print the table; write results.json and the plots in `out`. A results.json there of other runs
    (another comparison) is never replaced unless overwrite."""
    print(format_table(table))
    old_file = os.path.join(out, "results.json")
    if os.path.isfile(old_file) and not overwrite:
        old = check_table(hf.read_json(old_file), old_file)
        shape = lambda t: t.get("runs") or [(r.get("method"), r.get("runs")) for r in t["rows"]]
        if shape(old) != shape(table):
            raise FileExistsError(f"{old_file} holds a comparison of other runs ({len(old['rows'])} rows); "
                                  "pass --out=DIR to write this one elsewhere, or --overwrite to replace it")
    os.makedirs(out, exist_ok=True)
    hf.write_json(table, os.path.join(out, "results.json"))
    plots = plot_table(table, out)
    print(f"results: {os.path.join(out, 'results.json')}")
    if plots is None:
        print("(no plots: pip install matplotlib to get them)")
    else:
        print("plots: " + ", ".join(plots))
    return table


MINUTES_PER_RUN = 7  # one run at exit.py's defaults with --eval_every=50 on a 2-core CPU (warm start: once per seed)


LADDER_SETS = ("method", "seed", "out_dir", "resume")  # the ladder sets these itself


def start_run(argv: list[str], log: str | None = None, threads: int | None = None) -> subprocess.Popen:
    """`python exit.py ARGS` itself, in a process of its own, so the ladder can never drift from what a
    user runs (and eval.py never imports exit.py, which imports it); its output to `log` when given."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    exe = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit.py"), *argv]
    if not log:
        return subprocess.Popen(exe, env=env)
    with open(log, "a") as out:  # appended: a resumed run keeps the output of its first part
        return subprocess.Popen(exe, env=env, stdout=out, stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen, argv: list[str], log: str | None = None):
    """A failed run stops the ladder; its own one-line error is on stderr (or at the end of its log)."""
    if proc.returncode == 130:  # Ctrl-C: the run saved its checkpoint; the same ladder command continues it
        raise KeyboardInterrupt
    if proc.returncode != 0:
        raise ValueError(f"the run `python exit.py {' '.join(argv)}` failed (exit code {proc.returncode})"
                         + (f"; its output: {log}" if log else ""))


def ladder(overrides: list[str], seeds: int = 5, out: str = "runs/ladder", methods=None, controls: bool = True,
           jobs: int = 1, results: str | None = None) -> dict:
    """Every rung x seeds 0..seeds-1, in out/{method}-s{seed}, and (controls) the CONTROLS of the rungs
    run (Improve's and full ExIt's); then the table and plots in `results` (default: out). Each run also logs a held-out curve (--eval_every=50 unless
    set), from which the table gives the sample efficiency against GRPO.

    A run whose eval.json exists is skipped, and one with only a ckpt.pt (interrupted) is resumed,
    so the same command continues an interrupted ladder. Every run starts from one base, as in the
    paper (--base_seed, default 0: the base shipped in bases/ at the default settings, else one warm
    start, cached under base_dir); --base_seed=-1 gives each seed its own. Base costs nothing extra:
    its row comes from the runs' own base evaluations.

    jobs > 1 runs that many at once, each on one thread (OMP_NUM_THREADS=1) with its output in
    out/{run}.out: on 2 cores, jobs=2 halves the wall time. A base's later runs wait until its first run
    has begun RL (its log.jsonl exists), so its warm start is trained once, not once per job. A CPU run
    is exact for one thread count, so a ladder at jobs=2 (one thread a run) gives other numbers than at
    jobs=1 (the machine's threads): finish a ladder with the --jobs it started with.
    When the ladder stops (an error, Ctrl-C, kill) its running runs finish their iteration, save and stop."""
    rows = [[(m, [f"--method={m}"]) for m in (methods or METHODS)]]
    if controls:
        rows.append([(name, [f"--method={m}", *(f"--{k}={v}" for k, v in setting.items())])
                     for name, (m, setting) in CONTROLS.items() if m in (methods or METHODS)])
    given = {a[2:].partition("=")[0]: a[2:].partition("=")[2] for a in overrides}
    fixed = [k for _, setting in CONTROLS.values() for k in setting if k in given] if controls else []
    if fixed:
        raise ValueError(f"the ladder's controls set --{' --'.join(dict.fromkeys(fixed))} themselves; drop it, or pass "
                         "--no_controls")
    if "eval_every" not in given:
        overrides = [*overrides, "--eval_every=50"]
    clash = [k for k in given if k in LADDER_SETS]
    if clash:
        raise ValueError(f"the ladder sets {', '.join(LADDER_SETS)} itself; drop --{' --'.join(clash)}")
    if given.get("eval_problems", "1").strip() in ("0", "0.0"):
        raise ValueError("the ladder needs the final evaluation: --eval_problems must be > 0")
    # every other setting is checked by exit.py itself, before any work: a bad one stops the first run at once
    # the paper's rungs for every seed first, then the controls: a ladder stopped early has whole rungs
    plan = [(m, args, s, os.path.join(out, f"{m}-s{s}")) for group in rows for s in range(seeds) for m, args in group]
    todo = [p for p in plan if not os.path.isfile(os.path.join(p[3], "eval.json"))]
    print(f"ladder: {sum(map(len, rows))} rows x {seeds} seeds = {len(plan)} runs in {out}; {len(plan) - len(todo)} done, "
          f"{len(todo)} to run (about {MINUTES_PER_RUN} min a run at exit.py's defaults on a 2-core CPU"
          + (f", {jobs} at a time" if jobs > 1 else "") + ")", flush=True)
    for _, _, _, d in todo:
        if not os.path.isfile(os.path.join(d, "ckpt.pt")) and runs_lib.run_artifacts(d):  # stopped before its first checkpoint
            raise ValueError(f"{d} was stopped before its first checkpoint ({', '.join(runs_lib.run_artifacts(d))}, no "
                             f"ckpt.pt): nothing there to resume; delete it (rm -r {d}) and run the same command again")
    os.makedirs(out, exist_ok=True)
    base = (lambda seed: seed) if given.get("base_seed", "").strip() == "-1" else (lambda seed: 0)  # a base per seed, or one
    leader = {}  # base -> the folder of its first run to start: the one that trains the warm start
    t0, running, done = time.time(), [], 0
    try:
        while todo or running:
            for proc, argv, d, log in [r for r in running if r[0].poll() is not None]:
                running.remove((proc, argv, d, log))
                finished(proc, argv, log)
                if not os.path.isfile(os.path.join(d, "eval.json")):
                    raise RuntimeError(f"{d}: the run ended without eval.json")
                done += 1
            ready = [p for p in todo if base(p[2]) not in leader or not any(r[2] == leader[base(p[2])] for r in running)
                     or os.path.isfile(os.path.join(leader[base(p[2])], "log.jsonl"))]
            if ready and len(running) < jobs:
                m, args, s, d = ready[0]
                todo.remove(ready[0])
                leader.setdefault(base(s), d)
                # runs finished per second so far (jobs at a time) x the runs still to finish
                left = f"~{(time.time() - t0) / done * (len(todo) + len(running) + 1) / 60:.0f} min left" if done else ""
                print(f"\n[{len(plan) - len(todo)}/{len(plan)}] {m} seed {s} -> {d}   {left}", flush=True)
                argv = [*overrides, *args, f"--seed={s}", f"--out_dir={d}"]
                argv += ["--resume"] if os.path.isfile(os.path.join(d, "ckpt.pt")) else []
                log = f"{d}.out" if jobs > 1 else None
                running.append((start_run(argv, log, threads=1 if jobs > 1 else None), argv, d, log))
                continue
            time.sleep(1 if jobs > 1 else 0.05)
    finally:  # an error, Ctrl-C or kill: the other runs finish their iteration, save their checkpoint and stop
        for proc, *_ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, *_ in running:
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return compare([d for *_, d in plan], out=results or out, overwrite=True)  # the ladder's own comparison


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python eval.py", allow_abbrev=False,
        description="Compare ExIt runs in the shape of the paper's Table 1 (mean ± std over seeds of the held-out "
                    "score at k = 0 and k = K, and Δ_K), with plots; or run the whole ablation ladder.",
        epilog="examples:\n  python eval.py runs/ladder/*-s*\n  python eval.py runs/exit/ckpt.pt runs/base/math-0123abcd.pt"
               "\n  python eval.py --table runs/ladder/results.json\n  python eval.py --ladder --jobs=2 --results=results/ladder"
               "\n  python eval.py --ladder --seeds=3 --task=math --out=runs/ladder-math --iters=300   (any exit.py "
               "--key=value passes through)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders (exit.py --out_dir) or checkpoint files")
    p.add_argument("--out", metavar="DIR", help="where results.json and the plots go (default: a single run folder "
                   "itself; several runs: their common parent folder, else runs/compare; with --ladder: runs/ladder)")
    p.add_argument("--k", type=int, metavar="K", help="improve steps K (default: the runs' own eval_k; a "
                   "stored evaluation with more steps is cut to K, exactly)")
    p.add_argument("--problems", type=int, metavar="N", help="held-out tasks, when evaluating (default: the run's eval_problems)")
    p.add_argument("--samples", type=int, metavar="N", help="chains per task, when evaluating (default: the run's eval_samples)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="sampling temperature of the evaluation (default: the run's eval_temperature; 0 = greedy); "
                        "results go to eval.T{T}.json beside the run's eval.json")
    p.add_argument("--recompute", action="store_true", help="evaluate again even where eval.json exists (with other "
                   "settings than the run's own, the result goes to eval.{settings}.json, never eval.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a results.json of other runs in --out")
    p.add_argument("--task", help="task family of a checkpoint that records none; with --ladder, exit.py's --task")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument("--table", metavar="FILE", help="reprint a saved results.json (and redraw its plots next to it)")
    p.add_argument("--ladder", action="store_true", help="train and evaluate GRPO / Curriculum / Improve / Diverge / "
                   "ExIt and the curriculum's two controls (κ = 0, FIFO admission) of Improve and ExIt x seeds via exit.py, "
                   "skipping finished runs, then the table and plots")
    p.add_argument("--seeds", type=int, default=5, metavar="N", help="with --ladder: seeds 0..N-1 (default 5)")
    p.add_argument("--no_controls", action="store_true", help="with --ladder: only the paper's rungs, without the "
                   "curriculum's controls (κ = 0: uniform sampling; FIFO admission)")
    p.add_argument("--results", metavar="DIR", help="with --ladder: where its table and plots go (default: its --out)")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="with --ladder: runs at once, one thread each "
                   "(2 on a 2-core CPU halves the time); outputs in OUT/{run}.out (default 1)")
    p.add_argument("--split", choices=("test", "val"), help="held-out split to evaluate on (default: the run's own, "
                   "test); val goes to eval.val.json: choose settings there, report test")
    keys = [a.partition("=")[0] for a in argv if a.startswith("--") and a != "--"]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:  # argparse lets the last one win silently, hiding a typo in a long command line (as exit.py refuses)
        raise ValueError(f"{twice} is given twice; give it once")
    args, extra = p.parse_known_args(argv)
    if extra and not args.ladder:
        p.error(f"unrecognized arguments: {' '.join(extra)} (exit.py settings go with --ladder)")
    bad = [a for a in extra if not a.startswith("--")] + (args.runs if args.ladder else [])
    if bad:  # e.g. "--iters 5": argparse would take the 5 for a RUN
        p.error(f"with --ladder, exit.py settings are written --key=value (no RUN arguments); got {' '.join(bad)}")
    return args, extra


def check_args(args):
    """Bad numbers are errors before anything loads: --temperature=-1 would sample the least likely tokens."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(args.k is None or args.k >= 0, f"--k must be >= 0 (improve steps), got {args.k}")
    need(args.problems is None or args.problems >= 1, f"--problems must be >= 1, got {args.problems}")
    need(args.samples is None or args.samples >= 1, f"--samples must be >= 1, got {args.samples}")
    need(args.temperature is None or (np.isfinite(args.temperature) and args.temperature >= 0),
         f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    need(args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}")
    need(args.jobs >= 1, f"--jobs must be >= 1, got {args.jobs}")
    for name in ("out", "results"):  # "" names no folder: the write at the end would fail after all the work
        need(getattr(args, name) != "", f"--{name} is empty: give a folder, or leave it out for the default")
    if args.device:
        model_lib.pick_device(args.device)


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    try:
        args, extra = parse(sys.argv[1:] if argv is None else argv)
        check_args(args)
        if args.table:
            if os.path.isdir(args.table):  # else open() fails as if a write were refused
                raise ValueError(f"--table={args.table} is a directory, not a results.json table")
            table = check_table(hf.read_json(args.table), args.table)
            print(format_table(table))
            plots = plot_table(table, args.out or os.path.dirname(os.path.abspath(args.table)))
            print("(no plots: pip install matplotlib to get them)" if plots is None else "plots: " + ", ".join(plots))
        elif args.ladder:
            signal.signal(signal.SIGTERM, _stop)  # `kill` of the ladder stops its runs too, as Ctrl-C does
            passed = dict(task=args.task, device=args.device, eval_k=args.k, eval_problems=args.problems,
                          eval_samples=args.samples, eval_temperature=args.temperature, eval_split=args.split)
            overrides = [f"--{k}={v}" for k, v in passed.items() if v is not None] + extra
            ladder(overrides, seeds=args.seeds, out=args.out or os.path.join("runs", "ladder"),
                   controls=not args.no_controls, jobs=args.jobs, results=args.results)
        elif args.runs:
            compare(args.runs, out=args.out, K=args.k, overwrite=args.overwrite, recompute=args.recompute, task=args.task,
                    n_problems=args.problems, n_samples=args.samples, device=args.device or "auto",
                    temperature=args.temperature, split=args.split)
        else:
            print("nothing to do: give run folders, --table FILE or --ladder (see -h)", file=sys.stderr)
            raise SystemExit(2)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:  # the machine refused a write: a read-only folder, a full disk
        why = f"could not write {e.filename} ({e.strerror})" if e.filename else str(e)  # model.atomic_save's names the file
        print(f"error: {why}; nothing else changed", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing half-written (evaluations are written whole, at the end)", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
