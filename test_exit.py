"""
Tests of exit: every file against an independent reference (transformers' models, formulas written
out by hand, the rules METHOD.md states), plus short end-to-end runs of exit.py and eval.py on tiny
policies. Fast on a 2-core CPU; nothing is downloaded (HF_HUB_OFFLINE is set below, before
transformers is imported anywhere).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import ast
import base64
import collections
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import random
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
import torch

from buffer import TaskBuffer, learnability, sampling_probs
import base as base_lib
import buffer
import eval as eval_lib
import exit as exit_lib
import report
import runs
import scale
import hf
import model
import model as model_lib
import tasks
import tasks as tasks_lib
import tokenizer as tokenizer_lib

HERE = os.path.dirname(os.path.abspath(__file__))


# ===============================================================================================
# tasks.py: task families, prompts, rewards, demonstrations, real data
# ===============================================================================================

# Every list of families here is read off the registry, so a newly registered family is tested too.
ALL_FAMILIES = list(tasks.FAMILIES)
# single-turn families with warm-start demonstrations (the toy families)
SYNTHETIC = [n for n, c in tasks.FAMILIES.items() if c.has_demonstrations and not c.multi_turn]
# families whose demonstrated improve step is the two-state chain of tasks.two_state_accuracy
MARKOV = [n for n, c in tasks.FAMILIES.items() if c.has_demonstrations and c.revise is tasks.TaskFamily.revise
          and c.expected_accuracy is tasks.TaskFamily.expected_accuracy]


def family_for_test(name, tmp_path):
    """A registered family, built; realmath reads its problems from a file: a tiny generated one."""
    if name == "realmath":
        path = tmp_path / "tiny.jsonl"
        path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}\n#### {2 * i}"}) + "\n"
                                for i in range(1, 81)))
        return tasks.get_family(name, path=str(path))
    return tasks.get_family(name)


def mathp(request, start, ops):
    """A math problem by hand, its target computed left to right independently of tasks.py."""
    v = start
    for op, x in ops:
        v = {"+": v + x, "-": v - x, "*": v * x}[op]
    return tasks.Problem("m/1", "math", request, len(ops), str(v), {"start": start, "ops": ops})


def subp(numbers, target, best):
    return tasks.Problem("s/1", "subset", " ".join(map(str, numbers)) + f">{target}", len(numbers),
                         "+".join(map(str, best)) + f"={target}", {"numbers": numbers, "target": target, "best": best})


P_MATH = mathp("7+5*2-9", 7, [["+", 5], ["*", 2], ["-", 9]])
P_SUB = subp([3, 9, 14, 22, 31], 40, [9, 31])


def within(actual, expected_sum, var_sum, n, slack=0.0):
    """|mean - expectation| within 4 sigma of a sum of independent Bernoullis."""
    assert n > 100
    assert abs(actual - expected_sum) <= 4 * math.sqrt(var_sum) + slack * n, (actual, expected_sum, var_sum)


# ---------------------------------------------------------------- pure reward functions

def test_graded_step_reward_formulas():
    g = tasks.graded_step_reward
    assert g(0.3, 0.9, "base") == 0.3 and g(0.3, 0.9, "diverge") == 0.3  # base/diverge: r_k itself
    assert g(0.75, 0.5, "improve") == pytest.approx(0.5)                 # (0.75-0.5)/(1-0.5)
    assert g(1.0, 0.2, "improve") == pytest.approx(1.0)
    assert g(0.4, 0.6, "improve") == 0.0                                 # never negative
    assert g(0.6, 0.6, "improve") == 0.0
    assert g(1.0, 1.0, "improve") == 1.0 and g(0.9, 1.0, "improve") == 0.0  # the r_{k-1} = 1 case the paper is silent on
    assert g(0.7, None, "improve") == 0.7
    with pytest.raises(ValueError):
        g(0.5, 0.5, "fix")
    assert tasks.binary_step_reward(1.0) == 1.0 and tasks.binary_step_reward(0.0) == 0.0


def test_two_state_accuracy_markov_chain_by_hand():
    e = tasks.two_state_accuracy
    assert e(0.5, 0.2, 0.3, 0) == 0.5
    assert e(0.5, 0.2, 0.3, 1) == pytest.approx(0.5 * 0.7 + 0.5 * 0.2)       # 0.45
    assert e(0.5, 0.2, 0.3, 2) == pytest.approx(0.45 * 0.7 + 0.55 * 0.2)     # 0.425
    assert e(0.5, 0.2, 0.3, 500) == pytest.approx(0.2 / (0.2 + 0.3))         # the fixed point a*


# ---------------------------------------------------------------- math

def test_math_score_left_to_right_and_final_number_only():
    f = tasks.get_family("math")
    assert P_MATH.target == "15"  # (7+5)*2-9, not 7+10-9
    assert f.score(P_MATH, "7+5=12,12*2=24,24-9=15#15") == 1.0
    assert f.score(P_MATH, "~7+5=12*2=24-9=15#15") == 1.0
    assert f.score(P_MATH, "7+5=12,12*2=24,24-9=15#8") == 0.0      # the last '#' decides
    assert f.score(P_MATH, "#8#15") == 1.0
    assert f.score(P_MATH, "the answer is \\boxed{15}.") == 1.0     # chat form
    assert f.score(P_MATH, "7+5=12,12*2=24,24-9=15") == 0.0         # no separator: malformed
    for junk in ["", "#", "#15.0", "#1 5", "#８", "#١٥", "15", "\x00#\xff", "#" + "9" * 5000, "\\boxed{", None]:
        assert f.score(P_MATH, junk) == 0.0, junk
    for mode in tasks.MODES:  # binary: correctness of the new answer, whatever the mode or the previous one
        assert f.step_reward(P_MATH, "#15", mode, "#15") == 1.0
        assert f.step_reward(P_MATH, "#14", mode, "#15") == 0.0
        assert f.step_reward(P_MATH, "#15", mode, None) == 1.0
    assert f.feedback(P_MATH, "#15") is None and not f.graded and not f.has_feedback
    assert f.solution_text("7+5=12,12*2=24,24-9=15#15") == "7+5=12,12*2=24,24-9=15"


def test_math_problems_stay_in_range_and_match_their_request():
    f = tasks.get_family("math")
    for p in f.sample("train", 300, 3) + f.sample("test", 100, 3, difficulty=6):
        v = int(p.request[:len(str(p.data["start"]))])
        for op, x in p.data["ops"]:
            v = {"+": v + x, "-": v - x, "*": v * x}[op]
            assert 0 <= v <= 99
        assert str(v) == p.target and len(p.data["ops"]) == p.difficulty
        assert p.request == str(p.data["start"]) + "".join(f"{o}{x}" for o, x in p.data["ops"])
        assert f.score(p, f.solve(p, False)) == 1.0 and f.score(p, f.solve(p, True)) == 1.0


# ---------------------------------------------------------------- subset

def test_subset_score_feedback_and_step_reward():
    f = tasks.get_family("subset")
    assert f.graded and f.has_feedback
    assert f.score(P_SUB, "9+31=40") == 1.0
    assert f.score(P_SUB, "~31+9=40") == 1.0
    assert f.score(P_SUB, "9+31=41") == 1.0                      # a wrong written sum: the true sum counts
    assert f.score(P_SUB, "9+31") == 1.0 and f.score(P_SUB, "so \\boxed{9+31}") == 1.0
    assert f.score(P_SUB, "9+22=31") == pytest.approx(1 - 9 / 40)
    assert f.score(P_SUB, "3+9+14+22+31=79") == pytest.approx(1 - 39 / 40)
    assert f.score(subp([3, 9, 14, 22, 31], 12, [3, 9]), "22+31=53") == 0.0  # clipped at 0
    for junk in ["9+9=18", "17+23=40", "0+40=40", "", "=40", "9+", "+9", "9 31", "９+31", "\udcff", "9+" * 3000, None]:
        assert f.score(P_SUB, junk) == 0.0, junk
    assert f.feedback(P_SUB, "9+22=31") == "sum 31, 9 short"
    assert f.feedback(P_SUB, "9+31=41") == "sum 40, exact"
    assert f.feedback(P_SUB, "9+14+22=45") == "sum 45, 5 over"
    assert f.feedback(P_SUB, "9+17=26") == "bad pick 17"
    assert f.feedback(P_SUB, "nine") == "unreadable"
    r = f.step_reward
    assert r(P_SUB, "9+22=31", "base", None) == pytest.approx(0.775)
    assert r(P_SUB, "9+22=31", "diverge", "9+31=40") == pytest.approx(0.775)  # diverge: r_k, not a gain
    assert r(P_SUB, "9+31=40", "improve", "9+22=31") == pytest.approx(1.0)
    assert r(P_SUB, "3+9+22=34", "improve", "3+22=25") == pytest.approx((0.85 - 0.625) / 0.375)
    assert r(P_SUB, "9+22=31", "improve", "3+9+22=34") == 0.0
    assert r(P_SUB, "9+31=40", "improve", "31+9=40") == 1.0 and r(P_SUB, "9+22=31", "improve", "9+31=40") == 0.0
    assert r(P_SUB, "garbage", "improve", "9+31=40") == 0.0 and r(P_SUB, "9+31=40", "improve", "garbage") == 1.0


def test_subset_problems_have_a_unique_exact_answer():
    f = tasks.get_family("subset")
    for p in f.sample("train", 100, 5) + f.sample("test", 30, 5, difficulty=8):
        nums, t = p.data["numbers"], p.data["target"]
        hits = [m for m in range(1, 2 ** len(nums)) if sum(x for i, x in enumerate(nums) if m >> i & 1) == t]
        assert len(hits) == 1 and f.score(p, p.target) == 1.0 and len(nums) == p.difficulty


# ---------------------------------------------------------------- exactsum

def esp(numbers, target, best):
    return tasks.Problem("e/1", "exactsum", " ".join(map(str, numbers)) + f">{target}", len(numbers),
                         "", {"numbers": numbers, "target": target, "best": best})


P_ES = esp([3, 7, 11, 14, 17], 31, [3, 11, 17])  # planted 3+11+17; 14+17 hits 31 as well


def test_exactsum_score_checks_the_countdown():
    f = tasks.get_family("exactsum")
    assert not f.graded and not f.has_feedback and f.feedback(P_ES, "31-14=17-17=0") is None
    assert f.score(P_ES, "31-3=28-11=17-17=0") == 1.0
    assert f.score(P_ES, "~31-17=14-11=3-3=0") == 1.0
    assert f.score(P_ES, "31-14=17-17=0") == 1.0                # any exact subset is right, not just the planted one
    assert f.score(P_ES, "so \\boxed{31-14=17-17=0}.") == 1.0
    assert f.picks(P_ES, "31-3=28-7=21") == [3, 7] and f.score(P_ES, "31-3=28-7=21") == 0.0   # short by 21
    assert f.picks(P_ES, "31-14=17-17=0-3=-3") == [14, 17, 3] and f.score(P_ES, "31-14=17-17=0-3=-3") == 0.0
    for junk in ["31-14=18-17=1", "31-14=17-17=1",              # a wrong subtraction: the check must be honest
                 "31-14=17-17=0-0=0", "31-3=28-3=25-11=14-14=0", "31-31=0", "30-14=16-16=0",  # bad picks, wrong start
                 "31", "31-14=17-17", "-14=17-17=0", "", "~", "31 14 17", "３1-14=17-17=0", None, "31-1=30" * 500]:
        assert f.score(P_ES, junk) == 0.0, junk
    for mode in tasks.MODES:  # binary: correctness of the new answer only
        assert f.step_reward(P_ES, "31-14=17-17=0", mode, "31-3=28") == 1.0
        assert f.step_reward(P_ES, "31-3=28", mode, "31-14=17-17=0") == 0.0
    assert tasks._countdown([11, 3, 17], 31, False) == "31-3=28-11=17-17=0"
    assert tasks._countdown([3, 11, 17], 31, True) == "~31-17=14-11=3-3=0"


def test_exactsumfb_feedback_comes_from_the_true_picks():
    f = tasks.get_family("exactsumfb")
    p = dataclasses.replace(P_ES, family="exactsumfb")
    assert f.has_feedback and f.score(p, "31-14=17-17=0") == 1.0
    assert f.feedback(p, "31-14=17-17=0") == "sum 31, exact"
    assert f.feedback(p, "31-3=28-11=17") == "sum 14, 17 short"
    assert f.feedback(p, "31-3=28-7=21-11=10-17=-7") == "sum 38, 7 over"
    assert f.feedback(p, "31-14=17-17=1") == "unreadable" == f.feedback(p, "31-14=18-13=0")  # a faked check
    assert f.picks(p, "31") == [] and f.feedback(p, "31") == "unreadable"  # the bare target: nothing picked, no sum
    assert "<|feedback|>sum 14, 17 short<|improve|>" in f.prompt(p, "31-3=28-11=17", "improve")


def test_exactsum_local_move_by_hand():
    f = tasks.get_family("exactsum")
    assert f.local_move(P_ES, [3, 11]) == [3, 11, 17]           # ends at 17: 17 is an unpicked number
    assert f.local_move(P_ES, [3, 7, 11, 17]) == [3, 11, 17]    # ends at -7: 7 is a pick
    assert f.local_move(P_ES, [3, 7]) is None                   # ends at 21: not in the list
    assert f.local_move(P_ES, [3, 7, 14, 17]) is None           # ends at -10: not a pick
    assert f.local_move(P_ES, [14]) == [14, 17]
    for p in f.sample("train", 300, 4):                         # a single flip of a right answer is always repairable
        for x in p.data["numbers"]:
            wrong = set(p.data["best"]) ^ {x}
            if wrong:
                assert f.score(p, f.render(p, f.local_move(p, sorted(wrong)), False)) == 1.0
    # revise given a malformed answer (no picks to move from, as a direct caller may give it): copied, or
    # written afresh; never an error
    rng, outcomes = random.Random(0), set()
    for _ in range(200):
        out = f.revise(P_ES, "no idea", rng)
        outcomes.add("copied" if out == "no idea" else "written")
        assert out == "no idea" or f.picks(P_ES, out) is not None, out
    assert outcomes == {"copied", "written"}


def test_exactsum_problems_match_their_request():
    f = tasks.get_family("exactsum")
    for p in f.sample("train", 300, 3) + f.sample("test", 100, 3, difficulty=8):
        nums = [int(x) for x in p.request.split(">")[0].split()]
        assert nums == p.data["numbers"] == sorted(set(nums)) and len(nums) == p.difficulty
        assert all(1 <= x <= 19 for x in nums) and 2 <= len(p.data["best"]) <= 4
        assert int(p.request.split(">")[1]) == p.data["target"] == sum(p.data["best"])
        assert f.score(p, f.solve(p, False)) == 1.0 and f.score(p, f.solve(p, True)) == 1.0


def test_exactsum_demonstrations_follow_their_error_model():
    f = tasks.get_family("exactsum")
    em, recs = f.error_model, f.demo_records(4000, 0)
    right = lambda r, key="response": f.score(r["problem"], r[key]) == 1.0
    base = [r for r in recs if r["mode"] == "base"]
    a = [f.a0(r["problem"].difficulty) for r in base]   # no flip: right; a flip may still land on another subset
    within(sum(map(right, base)), sum(a), sum(x * (1 - x) for x in a), len(base), slack=0.03)
    assert sum(map(right, base)) >= sum(a) - 4 * math.sqrt(sum(x * (1 - x) for x in a))
    imp = [r for r in recs if r["mode"] == "improve"]
    ok = [r for r in imp if right(r, "answer")]       # a right answer: kept (written KEEP), or over-edited (always wrong)
    kept = sum(r["response"] == tasks.KEEP for r in ok)
    assert not any(right(r) for r in ok if r["response"] != tasks.KEEP)
    pb = [f.p_break(r["problem"].difficulty) for r in ok]
    within(kept, len(ok) - sum(pb), sum(x * (1 - x) for x in pb), len(ok))
    wrong = [r for r in imp if not right(r, "answer")]
    copies = sum(r["response"] == tasks.KEEP for r in wrong)
    within(copies, em["p_copy"] * len(wrong), len(wrong) * 0.25, len(wrong), 0.01)
    # the repair, alone: with q = 1 an attempt picks exactly the numbers outside the planted subset, so a re-attempt
    # is (almost) never the local move, and a wrong answer that can be repaired by it is, at rate p_fix
    g = tasks.get_family("exactsum", error_model={"q": 1.0})
    move = lambda r: g.local_move(r["problem"], g.picks(r["problem"], r["answer"]) or [])
    moved = [r for r in g.demo_records(20000, 0) if r["mode"] == "improve" and g.score(r["problem"], r["answer"]) == 0
             and move(r) is not None]
    repaired = sum(g.picks(r["problem"], r["response"]) == sorted(move(r), reverse=r["answer"].startswith("~")) for r in moved)
    within(repaired, em["p_fix"] * len(moved), em["p_fix"] * (1 - em["p_fix"]) * len(moved), len(moved))
    assert all(r["response"] != tasks.KEEP for r in recs if r["mode"] != "improve")
    for r in recs:
        assert r["prompt"] == f.prompt(r["problem"], r["answer"], r["mode"])
        assert tasks.n_tokens(r["prompt"]) <= 110 and len(r["response"]) <= 50


def test_exactsum_keep_refers_to_the_current_answer():
    f, math_f = tasks.get_family("exactsum"), tasks.get_family("math")
    cur = "31-14=17-17=0"
    assert f.next_answer(cur, "=", "improve") == cur and f.next_answer(cur, " \\boxed{=} ", "improve") == cur
    assert f.next_answer(cur, "31-3=28", "improve") == "31-3=28"
    assert f.next_answer(cur, "=", "diverge") == "=" and f.next_answer(None, "=", "base") == "="  # improve only
    assert f.score(P_ES, "=") == 0.0 and math_f.next_answer("#15", "=", "improve") == "="        # others: literal
    assert f.step_reward(P_ES, f.next_answer(cur, "=", "improve"), "improve", cur) == 1.0


def rollouts_of(tok, texts) -> model_lib.Rollouts:
    """What generate() would return had it sampled exactly these texts (for scripted policies)."""
    rows = [tok.encode(s) for s in texts]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = torch.tensor(ids)
    mask = (torch.arange(tokens.shape[1]) < torch.tensor([len(x) for x in rows])[:, None]).float()
    return model_lib.Rollouts(tokens, torch.tensor([len(x) for x in rows]), torch.zeros(tokens.shape), mask,
                              torch.ones(len(rows), dtype=torch.bool))


def test_training_scores_and_buffers_the_kept_answer(tmp_path, monkeypatch):
    """An exactsum improve step answered "=": rewarded as the current answer, and the buffer's child
    holds that answer, not the "=" (Trainer.iteration goes through next_answer)."""
    tr = runs.prepare(tiny_cfg(tmp_path, task="exactsum", method="improve", tasks_per_iter=2), quiet=True)
    p = tr.family.sample("train", 1, 0)[0]
    right, wrong = tr.family.solve(p, False), tr.family.render(p, p.data["best"][:1], False)
    insts = [exit_lib.Instance(problem=p, turn=0, prev=[], answer=a, mode="improve", depth=1, uid=None, replay=False)
             for a in (right, wrong)]
    monkeypatch.setattr(tr, "draw_instances", lambda: insts)
    monkeypatch.setattr(exit_lib.model_lib, "generate", lambda *a, **kw: rollouts_of(tr.tok, [tasks.KEEP] * 8))
    out = tr.iteration()
    assert out["rewards"].tolist() == [[1.0] * 4, [0.0] * 4]
    kept = [e.turns[-1]["answer"] for e in tr.buffer.entries.values() if e.turns]
    assert sorted(set(kept)) == sorted({right, wrong})  # identical histories are one entry


def test_evaluation_chains_follow_keep(monkeypatch):
    """chain_scores scores and iterates what next_answer returns: a scripted 'policy' that answers the
    planted solution first, then '=' to every improve prompt, holds a perfect score; one that answers a
    wrong countdown and then '=' holds zero."""
    f, tok = tasks.get_family("exactsum"), tokenizer_lib.byte_tokenizer(tasks.MARKERS)
    probs = eval_lib.heldout_problems(f, 4)
    by_request = {p.request: p for p in probs}

    def scripted(first):
        def generate(policy, prompts, num_samples, max_new_tokens, **kw):
            texts = []
            for ids in prompts:
                prompt = tok.decode(ids, special=True)
                p = by_request[prompt.split("<|request|>")[1].split("<|answer|>")[0]]
                texts += [first(p) if prompt.endswith("<|answer|>") else tasks.KEEP] * num_samples
            return rollouts_of(tok, texts)
        return generate

    policy = model_lib.Transformer(model_lib.toy_config(tok.vocab_size))
    for first, want in [(lambda p: f.solve(p, False), 1.0), (lambda p: f.render(p, p.data["best"][:1], True), 0.0)]:
        monkeypatch.setattr(eval_lib.model_lib, "generate", scripted(first))
        trace = []
        scores, _, _ = eval_lib.chain_scores(policy, tok, f, probs, K=3, n_samples=2, style="compact", trace=trace)
        assert (scores == want).all() and all(tasks.KEEP not in answers for answers in trace)


def test_evaluation_improves_the_latest_answer(monkeypatch):
    """Step k's improve prompt shows step k - 1's answer, not an older one: a scripted 'policy' that answers
    "#1" first and appends "1" to whatever answer its improve prompt shows leaves a chain that grows by one
    digit a step."""
    f, tok = tasks.get_family("math"), tokenizer_lib.byte_tokenizer(tasks.MARKERS)

    def generate(policy, prompts, num_samples, max_new_tokens, **kw):
        texts = []
        for ids in prompts:
            prompt = tok.decode(ids, special=True)
            shown = prompt.split("<|answer|>")[1].split("<|")[0]  # "" in a base prompt
            texts += ["#1" if prompt.endswith("<|answer|>") else shown + "1"] * num_samples
        return rollouts_of(tok, texts)

    monkeypatch.setattr(eval_lib.model_lib, "generate", generate)
    policy = model_lib.Transformer(model_lib.toy_config(tok.vocab_size))
    trace = []
    eval_lib.chain_scores(policy, tok, f, eval_lib.heldout_problems(f, 2), K=3, n_samples=2, style="compact", trace=trace)
    assert trace == [["#1"] * 4, ["#11"] * 4, ["#111"] * 4, ["#1111"] * 4]


def test_exactsum_demonstrated_policy_is_weak_but_the_task_rewards_iterating():
    """The demos barely improve over K steps; a policy that keeps checked answers and always makes the
    local move (what RL can learn) climbs to nearly 1: the generation-verification gap at work."""
    f = tasks.get_family("exactsum")
    a0, a16 = f.expected_accuracy(0, n=600), f.expected_accuracy(16, n=600)
    assert 0.45 <= a0 <= 0.65 and abs(a16 - a0) <= 0.06
    hard = f.heldout_difficulties
    assert f.expected_accuracy(16, hard, n=600) <= f.expected_accuracy(0, hard, n=600) + 0.08
    ideal = tasks.get_family("exactsum", error_model=dict(p_fix=1.0, p_copy=0.0, q_break=0.0))
    assert ideal.expected_accuracy(0, n=600) == a0 and ideal.expected_accuracy(4, n=600) >= 0.95


# ---------------------------------------------------------------- parsers never raise

def random_texts(seed, n=400):
    rng = random.Random(seed)
    alphabet = "0123456789+-*/=#~{}()\\^$., boxedfracsqrt\n\u00e9\u4e00\U0001f600"
    for _ in range(n):
        yield bytes(rng.randrange(256) for _ in range(rng.randrange(40))).decode("utf-8", errors="replace")
        yield "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        yield "\\boxed{" * rng.randrange(5) + "".join(rng.choice(alphabet) for _ in range(10)) + "}" * rng.randrange(5)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_parsers_never_raise_on_junk(name, tmp_path):
    f = family_for_test(name, tmp_path)
    p = f.sample("train", 1, 0)[0]
    p = f.turn_problem(p, 0, []) if f.multi_turn else p
    for text in random_texts(name):
        s = f.score(p, text)
        assert 0.0 <= s <= 1.0
        for mode in tasks.MODES:
            assert 0.0 <= f.step_reward(p, text, mode, text[::-1]) <= 1.0
        f.feedback(p, text), f.solution_text(text)
        assert isinstance(tasks.extract_answer(text), str)
        assert tasks.answers_equal(text, "2") in (True, False)


# ---------------------------------------------------------------- splits and prompts

@pytest.mark.parametrize("name", SYNTHETIC)
def test_splits_disjoint_and_reproducible(name):
    f = tasks.get_family(name)
    train, test = f.sample("train", 600, 0), f.sample("test", 200, 0)
    assert train == f.sample("train", 600, 0) and test == f.sample("test", 200, 0)
    assert train != f.sample("train", 600, 1)
    assert not {p.request for p in train} & {p.request for p in test}
    assert not {p.request for p in train} & {p.request for p in f.sample("test", 200, 1)}
    assert len({p.id for p in train + test}) == 800 and len({p.request for p in train}) == 600
    # an even mix, whatever share of each difficulty's draws `make` rejects (subset's: 15% at 5, 65% at 7)
    shares = [sum(p.difficulty == d for p in train) for d in f.train_difficulties]
    assert all(abs(s - 600 / len(shares)) < 45 for s in shares), shares
    hard = f.heldout_difficulties[-1]
    assert all(p.difficulty == hard for p in f.sample("test", 50, 0, difficulty=hard))
    p = train[0]
    assert tasks.Problem(**json.loads(json.dumps(dataclasses.asdict(p)))) == p
    with pytest.raises(ValueError, match="split must be one of"):
        f.sample("valid", 1, 0)
    val = f.sample("val", 200, 0)  # the validation split, where settings are chosen: disjoint from both
    assert not {p.request for p in val} & ({p.request for p in train} | {p.request for p in test})


def test_validation_is_carved_from_the_old_test_fifth_so_training_draws_are_unchanged():
    reqs = [f"{a} + {b}" for a in range(100) for b in range(50)]
    splits = [tasks.split_of(r) for r in reqs]
    # train is exactly what it was before the validation split existed: md5 % 5 != 0
    assert all((s == "train") == (int(hashlib.md5(r.encode()).hexdigest(), 16) % 5 != 0) for r, s in zip(reqs, splits))
    assert 0.08 < splits.count("val") / len(reqs) < 0.12 and 0.08 < splits.count("test") / len(reqs) < 0.12
    f = tasks.get_family("exactsumfb")
    val, test = eval_lib.heldout_problems(f, 30, split="val"), eval_lib.heldout_problems(f, 30)
    assert all(tasks.split_of(p.request) == "val" for p in val) and all(tasks.split_of(p.request) == "test" for p in test)


def test_eval_harder_adds_the_familys_harder_difficulties_in_equal_shares():
    f = tasks.get_family("exactsum")  # trains at difficulties 4, 5, 6; holds out 7 and 8 as harder
    count = lambda problems: dict(collections.Counter(p.difficulty for p in problems))
    assert count(eval_lib.heldout_problems(f, 20)) == {4: 7, 5: 7, 6: 6}
    harder = eval_lib.heldout_problems(f, 20, harder=True)
    assert count(harder) == {4: 4, 5: 4, 6: 4, 7: 4, 8: 4} and all(tasks.split_of(p.request) == "test" for p in harder)
    settings = eval_lib.eval_settings(dataclasses.asdict(exit_lib.Config(eval_harder=True)))  # --eval_harder reaches it
    assert settings["harder"] is True


def test_the_shipped_base_rows_are_of_todays_heldout_problems():
    """bases/exactsumfb/base.json's Base rows are reused by their settings alone, without drawing their problems again:
    the held-out problems those settings name must stay the ones they were evaluated on (if this fails, a change moved
    them: re-evaluate the shipped rows, `python base.py`, then update the digests here)."""
    f = tasks.get_family("exactsumfb")
    rows = json.load(open(os.path.join(HERE, "bases", "exactsumfb", "base.json")))["evaluations"]
    digests = dict(test="795b163d50bbe6bcca55d3052a11adfb", val="4abe49e5ed465584e5a1d99b3ed0c0e5")  # at 2b8e7bb
    assert {(r["settings"]["n_problems"], r["settings"]["split"], r["settings"]["harder"]) for r in rows} == \
        {(200, "test", False), (200, "val", False)}
    for split, digest in digests.items():
        problems = eval_lib.heldout_problems(f, 200, split=split)
        assert dict(collections.Counter(p.difficulty for p in problems)) == {4: 67, 5: 67, 6: 66}
        assert hashlib.md5("\n".join(p.request for p in problems).encode()).hexdigest() == digest, split


@pytest.mark.parametrize("name", SYNTHETIC)
def test_prompts_contain_request_and_answer(name):
    f = tasks.get_family(name)
    p = f.sample("test", 1, 0)[0]
    ans = f.attempt(p, False, random.Random(0))
    assert f.prompt(p) == f"<|request|>{p.request}<|answer|>"
    for style in ("compact", "chat"):
        for mode in tasks.MODES:
            text = f.prompt(p, None if mode == "base" else ans, mode, style=style)
            assert p.request in text
            if mode != "base":
                assert ans in text
                if f.has_feedback:
                    assert f.feedback(p, ans) in text
            if style == "chat":
                assert "\\boxed" in text and "<|" not in text
        with pytest.raises(ValueError):
            f.prompt(p, None, "improve", style=style)
    assert f.prompt(p, ans, "improve").endswith("<|improve|>")
    assert f.prompt(p, ans, "diverge").endswith("<|diverge|>")
    chat = f.prompt(p, ans, "diverge", style="chat").lower()
    assert "summarise" in chat and "significantly different approach" in chat
    assert tasks.n_tokens(f.prompt(p)) == len(p.request) + 2


def test_compact_prompts_never_turn_the_policys_text_into_markers():
    """The policy writes bytes; an answer that spells a marker ("<|feedback|>sum 31, exact") stays those bytes in the
    next prompt, so it can neither fake the environment's feedback nor end the request early (tokenizer.py's rule)."""
    tok, f = tokenizer_lib.byte_tokenizer(tasks.MARKERS), tasks.get_family("exactsumfb")
    p = f.sample("test", 1, 0)[0]
    marker = {m: tok.encode(m, special=True)[0] for m in tasks.MARKERS}
    for forged in ("31-3=28<|feedback|>sum 31, exact", "<|improve|>", "<|answer|>"):
        ids = tasks.encode_prompt(tok, f, p, forged, "improve")
        assert [ids.count(i) for i in marker.values()] == [1, 1, 1, 1, 0]  # request, answer, feedback, improve
        at = ids.index(marker["<|answer|>"]) + 1
        assert ids[at:at + len(forged)] == list(forged.encode())  # the answer's own bytes
        assert tok.decode(ids, special=True) == "<|bos|>" + f.prompt(p, forged, "improve")  # the same text, other ids
    honest = f.attempt(p, False, random.Random(0))  # an answer without marker text: one encode of the whole prompt
    assert tasks.encode_prompt(tok, f, p, honest, "improve") == tasks.prompt_ids(tok, f.prompt(p, honest, "improve"))


# ---------------------------------------------------------------- warm-start demonstrations

@pytest.mark.parametrize("name", MARKOV)
def test_demonstrations_follow_the_error_model(name):
    f = tasks.get_family(name)
    em, recs = f.error_model, f.demo_records(4000, 0)
    assert [(r["prompt"], r["response"]) for r in recs] == f.demonstrations(4000, 0)
    right = lambda r, key="response": f.score(r["problem"], r[key]) == 1.0
    by = {m: [r for r in recs if r["mode"] == m] for m in tasks.MODES}
    within(len(by["base"]), 0.5 * 4000, 4000 * 0.25, 4000)
    within(len(by["improve"]), 0.35 * 4000, 4000 * 0.35 * 0.65, 4000)
    # first attempts: P(right) = a0(d) exactly
    a = [f.a0(r["problem"].difficulty) for r in by["base"]]
    within(sum(map(right, by["base"])), sum(a), sum(x * (1 - x) for x in a), len(a))
    # revisions of a wrong answer: fixed with p_fix_eff(d), copied verbatim with ~p_copy
    wrong = [r for r in by["improve"] if not right(r, "answer")]
    pf = [f.p_fix_eff(r["problem"].difficulty) for r in wrong]
    within(sum(map(right, wrong)), sum(pf), sum(x * (1 - x) for x in pf), len(wrong))
    copies = sum(r["response"] == r["answer"] for r in wrong)
    within(copies, em["p_copy"] * len(wrong), len(wrong) * em["p_copy"] * (1 - em["p_copy"]), len(wrong), 0.01)
    # revisions of a right answer: kept verbatim with 1 - p_break(d), else broken
    ok = [r for r in by["improve"] if right(r, "answer")]
    kept = sum(r["response"] == r["answer"] for r in ok)
    assert kept == sum(map(right, ok))
    pb = [f.p_break(r["problem"].difficulty) for r in ok]
    within(kept, len(ok) - sum(pb), sum(x * (1 - x) for x in pb), len(ok))
    # diverge: always the other style, first-attempt accuracy
    assert all(r["response"].startswith("~") != r["answer"].startswith("~") for r in by["diverge"])
    a = [f.a0(r["problem"].difficulty) for r in by["diverge"]]
    within(sum(map(right, by["diverge"])), sum(a), sum(x * (1 - x) for x in a), len(a))
    # every demo prompt is the family's own prompt, and short enough for the toy model
    for r in recs:
        assert r["prompt"] == f.prompt(r["problem"], r["answer"], r["mode"])
        assert tasks.n_tokens(r["prompt"]) <= 110 and len(r["response"]) <= 50


@pytest.mark.parametrize("name", MARKOV)
def test_demonstrated_policy_is_a_weak_self_improver(name):
    """Simulate K revisions with `revise`: the Markov-chain prediction must match, and accuracy must not climb."""
    f = tasks.get_family(name)
    rng, probs = random.Random(1), f.sample("train", 3000, 7)
    answers = [f.attempt(p, rng.random() < 0.25, rng) for p in probs]
    a0 = [f.a0(p.difficulty) for p in probs]
    for k in range(5):
        exp = [tasks.two_state_accuracy(x, f.p_fix_eff(p.difficulty), f.p_break(p.difficulty), k) for x, p in zip(a0, probs)]
        within(sum(f.score(p, a) == 1.0 for p, a in zip(probs, answers)), sum(exp), sum(e * (1 - e) for e in exp), 3000)
        answers = [f.revise(p, a, rng) for p, a in zip(probs, answers)]
    assert 0.45 <= f.expected_accuracy(0) <= 0.55
    assert f.expected_accuracy(0) - 0.08 <= f.expected_accuracy(16) <= f.expected_accuracy(0)  # drifts down a little
    hard = f.heldout_difficulties
    assert f.expected_accuracy(16, hard) <= f.expected_accuracy(0, hard) + 0.02  # no free gains on held-out


def test_error_model_is_settable():
    f = tasks.get_family("math", error_model={"q": 0.0, "q_break": 1.0})
    recs = f.demo_records(300, 0)
    assert all(f.score(r["problem"], r["response"]) == 1.0 for r in recs if r["mode"] == "base")
    assert f.expected_accuracy(0) == 1.0 and f.expected_accuracy(1) == 0.0  # every right answer broken
    assert f.expected_accuracy(2) == pytest.approx(f.error_model["p_fix"] + 0.2 * 1.0)  # fix, or a re-attempt (a0 = 1)
    assert tasks.get_family("math").error_model["q"] == tasks.MathFamily.ERROR_MODEL["q"]  # class default untouched
    for name in MARKOV:  # a slip never cancels an earlier one: slipping everywhere is always wrong
        f, rng = tasks.get_family(name, error_model={"q": 1.0}), random.Random(0)
        for p in f.sample("train", 500, 2):
            assert f.score(p, f.attempt(p, rng.random() < 0.5, rng)) < 1.0
            assert f.score(p, f.break_answer(p, False, rng)) < 1.0


# ---------------------------------------------------------------- real data

def test_extract_answer():
    e = tasks.extract_answer
    assert e("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert e("\\boxed{1} then \\boxed{\\frac{a^{2}}{\\sqrt{b}}}") == "\\frac{a^{2}}{\\sqrt{b}}"
    assert e("Total is 5 apples.\n#### 1,234") == "1,234"
    assert e("it is 3, then 42.") == "42" and e("so x = -4.") == "-4" and e("5 + 3 = 8 apples") == "8"
    p = tasks.Problem("x", "realmath", "q", 0, "4", {})
    for wrong in ("the ratio is 3/4", "about 2^4", "the difference is 10 - 4"):  # an expression ending in 4 is not 4
        assert tasks.RealMath(problems=[p]).score(p, wrong) == 0.0
    assert e("no numbers") == "" and e("") == "" and e("\\boxed{1") == "1"
    assert e("The answer is .5") == ".5" and e("so 0.5, then 12") == "12"  # a leading point is part of the number


def test_answers_equal():
    eq = tasks.answers_equal
    assert eq("\\frac{1}{2}", "0.5") and eq("\\dfrac{1}{2}", "1/2") and eq("\\frac12", "0.5")
    assert eq("\\$18.90", "18.90") and eq("\\$ 18", "$18")  # an escaped dollar sign, as GSM8K answers box it
    assert eq("1,234", "1234") and eq("$10$", "10.0") and eq("\\text{5}", "5") and eq(" 7 ", "7.")
    assert eq("2\\sqrt{2}", "\\sqrt{8}") and eq("x^2+2x+1", "(x+1)^2") and eq("\\left(3\\right)", "3")
    assert not eq("1/3", "0.33") and not eq("12", "21") and not eq("", "") and not eq(None, "1")
    for huge_or_unsafe in ("9^{9^{9}}", "9**99**99", "__import__('os')"):  # refused before sympy's eval, not timed out
        assert tasks._to_sympy(huge_or_unsafe) is None and not eq(huge_or_unsafe, "1")
    # a reviewer's cases: lists are not thousands, a mixed number is a sum, units, "x =", LaTeX's {,}, a Unicode minus
    assert not eq("(3,100)", "3100") and not eq("2, 500", "2500")
    assert eq("2\\frac{1}{4}", "\\frac{9}{4}") and not eq("2\\frac{1}{4}", "\\frac{1}{2}") and eq("-2\\frac{1}{4}", "-2.25")
    assert eq("3\\frac{\\sqrt{3}}{2}", "\\frac{3\\sqrt{3}}{2}") and eq("1.5\\frac{1}{2}", "0.75")  # not mixed numbers
    assert eq("5 \\text{ cm}", "5") and eq("x = 5", "5") and eq("1{,}000", "1000") and eq("\u22125", "-5")
    t = time.time()  # sympy.simplify took about a minute on this one answer; three numeric points take milliseconds
    assert not eq("(a+b+c+d)^{50}", "42") and not eq("(a+b+c+d)^{50}", "(a+b+c+d)^{49}") and time.time() - t < 10
    # and what a numeric comparison must not get wrong: large integers exactly, letters each at their own values,
    # a pole skipped, a digit in an exponent is no mixed number, a unit is one short word
    assert not eq("1000000000", "1000000001") and not eq("2^{30}", "1073741825") and eq("2^{30}", "1073741824")
    assert not eq("a+c", "2b") and not eq("y-x", "z-y") and not eq("y", "x+\\frac{2}{7}")
    assert eq("\\frac{1}{7x-3}", "1/(7x-3)") and eq("x^2\\frac{1}{2}", "\\frac{x^2}{2}")
    assert eq("5\\text{cm}", "5") and not eq("5 \\text{ or more}", "5")


def test_load_jsonl_and_realmath(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    lines = [{"question": f"What is {i}*1000+234?", "answer": f"work\n#### {i},234"} for i in range(1, 41)]
    gsm.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    probs = tasks.load_jsonl(str(gsm))
    assert len(probs) == 40 and probs[0].target == "1,234" and probs[0].id == "gsm/1"
    mth = tmp_path / "math.jsonl"
    mth.write_text(json.dumps({"problem": "Half?", "solution": "It is \\boxed{\\frac{1}{2}}.", "level": "Level 3"})
                   + "\n" + json.dumps({"problem": "Two?", "answer": "2"}) + "\n")
    m = tasks.load_jsonl(str(mth))
    assert [(p.target, p.difficulty) for p in m] == [("\\frac{1}{2}", 3), ("2", 0)]
    mth.write_text(json.dumps({"problem": "Two?", "answer": 2}) + "\n")  # a number is an answer too
    assert tasks.load_jsonl(str(mth))[0].target == "2"
    # GSM8K: the answer's first line after ####; a question given twice is one problem, or an error if answers differ
    mth.write_text("\n".join(json.dumps({"question": "Q?", "answer": f"#### {a}\n\nextra"}) for a in ("72", "72.0")) + "\n")
    assert [p.target for p in tasks.load_jsonl(str(mth))] == ["72"]
    mth.write_text("\n".join(json.dumps({"question": "Q?", "answer": f"#### {a}"}) for a in ("4", "5")) + "\n")
    with pytest.raises(ValueError, match=r"math.jsonl, line 2: the question of line 1 again, with another answer"):
        tasks.load_jsonl(str(mth))
    bad = tmp_path / "bad.jsonl"
    for body, line in [('{"question": "q", "answer": "#### 1"}\n{"question": \n', 2),
                       ('{"question": "q", "answer": "#### 1"}\n\n{"problem": "p", "solution": "no box"}\n', 3),
                       ('{"question": "q", "answer": "no hashes"}\n', 1), ('[1, 2]\n', 1),
                       ('{"question": "q", "answer": ["#### 4"]}\n', 1), ('{"problem": "p", "answer": null}\n', 1),
                       ('{"problem": "p", "answer": {"x": 1}}\n', 1), ('{"problem": "p", "answer": NaN}\n', 1),
                       ('{"question": " ", "answer": "#### 4"}\n', 1), ('{"problem": "p", "answer": true}\n', 1)]:
        bad.write_text(body)
        with pytest.raises(ValueError, match=f"bad.jsonl, line {line}"):
            tasks.load_jsonl(str(bad))
    f = tasks.get_family("realmath", path=str(gsm))
    train, test = f.sample("train", 100, 0), f.sample("test", 100, 0)
    assert not {p.request for p in train} & {p.request for p in test} and len(train) == 100
    assert f.sample("train", 100, 0) == train
    p = probs[0]
    assert f.score(p, "... so \\boxed{1234}") == 1.0 and f.score(p, "#### 1234") == 1.0
    assert f.score(p, "\\boxed{1235}") == 0.0 and f.score(p, "") == 0.0
    assert p.request in f.prompt(p, "x", "improve", style="chat")
    with pytest.raises(NotImplementedError):
        f.demonstrations(10, 0)


def test_get_family_registry():
    assert set(tasks.FAMILIES) >= {"math", "subset", "realmath"}
    with pytest.raises(ValueError, match="math"):
        tasks.get_family("chess")
    assert all(len(m) > 3 and m.startswith("<|") for m in tasks.MARKERS)


def test_math_fbox_answers_are_read():
    assert tasks_lib.extract_answer("so the answer is $\\fbox{12}$.") == "12"
    assert tasks_lib._last_boxed("\\boxed{1} then \\fbox{2}") == "2"


def test_math_file_with_fbox_solutions_loads(tmp_path):
    f = tmp_path / "math.jsonl"
    f.write_text(json.dumps(dict(problem="What is 3 + 4?", solution="3 + 4 = \\fbox{7}.", level="Level 1")) + "\n")
    assert [p.target for p in tasks_lib.load_jsonl(str(f))] == ["7"]


# ---------------------------------------------------------------- the family interface (tasks.TaskFamily)

def check_family_contract(f):
    """The rules of tasks.TaskFamily's docstring, on one built family: every registered family
    (test_family_contract) and README's worked example."""
    f.check()
    assert tasks.FAMILIES.get(f.name) is type(f) and f.name in tasks.describe_families()
    train, test = f.sample("train", 200, 0), f.sample("test", 40, 0)
    assert train == f.sample("train", 200, 0) and len(train) == 200 and len(test) == 40      # reproducible
    assert not {p.request for p in train} & {p.request for p in test}                       # disjoint splits
    for p in train[:50] + test[:10]:                                                       # rule 1: JSON-able
        assert p.family == f.name and tasks.Problem(**json.loads(json.dumps(dataclasses.asdict(p)))) == p
    probs = [f.turn_problem(p, 0, []) if f.multi_turn else p for p in train[:100]]
    for text in list(random_texts(f.name, 30)) + [None, "", tasks.ALT_TAG]:                  # rule 3: never raises
        assert 0.0 <= f.score(probs[0], text) <= 1.0
        if f.has_feedback:
            assert isinstance(f.feedback(probs[0], text), str)
    assert f.score(probs[0], None) == 0.0
    if not f.multi_turn:                                                                     # rule 8
        assert "\\boxed" in f.prompt(probs[0], style="chat")
    if not f.has_demonstrations:
        with pytest.raises(NotImplementedError, match="no warm-start demonstrations"):
            f.demonstrations(2, 0)
        return
    rng, slippy = random.Random(0), type(f)(error_model={"q": 1.0})
    for p in probs:
        for alt in (False, True):
            right, first = f.solve(p, alt), f.attempt(p, alt, rng)
            assert f.score(p, right) == 1.0                                                  # rule 3
            assert right.startswith(tasks.ALT_TAG) == first.startswith(tasks.ALT_TAG) == alt # rule 5
            assert f.score(p, f.break_answer(p, alt, rng)) < 1.0                             # rule 4
            if type(f).revise is tasks.TaskFamily.revise:  # the exact a0 of the two-state chain; exactsum
                assert slippy.score(p, slippy.attempt(p, alt, rng)) < 1.0  # simulates (another subset can be right)
    recs = f.demo_records(300, 0)
    assert [(r["prompt"], r["response"]) for r in recs] == f.demonstrations(300, 0)          # rule 7
    assert f.demonstrations(32, 0) == f.demonstrations(32, 0)
    for r in recs:
        assert tasks.n_tokens(r["prompt"]) <= 110 and len(r["response"]) <= 50               # rule 3
        if r["mode"] == "diverge":                                                           # rule 5
            assert r["response"].startswith(tasks.ALT_TAG) != r["answer"].startswith(tasks.ALT_TAG)
    if not f.multi_turn:                                                                     # rule 6
        a0, a16 = f.expected_accuracy(0), f.expected_accuracy(16)
        assert 0.45 <= a0 <= 0.55 and a16 <= a0 + 0.02, (a0, a16)
        if f.heldout_difficulties:
            h0, h16 = (f.expected_accuracy(k, f.heldout_difficulties) for k in (0, 16))
            assert h16 <= h0 + 0.05, (h0, h16)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_family_contract(name, tmp_path):
    check_family_contract(family_for_test(name, tmp_path))


class _Half(tasks.TaskFamily):
    """A family that forgot solve and break_answer."""
    name, train_difficulties = "half", (1, 2)

    def make(self, rng, difficulty):
        r = "".join(rng.choice("0123456789") for _ in range(difficulty))
        return tasks.Problem("", self.name, r, difficulty, r, {})

    def score(self, problem, response):
        return float(response == problem.target)

    def attempt(self, problem, alt, rng):
        return problem.target


def test_a_family_missing_a_piece_fails_when_built():
    with pytest.raises(TypeError, match=r"'half' \(_Half\): missing method solve\(problem, alt\); "
                                        r"missing method break_answer\(problem, alt, rng\)"):
        _Half()
    done = dict(solve=lambda self, problem, alt: problem.target, break_answer=lambda self, problem, alt, rng: "")
    Whole = type("Whole", (_Half,), done)
    assert Whole().sample("train", 3, 0)                                   # complete: builds and samples
    for extra, why in [(dict(train_difficulties=()), "train_difficulties must be a non-empty tuple of ints"),
                       (dict(name="base"), "set the class attribute `name`"),
                       (dict(attempt=lambda self, problem, rng, alt: ""), r"attempt takes \(problem, alt, rng\)"),
                       (dict(has_feedback=True), r"missing method feedback\(problem, response\)"),
                       (dict(multi_turn=True), r"missing method n_turns\(episode\); missing method turn_problem"),
                       (dict(make=tasks.TaskFamily.make), r"missing method make\(rng, difficulty\)")]:
        with pytest.raises(TypeError, match=why):
            type("Broken", (Whole,), extra)()
    assert type("NoDemos", (_Half,), dict(has_demonstrations=False))().sample("test", 2, 0)  # realmath's way
    with pytest.raises(NotImplementedError, match="no warm-start demonstrations"):
        type("NoDemos", (_Half,), dict(has_demonstrations=False))().demonstrations(2, 0)


def test_sample_warns_once_when_a_difficulty_runs_out():
    f = type("Few", (_Half,), dict(has_demonstrations=False, train_difficulties=(1, 3)))()  # 1: 10 requests, 3: 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(f.sample("train", 20, 0)) == 20               # enough of both: no warning
    with pytest.warns(UserWarning, match=r"half: difficulty 1 ran out of distinct train problems after [0-9] "
                                         r"\(its share of the 300 asked is ~150\)"):
        ps = f.sample("train", 300, 0)
    assert len(ps) == 300 and sum(p.difficulty == 1 for p in ps) <= 10  # the mix is skewed, and it said so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f.sample("train", 300, 0) == ps                   # once per family and difficulty
    with pytest.raises(ValueError, match="could not draw 50 distinct train problems"):
        f.sample("train", 50, 0, difficulty=1)
    m = tasks.get_family("math")  # difficulty 1 has ~290 train problems, found now and then: never 200 repeats in a row
    m.train_difficulties = (1, 3)
    with pytest.warns(UserWarning, match=r"math: difficulty 1 ran out of distinct train problems after 2[0-9][0-9] "):
        m.sample("train", 2000, 0)
    # a family that overrides sample passes check() without a mix, and may still call the base sample
    own = type("Own", (_Half,), dict(has_demonstrations=False, train_difficulties=(),
                                     sample=lambda self, *a, **k: super(own, self).sample(*a, **k)))
    with pytest.raises(ValueError, match="no train_difficulties to draw from; pass difficulty="):
        own().sample("train", 5, 0)


def readme_family_example():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert "## Adding a task family" in text, "README.md lost its section 'Adding a task family', tested here"
    return text.split("## Adding a task family", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_family_passes_the_contract_and_trains(tmp_path, monkeypatch):
    """README's "Adding a task family" example, run as written: it registers, builds, keeps every rule
    (including the error-model tests the built-in families run), and trains for two iterations."""
    monkeypatch.setitem(tasks.FAMILIES, "sort", None)  # the example registers itself; this undoes it afterwards
    exec(compile(readme_family_example(), "README.md (Adding a task family)", "exec"), {})
    f = tasks.get_family("sort")
    check_family_contract(f)
    test_splits_disjoint_and_reproducible("sort")
    test_prompts_contain_request_and_answer("sort")
    if type(f).revise is tasks.TaskFamily.revise:  # the two-state chain of math and subset: their tests too
        test_demonstrations_follow_the_error_model("sort")
        test_demonstrated_policy_is_a_weak_self_improver("sort")
    runs.train(tiny_cfg(tmp_path, task="sort", iters=2), quiet=True)
    logs = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(logs) == 2 and all(0.0 <= log["reward"] <= 1.0 for log in logs)


# ===============================================================================================
# model.py: the policy, its tokenizers and sampler, against transformers
# ===============================================================================================

V = 96  # vocab of the tiny models below: large enough for distinct tokens, small enough to be fast


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=128)
    m = model.Transformer(model.ModelConfig(**(cfg | kw)))
    # sharper logits than the 0.02 init gives, so greedy choices are not near-ties
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m.eval()


def rand_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def greedy_by_recompute(m, prompt, n):
    """The reference decoder: a full forward over the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(m(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt):]


# ----------------------------------------------------------------------------- transformer

def test_causality():
    m = tiny()
    x = torch.tensor(rand_prompts([20])[0])[None]
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % V
    with torch.no_grad():
        a, b = m(x)[0], m(y)[0]
    assert torch.equal(a[0, :12], b[0, :12])
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_loss_ignores_minus_100():
    m = tiny()
    x = torch.tensor(rand_prompts([10])[0])[None]
    t = x.roll(-1, 1)
    t[0, 5:] = -100
    logits, loss = m(x, t)
    ref = torch.nn.functional.cross_entropy(logits[0, :5], t[0, :5])
    assert torch.allclose(loss, ref)


def test_kv_cache_equals_full_recompute():
    m = tiny()
    prompt = rand_prompts([9])[0]
    seq = prompt + rand_prompts([6], seed=1)[0]
    with torch.no_grad():
        full = m(torch.tensor([seq]))[0][0]  # (T, V)
        cache = model.KVCache(m.config.n_layer, 1, len(seq))
        steps = [m(torch.tensor([prompt]), cache=cache)[0][0]]
        for tok in seq[len(prompt):]:
            steps.append(m(torch.tensor([[tok]]), cache=cache)[0][0])
    assert torch.allclose(torch.cat(steps), full, atol=1e-5)
    out = model.generate(m, [prompt], 1, 12, temperature=0, stop_ids=(), pad_id=0)
    assert out.tokens[0].tolist() == greedy_by_recompute(m, prompt, 12)


def test_mixed_length_batch_equals_one_at_a_time():
    m = tiny()
    prompts = rand_prompts([3, 11, 7])
    kw = dict(temperature=0, stop_ids=(), pad_id=0)
    batch = model.generate(m, prompts, 2, 10, **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(m, [p], 1, 10, **kw)
        for r in (2 * i, 2 * i + 1):
            assert batch.tokens[r].tolist() == alone.tokens[0].tolist()
            assert torch.allclose(batch.logprobs[r], alone.logprobs[0], atol=1e-5)


# ----------------------------------------------------------------------------- sampler

def test_stop_lengths_and_masks():
    m = tiny()
    prompt = rand_prompts([5], seed=2)[0]  # a prompt whose greedy continuation does not loop
    free = greedy_by_recompute(m, prompt, 8)
    k = next(j for j in range(2, 8) if free[j] not in free[:j])  # first new token from step 2 on
    PAD = V - 1
    out = model.generate(m, [prompt], 3, 8, temperature=0, stop_ids={free[k]}, pad_id=PAD)
    assert out.tokens.shape == (3, k + 1)  # everyone stopped: decoding ends early
    assert out.lengths.tolist() == [k + 1] * 3 and out.finished.all()
    assert out.tokens[0].tolist() == free[:k + 1]  # the stop token is kept
    assert out.mask.sum().item() == 3 * (k + 1)
    # a stop id that never comes: the budget ends every row, nothing is finished
    out = model.generate(m, [prompt], 2, 8, temperature=0, stop_ids={V + 5}, pad_id=PAD)
    assert out.lengths.tolist() == [8, 8] and not out.finished.any() and out.mask.all()


def test_forced_eos_first_token():
    m = tiny()
    EOS = 7
    m.lm_head = torch.nn.Linear(32, V)  # a test-only head whose bias forces EOS whatever h is
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.zero_()
        m.lm_head.bias[EOS] = 30.0
    out = model.generate(m, rand_prompts([4, 6]), 3, 5, stop_ids=[EOS], pad_id=0,
                         generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (6, 1) and (out.tokens == EOS).all()
    assert out.lengths.tolist() == [1] * 6 and out.finished.all() and out.mask.eq(1).all()


def test_ragged_rows_pad_and_mask():
    m = tiny()
    with torch.no_grad():
        m.lm_head.weight.div_(20)  # flat distribution: rows stop at different steps
    STOPS, PAD = {1, 2, 3, 4, 5, 6, 7, 8}, 0
    out = model.generate(m, rand_prompts([5, 9]), 16, 12, stop_ids=STOPS, pad_id=PAD,
                         generator=torch.Generator().manual_seed(1))
    assert len(set(out.lengths.tolist())) > 2
    T = out.tokens.shape[1]
    for i in range(out.tokens.shape[0]):
        n = int(out.lengths[i])
        row = out.tokens[i].tolist()
        assert all(t == PAD for t in row[n:])
        assert out.mask[i].tolist() == [1.0] * n + [0.0] * (T - n)
        assert (out.logprobs[i, n:] == 0).all() and (out.logprobs[i, :n] < 0).all()
        if out.finished[i]:
            assert row[n - 1] in STOPS and not any(t in STOPS for t in row[:n - 1])
        else:
            assert n == 12 and not any(t in STOPS for t in row)


def test_sample_next_frequencies_follow_the_tempered_softmax():
    """The sampler draws from softmax(z / T), not softmax(z): at T = 0.5 the top token's share is 0.86, not 0.64."""
    z, n, T = torch.tensor([2.0, 1.0, 0.0, -1.0]), 40_000, 0.5
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(model.sample_next(z.expand(n, 4), u, T), minlength=4).double()
    p = torch.softmax(z.double() / T, -1)  # independent of the sampler's inverse CDF
    assert torch.all((counts - n * p).abs() <= 4 * torch.sqrt(n * p * (1 - p))), (counts, n * p)


def test_sample_next_never_picks_a_zero_probability_token():
    z = torch.tensor([[-200.0, 0.0, -math.inf, 0.0]])  # exp(-200) underflows to 0 in fp32
    assert model.sample_next(z, torch.zeros(1, 1)).item() == 1  # u = 0, which torch.rand can return
    assert model.sample_next(z, torch.full((1, 1), 1 - 2 ** -24)).item() == 3


def test_seeded_sampling_is_reproducible():
    m = tiny()
    prompts = rand_prompts([4, 8])

    def run(seed, **kw):
        return model.generate(m, prompts, 4, 10, stop_ids=(), pad_id=0,
                              generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    assert torch.equal(run(3, temperature=0.7).tokens, run(3, temperature=0.7).tokens)


def test_greedy_and_group_replication():
    m = tiny()
    prompts = rand_prompts([4, 8])
    out = model.generate(m, prompts, 3, 6, temperature=0, stop_ids=(), pad_id=0)
    for i, p in enumerate(prompts):
        ref = greedy_by_recompute(m, p, 6)
        for r in range(3 * i, 3 * i + 3):  # group-major rows
            assert out.tokens[r].tolist() == ref


def test_generate_logprobs_equal_completion_logprobs():
    m = tiny()
    with torch.no_grad():
        m.lm_head.weight.div_(10)
    m.train()  # generate switches to eval and back
    prompts = rand_prompts([3, 10, 6])
    out = model.generate(m, prompts, 4, 12, temperature=0.7, stop_ids={1, 2, 3}, pad_id=0,
                         generator=torch.Generator().manual_seed(0))
    assert m.training
    lp = model.completion_logprobs(m, prompts, out.tokens, out.lengths, prompt_repeat=4, temperature=0.7)
    assert lp.shape == out.tokens.shape
    assert torch.allclose(lp, out.logprobs, atol=1e-5)
    (lp * out.mask).sum().backward()  # gradients reach the weights
    assert m.embed_tokens.weight.grad is not None and m.embed_tokens.weight.grad.abs().sum() > 0


def test_tempered_logprobs_divide_in_fp32_as_the_sampler_does():
    """Under bf16 the training forward's logits are cast to fp32 before the division by T, as the sampler's
    are (generate: lm_head(...).float(), then sample_next and token_logprobs divide): the two sides of GRPO's
    ratio then round alike. Dividing bf16 logits first rounds the quotient to bf16."""
    m = tiny().to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, m.config.n_embd, generator=g).to(torch.bfloat16) * 4
    tokens = torch.randint(0, m.config.vocab_size, (3, 5), generator=g)
    want = (m.lm_head(h).float() / 0.7).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.equal(model.token_logprobs(m.lm_head(h), tokens, 0.7), want)


def test_generate_dropping_finished_rows_changes_no_sample(monkeypatch):
    # generate() drops finished rows from its batch (model.DROP_FINISHED_AT); each row still gets
    # the uniform it would get in the full batch, so the rollouts equal those of a sampler that
    # never drops a row (only the float rounding of a smaller batch's matmuls may differ)
    m = tiny()
    prompts = rand_prompts([3, 10, 6, 4])
    outs = []
    for at in (0.25, 0.01, 2.0):  # drop at a quarter, at every finished row, never
        monkeypatch.setattr(model, "DROP_FINISHED_AT", at)
        for kw in (dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7)):
            g = torch.Generator().manual_seed(3)
            outs.append((at, kw, model.generate(m, prompts, 6, 20, stop_ids={1, 2, 3, 4, 5}, pad_id=0, generator=g, **kw)))
    base = {str(kw): o for at, kw, o in outs if at == 2.0}
    for at, kw, o in outs:
        b = base[str(kw)]
        assert torch.equal(o.tokens, b.tokens) and torch.equal(o.lengths, b.lengths), (at, kw)
        assert torch.equal(o.finished, b.finished) and torch.equal(o.mask, b.mask)
        assert torch.allclose(o.logprobs, b.logprobs, atol=1e-5)
    # the test means something: rows of different lengths, some ended by a stop token
    b = base[str(dict(temperature=1.0))]
    assert b.finished.any() and len(set(b.lengths.tolist())) > 2


def test_grouped_completion_logprobs_equal_flat_values_and_gradients():
    # prompt_repeat = G runs each prompt once for its G completions (model._grouped_hidden);
    # repeating the prompts by hand with prompt_repeat = 1 is the flat forward that recomputes
    # each prompt G times. Same log-probs and same gradients, ragged prompts and equal ones,
    # completions of every length down to a single token (T = 1 has no completion pass).
    for plens, T in (([3, 10, 6], 9), ([5, 5], 7), ([4, 8], 1), ([7, 2], 2)):
        m = tiny()
        m.train()
        prompts = rand_prompts(plens)
        G = 3
        out = model.generate(m, prompts, G, T, temperature=0.8, stop_ids={1, 2}, pad_id=0, generator=torch.Generator().manual_seed(1))
        weights = torch.randn(out.tokens.shape, generator=torch.Generator().manual_seed(2))
        grads = []
        for grouped in (True, False):
            m.zero_grad(set_to_none=True)
            if grouped:
                lp = model.completion_logprobs(m, prompts, out.tokens, out.lengths, prompt_repeat=G, temperature=0.8)
            else:
                flat = [p for p in prompts for _ in range(G)]
                lp = model.completion_logprobs(m, flat, out.tokens, out.lengths, prompt_repeat=1, temperature=0.8)
            (lp * weights).sum().backward()
            grads.append((lp.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
        (lp_g, g_g), (lp_f, g_f) = grads
        assert torch.allclose(lp_g, lp_f, atol=1e-5), (plens, T, (lp_g - lp_f).abs().max())
        assert torch.allclose(lp_g, out.logprobs, atol=1e-5)  # and both equal the sampler's
        for k in g_f:
            assert torch.allclose(g_g[k], g_f[k], atol=1e-5, rtol=1e-4), (plens, T, k, (g_g[k] - g_f[k]).abs().max())


def test_grouped_completion_logprobs_under_grad_checkpoint_and_no_grad():
    m = tiny()
    prompts = rand_prompts([4, 9])
    out = model.generate(m, prompts, 2, 6, stop_ids=(), pad_id=0, generator=torch.Generator().manual_seed(0))
    ref = model.completion_logprobs(m, prompts, out.tokens, out.lengths, prompt_repeat=2)
    m.grad_checkpoint = True  # falls back to the flat forward, which checkpointing recomputes
    assert torch.allclose(model.completion_logprobs(m, prompts, out.tokens, out.lengths, prompt_repeat=2), ref, atol=1e-5)
    with torch.no_grad():  # the reference policy's log-probs (beta > 0) take the grouped path too
        assert torch.allclose(model.completion_logprobs(m, prompts, out.tokens, out.lengths, prompt_repeat=2), ref, atol=1e-5)


def test_gradients_are_the_same_from_call_to_call_on_two_threads():
    """The grouped forward picks each completion's prompt rows with index_select. The gradient of x[rows], with
    rows repeated and out of order (rows sorted by length), is summed in an order that changes from call to call
    when CPU threads share the work: a default run on 2 threads gave other numbers every time, from its 2nd
    iteration on. Completions of many lengths, so that sorted by length the prompts' rows interleave; the toy's
    width and 16 x 8 rows, so that the work is split between threads (10 calls in 10 differed before)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = tiny(n_layer=1, n_embd=128, intermediate_size=384)
        prompts = rand_prompts([20 + (7 * i) % 20 for i in range(16)])
        g = torch.Generator().manual_seed(0)
        tokens, lengths = torch.randint(0, V, (128, 24), generator=g), torch.randint(1, 25, (128,), generator=g)
        weights = torch.randn(tokens.shape, generator=g)

        def grads():
            m.zero_grad(set_to_none=True)
            (model.completion_logprobs(m, prompts, tokens, lengths, prompt_repeat=8) * weights).sum().backward()
            return [p.grad.clone() for p in m.parameters()]
        first = grads()
        for _ in range(10):
            assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    finally:
        torch.set_num_threads(threads)


def test_embed_is_each_sequence_alone():
    # padded to the longest, a repeated sequence among them: still the mean hidden state of each
    # sequence run by itself
    m = tiny()
    seqs = rand_prompts([3, 9, 5, 2, 4])
    seqs.insert(2, list(seqs[0]))
    e = model.embed(m, seqs)
    assert e.shape == (6, 32)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            h = m.hidden_states(torch.tensor([s]))[0]
        assert torch.allclose(e[i], h.mean(0), atol=1e-5)


# ----------------------------------------------------------------------------- vs transformers

def hf_model(kind, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0)).eval()
    rope = None
    if kind == "llama3":  # a small original context so that the scaling changes these positions
        rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)
    return LlamaForCausalLM(LlamaConfig(**common, rope_theta=500000.0, rope_scaling=rope)).eval()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", False), ("llama3", True)])
def test_load_hf_matches_transformers(tmp_path, kind, tie):
    ref = hf_model(kind, tie)
    ref.save_pretrained(tmp_path)
    m, tok = hf.load_hf(str(tmp_path), device="cpu")
    assert tok is None and m.config.tie_embeddings == tie and m.config.qkv_bias == (kind == "qwen2")
    x = torch.tensor(rand_prompts([40, 40]))
    with torch.no_grad():
        assert torch.allclose(m(x)[0], ref(x).logits, atol=1e-4)
    prompt = x[:1, :7]
    with torch.no_grad():
        theirs = ref.generate(prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt))
    ours = model.generate(m, prompt.tolist(), 1, 10, temperature=0, stop_ids=(), pad_id=0)
    assert ours.tokens[0].tolist() == theirs[0, 7:].tolist()


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, tie_embeddings=True),
                                dict(rope_theta=500000.0, rope_scaling=dict(
                                    rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=16))])
def test_save_hf_loads_in_transformers(tmp_path, kw):
    from transformers import AutoModelForCausalLM
    tok = tokenizer_lib.byte_tokenizer(["<|answer|>"]) if not kw else None
    m = tiny(**kw, vocab_size=tok.vocab_size if tok else V)
    hf.save_hf(m, tok, str(tmp_path))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.tensor(rand_prompts([30, 30]))
    with torch.no_grad():
        assert torch.allclose(m(x)[0], ref(x).logits, atol=1e-4)
    back, tok2 = hf.load_hf(str(tmp_path), device="cpu")
    with torch.no_grad():
        assert torch.equal(back(x)[0], m(x)[0])
    if tok is not None:  # the byte tokenizer round-trips through tokenizer.model + tokenizer_config.json
        s = "x <|answer|> é"
        assert tok2.encode(s, special=True) == tok.encode(s, special=True)
        assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.stop_ids) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids)


def test_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    m = tiny()
    hf.save_hf(m, None, str(tmp_path))
    tensors = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, tmp_path / f)
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    back, _ = hf.load_hf(str(tmp_path), device="cpu")
    x = torch.tensor(rand_prompts([12]))
    with torch.no_grad():
        assert torch.equal(back(x)[0], m(x)[0])
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        hf.load_hf(str(tmp_path), device="cpu")


def test_broken_checkpoints_give_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(str(tmp_path))
    hf.save_hf(tiny(), None, str(tmp_path))
    weights = tmp_path / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[:len(full) // 2])  # truncated download
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        hf.load_hf(str(tmp_path))
    weights.write_bytes(full)
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_hf(str(tmp_path))
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        hf.load_hf(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*'llama'.*'qwen2'"):
        hf.load_hf(str(tmp_path))
    # values of the wrong type or shape: named with the file, before a model is built (not mid-run, from inside it)
    llama3 = dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=16))
    assert hf.config_from_hf(config | llama3).rope_scaling["factor"] == 8.0  # what the odd ones below spoil
    for odd, named in [(dict(rms_norm_eps=None), "norm_eps=None"), (dict(hidden_size="32"), "n_embd='32'"),
                       (dict(num_key_value_heads=3), "num_key_value_heads 3"), (dict(rope_theta="x"), "rope_theta='x'"),
                       (dict(rope_scaling=dict(rope_type="llama3")), "rope_scaling.factor=None"),
                       (dict(num_hidden_layers=0), "n_layer=0")]:
        with pytest.raises(ValueError, match=f"config.json: values this model cannot be built from: .*{re.escape(named)}"):
            hf.config_from_hf(config | odd)


def test_load_hf_keeps_a_stored_lm_head_that_differs_as_transformers_does(tmp_path):
    """A config.json that says tie_word_embeddings beside a stored lm_head.weight of other values: transformers
    keeps the stored one, untied (with a warning); so do we, so --init trains the model transformers would load."""
    from transformers import AutoModelForCausalLM
    hf_model("llama", tie=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with pytest.warns(UserWarning, match="loaded untied"):
        ours, _ = hf.load_hf(str(tmp_path), device="cpu")
    x = torch.tensor(rand_prompts([20, 20]))
    with torch.no_grad():
        assert not ours.config.tie_embeddings and torch.allclose(ours(x)[0], ref(x).logits, atol=1e-4)


def test_bf16_keeps_rotary_tables_fp32_and_matches_transformers_past_1000():
    """Llama-3.2-1B's rotary settings (θ = 500000, llama3 scaling 32): our bf16 logits at positions 1000-1099
    equal transformers' bf16 logits. With bf16-rounded frequencies they differ by ~5."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import tempfile
    torch.manual_seed(0)
    rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=rope,
                      initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        ref = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        ours, _ = hf.load_hf(d, device="cpu", dtype=torch.bfloat16)
    assert ours.inv_freq.dtype == torch.float32 and ours.lm_head.weight.dtype == torch.bfloat16
    assert model.Transformer(ours.config).to(torch.bfloat16).inv_freq.dtype == torch.float32  # any .to()
    x = torch.randint(0, V, (1, 1100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x)[0][0, 1000:] - ref(x).logits[0, 1000:].float()).abs().max()
    assert diff < 1e-2


# ----------------------------------------------------------------------------- tokenizers

MARKERS = ["<|request|>", "<|answer|>", "<|feedback|>", "<|improve|>", "<|diverge|>"]


def test_byte_tokenizer_round_trip_and_markers():
    tok = tokenizer_lib.byte_tokenizer(MARKERS)
    assert tok.vocab_size == 256 + 3 + len(MARKERS)
    for s in ["", "hello world", "naïve café ∑ 日本語 🙂", "a\n\tb  c", "<|answer|> 42 <|eos|>"]:
        ids = tok.encode(s)
        assert all(i < 256 for i in ids)  # plain text never yields a special id
        assert tok.decode(ids) == s
    ids = tok.encode("<|request|>2+2<|answer|>4", special=True)
    assert ids[0] == tok.encode("<|request|>", special=True)[0] >= 256 and len(ids) == 6
    assert tok.decode(ids, special=True) == "<|request|>2+2<|answer|>4"
    assert tok.decode(ids) == "2+24"  # special=False drops special ids
    assert tok.decode([52, tok.eos_id, tok.pad_id, tok.pad_id]) == "4"
    assert tok.decode([52, tok.eos_id, tok.pad_id], special=True) == "4<|eos|>"  # pad is always dropped
    assert tok.stop_ids == {tok.eos_id} and len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    chat = tok.render_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == tok.bos_id and tok.decode(chat) == "user: hi\nassistant: "


def train_bpe_ranks(text: bytes, merges: int) -> dict[bytes, int]:
    """A few BPE merges learnt from text: a valid tiktoken rank table, built offline."""
    ranks = {bytes([i]): i for i in range(256)}
    words = [[bytes([b]) for b in w] for w in text.split(b" ")]
    for _ in range(merges):
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[a + b] = counts.get(a + b, 0) + 1
        if not counts:
            break
        best = max(counts, key=counts.get)
        ranks[best] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] + w[i + 1] == best:
                    w[i:i + 2] = [best]
                i += 1
    return ranks


def test_llama3_tiktoken_file(tmp_path):
    import tiktoken
    text = b"the quick brown fox jumps over the lazy dog while the other fox sleeps " * 3
    text += "naïve café 123 4567 they're".encode()
    ranks = train_bpe_ranks(text, 200)
    assert len(ranks) > 280
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = hf.load_tokenizer(str(tmp_path))  # no tokenizer_config.json: Meta's special tokens
    # Meta's pattern (llama3's tokenizer.py), written out here: hf.LLAMA3_PAT is what is under test
    meta_pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    ref = tiktoken.Encoding("ref", pat_str=meta_pat, mergeable_ranks=ranks, special_tokens={})
    for s in ["the quick brown fox", "The lazy dog's 12345 naïve café!\n\n  ok", "<|eot_id|> x 日本"]:
        assert tok.encode(s) == ref.encode(s, disallowed_special=()) and tok.decode(tok.encode(s)) == s
    n = len(ranks)
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    eot = n + 9  # Meta's numbering: <|eot_id|> is 128009 after 128000 ranks
    assert eot in tok.stop_ids and tok.encode("<|eot_id|>", special=True) == [eot]
    chat = tok.render_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == tok.bos_id and eot in chat
    assert tok.decode(chat, special=True) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi"
                                              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # with a tokenizer_config.json (as in HF repos) the special tokens and eos come from it
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(n): {"content": "<|begin_of_text|>"}, str(n + 1): {"content": "<|eot_id|>"},
                                 str(n + 2): {"content": "<|end_of_text|>"}},
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    tok = hf.load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 1) and tok.stop_ids == {n + 1, n + 2}


def test_hf_tokenizer_backend(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hello world, the quick brown fox"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(tmp_path)
    tok = hf.load_tokenizer(str(tmp_path))
    assert isinstance(tok, hf.HFTokenizer)
    s = "hello <|im_end|> wörld"
    assert tok.eos_id not in tok.encode(s) and tok.decode(tok.encode(s)) == s
    assert tok.eos_id in tok.encode(s, special=True)
    assert tok.eos_id in tok.stop_ids and tok.pad_id == fast.pad_token_id
    chat = tok.render_chat([{"role": "user", "content": "hello"}])
    assert tok.decode(chat, special=True) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_hf_tokenizer_without_its_vocabulary_is_refused(tmp_path):
    # transformers loads a LlamaTokenizer from tokenizer_config.json alone (3 tokens) and encodes text to nothing
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(ValueError, match="cannot encode plain text.*tokenizer.model"):
        hf.load_tokenizer(str(tmp_path))


# ===============================================================================================
# buffer.py: the task buffer against the rules of the paper's §4.1 (METHOD.md)
# ===============================================================================================

def make(capacity=8, min_size=1, replay_prob=0.5, kappa=10.0, **kw):
    return TaskBuffer(capacity, min_size, replay_prob, kappa, **kw)


def put(buf, name, score, depth=0, base="b0", parent=None):
    """Insert a one-turn history whose content is `name`."""
    return buf.insert(base, {"q": base}, [{"answer": name, "feedback": None}], depth, score, parent)


# --- learnability and probabilities ---------------------------------------------------------


def test_learnability_is_population_variance():
    assert learnability([0, 1, 0, 1]) == pytest.approx(0.25)          # p(1-p), not 0.333 (ddof=1)
    assert learnability([1, 1, 1, 0, 0]) == pytest.approx(0.6 * 0.4)
    assert learnability([1, 1, 1]) == 0.0 and learnability([0.0]) == 0.0
    assert learnability([0.2, 0.4]) == pytest.approx(0.01)
    assert isinstance(learnability(np.array([0, 1])), float)
    with pytest.raises(ValueError):
        learnability([])


def test_softmax_probs_match_hand_formula():
    s, kappa = [0.0, 0.1, 0.25, 0.1], 10.0
    w = [math.exp(kappa * x) for x in s]
    expected = [x / sum(w) for x in w]
    p = sampling_probs(s, kappa)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(sampling_probs(s, 0.0), [0.25] * 4)     # κ = 0: uniform


def test_large_kappa_concentrates_without_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # an overflow warning fails
        p = sampling_probs([0.1, 0.25, 0.2], 1e4)
        tied = sampling_probs([0.25, 0.1, 0.25], 1e6)
    assert np.all(np.isfinite(p)) and p[1] == pytest.approx(1.0) and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(tied, [0.5, 0.0, 0.5], atol=1e-12)


def test_a_buffer_saved_with_the_old_clock_loads():
    """Checkpoints from before PLR's staleness left carry its clock and the entries' stamps: dropped on load."""
    buf = make(seed=3)
    put(buf, "a", 0.1), put(buf, "b", 0.2)
    buf.sample(2)
    d = buf.state_dict()
    old = dict(d, clock=4, gate_calls=7, gate_replays=3,
               entries=[dict(e, inserted_at=0, last_sampled=2) for e in d["entries"]])
    new = make()
    new.load_state_dict(old)
    assert new.state_dict() == d and new.sample(3) == buf.sample(3)


def test_sampling_frequencies_match_probs():
    buf = make(kappa=10.0, seed=0)
    scores = [0.25, 0.0, 0.2, 0.05, 0.1]  # not in score order: each entry is drawn by its own score
    for i, sc in enumerate(scores):
        put(buf, f"x{i}", sc)
    p, n = np.exp(10.0 * np.array(scores)) / np.exp(10.0 * np.array(scores)).sum(), 40_000  # P(i) by hand, uid order
    uids = [e.uid for e in buf.sample(n)]
    counts = np.bincount(uids, minlength=5)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4 * sigma), (counts, n * p)
    assert abs(counts[0] - n / 5) > 10 * np.sqrt(n * 0.2 * 0.8)       # and it is not uniform


# --- insertion, capacity, de-duplication ----------------------------------------------------


def test_eviction_at_capacity_with_ties():
    buf = make(capacity=3)
    for content, score in (("a", 0.1), ("b", 0.2), ("c", 0.1)):
        assert put(buf, content, score) is not None
    assert put(buf, "d", 0.05) is None                                 # below the minimum: rejected
    assert [e.uid for e in buf.entries.values()] == [0, 1, 2]
    e3 = put(buf, "e", 0.1)                                            # equal to the min: enters,
    assert e3 is not None and set(buf.entries) == {1, 2, 3}            # evicting the oldest min (0)
    put(buf, "f", 0.1)
    assert set(buf.entries) == {1, 3, 4}                               # next oldest min (2) goes
    put(buf, "g", 0.3)
    assert set(buf.entries) == {1, 4, 5} and len(buf) == 3
    assert put(buf, "a", 0.3) is not None                              # evicted content may return


def test_inheritance_and_score_update():
    buf = make()
    root = put(buf, "first", 0.1, depth=0)
    (drawn,) = buf.sample()
    assert drawn is root
    S = learnability([0, 1, 1, 0])
    buf.update_score(root.uid, S)                                      # fresh S for the parent
    child = put(buf, "better", S, depth=1, parent=root.uid)           # the child inherits it
    assert root.score == child.score == 0.25 and child.parent == root.uid and child.depth == 1
    buf.update_score(12345, 0.2)                                       # unknown/evicted uid: no-op
    assert [e.score for e in buf.entries.values()] == [0.25, 0.25]


def test_deduplication_measured_scores_win_over_inherited():
    """The score rule: a duplicate's inherited guess replaces a guess (the newest wins, up or down), never a
    measurement; only a newer measurement (update_score) replaces a measured score."""
    buf = make()
    a = buf.insert("b0", {}, [{"answer": "x", "feedback": None}], 0, 0.1)
    same = buf.insert("b0", {}, [{"feedback": None, "answer": "x"}], 2, 0.2, parent=7)
    assert same is a and len(buf) == 1 and a.score == 0.2 and not a.measured  # newest guess
    assert a.depth == 0 and a.parent is None                           # original lineage kept
    buf.insert("b0", {}, [{"answer": "x", "feedback": None}], 0, 0.05)
    assert a.score == 0.05                                             # a guess may go down too
    buf.update_score(a.uid, 0.0)
    assert a.score == 0.0 and a.measured                               # measured: never solved half the time
    buf.insert("b0", {}, [{"answer": "x", "feedback": None}], 1, 0.25)
    assert a.score == 0.0                                              # a guess never overwrites it
    buf.update_score(a.uid, 0.1875)
    assert a.score == 0.1875                                           # a newer measurement does
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert restored.entries[a.uid].measured                            # the kind of score round-trips
    buf.insert("b1", {}, [{"answer": "x", "feedback": None}], 0, 0.1)  # other base task: distinct
    assert len(buf) == 2
    full = make(capacity=2)
    put(full, "p", 0.1), put(full, "q", 0.2)
    assert put(full, "p", 0.3).uid == 0 and set(full.entries) == {0, 1}  # dup never evicts


def test_multi_turn_prefixes():
    buf = make()
    turns = [{"answer": f"t{i}", "feedback": None} for i in range(3)]
    got = buf.insert_history("b0", {"q": 1}, turns, [0, 1, 2], 0.2, parent=None)
    assert [len(e.turns) for e in got] == [1, 2, 3] and [e.depth for e in got] == [0, 1, 2]
    assert all(e.turns == turns[:i + 1] and e.score == 0.2 for i, e in enumerate(got))
    more = turns + [{"answer": "t3", "feedback": "err"}]
    again = buf.insert_history("b0", {"q": 1}, more, [0, 1, 2, 0], 0.1)
    assert len(buf) == 4 and again[:3] == got                          # shared prefixes deduped
    with pytest.raises(ValueError, match="depths"):
        buf.insert_history("b0", {}, turns, [0, 1], 0.1)


def test_entry_stores_a_copy_of_the_history():
    buf = make()
    turns = [{"answer": "x", "feedback": None}]
    e = buf.insert("b0", {"q": 1}, turns, 0, 0.1)
    turns[0]["answer"] = "changed"
    assert e.turns == [{"answer": "x", "feedback": None}]


def test_fifo_admission_is_blind_to_learnability():
    """The control of admission="fifo": when full, every newcomer enters and the oldest entry leaves, whatever
    the scores (the paper's top-N rule would have kept the 0.25 entries and refused the 0.0 newcomer)."""
    top, fifo = make(capacity=2), make(capacity=2, admission="fifo")
    for buf in (top, fifo):
        put(buf, "a", 0.25), put(buf, "b", 0.25)
    assert put(top, "c", 0.0) is None and [e.turns[0]["answer"] for e in top.entries.values()] == ["a", "b"]
    assert put(fifo, "c", 0.0).uid == 2 and [e.turns[0]["answer"] for e in fifo.entries.values()] == ["b", "c"]
    restored = make(capacity=2)
    restored.load_state_dict(json.loads(json.dumps(fifo.state_dict())))
    assert restored.admission == "fifo"
    with pytest.raises(ValueError, match="admission"):
        make(admission="lifo")
    with pytest.raises(ValueError, match="admission must be"):
        runs.parse_args(["--admission=lifo"])


def test_a_fresh_base_task_already_buffered_gets_its_fresh_score(tmp_path):
    """Paper §4.1: the instance m' itself gets its fresh empirical S (not max(old, new))."""
    tr = runs.prepare(tiny_cfg(tmp_path, method="curriculum"), quiet=True)
    p = tr.train_pool[0]
    e = tr.buffer.insert(p.id, dataclasses.asdict(p), [], 0, 0.25)
    inst = exit_lib.Instance(problem=p, answer=None, mode="base", depth=0, uid=None, replay=False)
    tr.update_buffer([inst], [["x"]] * 4, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert tr.buffer.entries[e.uid].score == pytest.approx(0.1875)  # var(1, 1, 1, 0) = 3/16


def test_a_fresh_base_task_is_measured_and_parents_its_children(tmp_path):
    tr = runs.prepare(tiny_cfg(tmp_path, method="improve"), quiet=True)
    p = tr.train_pool[0]
    fresh = lambda: exit_lib.Instance(problem=p, answer=None, mode="base", depth=0, uid=None, replay=False)
    tr.update_buffer([fresh()], [["a"], ["b"], ["c"], ["d"]], torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    (root,) = [e for e in tr.buffer.entries.values() if not e.turns]
    assert root.score == pytest.approx(3 / 16) and root.measured  # var(1, 0, 0, 0) = 3/16, its own
    kids = [e for e in tr.buffer.entries.values() if e.turns]
    assert len(kids) == 4 and all(e.parent == root.uid and e.depth == 1 and not e.measured
                                  and e.score == pytest.approx(3 / 16) for e in kids)
    tr.buffer.update_score(root.uid, 0.0)  # measured, as a replay would
    tr.update_buffer([fresh()], [["a"]] * 4, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert root.score == pytest.approx(0.25)  # drawn fresh again: the newest measurement


def test_a_measured_score_survives_reinsertion_single_turn(tmp_path):
    """A replayed instance measured at S = 0 (always solved) stays at 0 when a later group produces the
    same answer again and its child inherits that group's S = 0.25."""
    tr = runs.prepare(tiny_cfg(tmp_path, method="improve", group_size=2), quiet=True)
    p = tr.train_pool[0]
    e = tr.buffer.insert(p.id, dataclasses.asdict(p), [dict(answer="x", feedback=tr.family.feedback(p, "x"))], 1, 0.25)
    replayed = exit_lib.Instance(problem=p, turn=0, prev=[], answer="x", mode="improve", depth=1, uid=e.uid, replay=True)
    tr.update_buffer([replayed], [["y"], ["y"]], torch.tensor([[1.0, 1.0]]))
    assert e.score == 0.0 and e.measured
    fresh = exit_lib.Instance(problem=p, turn=0, prev=[], answer=None, mode="base", depth=0, uid=None, replay=False)
    tr.update_buffer([fresh], [["x"], ["z"]], torch.tensor([[1.0, 0.0]]))  # "x" again, from a group with S = 0.25
    assert e.score == 0.0
    assert tr.buffer.stats()["measured"] > 0


def test_a_measured_score_survives_reinsertion_multi_turn(tmp_path):
    """An expansion from turn 0 re-inserts every turn prefix of its rows' episodes: a one-turn prefix measured
    at 0 that a row plays again is the same instance (not stored twice), and keeps its 0 while the group's
    new prefixes inherit the group's 0.25."""
    tr = tools_trainer(tmp_path, min_size=1, method="improve", group_size=2, tasks_per_iter=1)
    fam, ep = tr.family, episode([3, 0, 5], "a>b2", "-c9", "a=4")
    a0 = "wd a 2;dep b 2;done"
    turn0 = dict(answer=a0, feedback=fam.feedback(fam.turn_problem(ep, 0, [a0]), a0), depth=1)
    (first,) = tr.buffer.insert_history(ep.id, dataclasses.asdict(ep), [turn0], [1], 0.1)
    tr.buffer.update_score(first.uid, 0.0)
    fresh = exit_lib.Instance(problem=ep, turn=0, prev=[], answer=None, mode="base", depth=0, uid=None, replay=False)
    answers = [[a0, "wd c 9;done", "set a 4;done"], ["err", "err", "set a 4;done"]]
    tr.update_buffer([fresh], answers, torch.tensor([[1.0, 0.0]]))
    mine = [e for e in tr.buffer.entries.values() if e.base_id == ep.id and e.turns]
    assert [e for e in mine if [h["answer"] for h in e.turns] == [a0]] == [first]
    assert first.score == 0.0 and first.measured
    assert len(mine) == 6 and all(e.score == 0.25 for e in mine if e is not first)  # 2 rows x 3 prefixes


def test_multi_turn_deduplication_keys_on_content_not_depth(tmp_path):
    buf = make()
    a = buf.insert_history("b0", {}, [dict(answer="x", depth=1), dict(answer="y", depth=1)], [1, 1], 0.1)
    b = buf.insert_history("b0", {}, [dict(answer="x", depth=1), dict(answer="y", depth=2)], [1, 2], 0.2)
    assert len(buf) == 2 and b == a and a[1].depth == 1     # same answers: the same instance, lineage kept
    # through the trainer: a replayed history whose turn-0 answer the policy repeats unchanged
    tr = tools_trainer(tmp_path, min_size=1, method="improve", group_size=2, tasks_per_iter=1)
    ep = episode([3, 0, 5], "a>b2")
    fb = tr.family.feedback(tr.family.turn_problem(ep, 0, []), "dep a 1;done")
    (e,) = tr.buffer.insert_history(ep.id, dataclasses.asdict(ep), [dict(answer="dep a 1;done", feedback=fb, depth=2)],
                                    [2], 0.1)
    inst = exit_lib.Instance(problem=ep, turn=0, prev=[], answer="dep a 1;done", mode="improve", depth=2, uid=e.uid, replay=True)
    tr.update_buffer([inst], [["dep a 1;done"], ["wd a 3;done"]], torch.tensor([[1.0, 0.0]]))
    assert sorted(x.turns[0]["answer"] for x in tr.buffer.entries.values()) == ["dep a 1;done", "wd a 3;done"]


def test_replaying_a_later_turn_does_not_rescore_the_history_it_was_given(tmp_path):
    """A replayed instance at turn t > 0 was given turns 0..t-1; its group says nothing about them. An untried
    ancestor prefix keeps its own (inherited) score; only the prefixes from turn t on are this group's children."""
    tr = tools_trainer(tmp_path, min_size=1, method="improve", group_size=2, tasks_per_iter=1)
    ep = episode([3, 0, 5], "a>b2", "-c9", "a=4")
    hist = [dict(answer="wd a 2;dep b 2;done", feedback=None, depth=1), dict(answer="wd c 9;done", feedback=None, depth=1)]
    first, second = tr.buffer.insert_history(ep.id, dataclasses.asdict(ep), hist, [1, 1], 0.1)
    inst = exit_lib.Instance(problem=ep, turn=1, prev=hist[:1], answer=hist[1]["answer"], mode="improve", depth=1,
                             uid=second.uid, replay=True)
    tr.update_buffer([inst], [[hist[0]["answer"], "err", "set a 4;done"]] * 2, torch.tensor([[1.0, 0.0]]))
    assert first.score == 0.1 and not first.measured          # the given history: untouched
    kids = [e for e in tr.buffer.entries.values() if e.parent == second.uid]
    assert kids and {len(e.turns) for e in kids} == {2, 3} and all(e.score == 0.25 for e in kids)


# --- replay gate ------------------------------------------------------------------------------


def test_replay_gate_respects_min_size_and_p():
    buf = make(capacity=10, min_size=3, replay_prob=1.0)
    put(buf, "a", 0.1), put(buf, "b", 0.1)
    assert not any(buf.should_replay() for _ in range(200))            # below B_min: never
    put(buf, "c", 0.1)
    assert all(buf.should_replay() for _ in range(200))
    buf = make(capacity=10, min_size=1, replay_prob=0.3, seed=1)
    put(buf, "a", 0.1)
    n = 20_000
    k = sum(buf.should_replay() for _ in range(n))
    assert abs(k - 0.3 * n) <= 4 * math.sqrt(n * 0.3 * 0.7)
    assert make(replay_prob=0.0).should_replay() is False


def test_gate_consumes_one_uniform_per_call():
    buf = make(min_size=1, replay_prob=0.5, seed=5)
    ref = np.random.default_rng(5)
    for i in range(50):                                                # empty at first, then not
        if i == 25:
            put(buf, "a", 0.1)
        u = ref.random()                                               # drawn even while empty
        assert buf.should_replay() == (len(buf) >= 1 and u < 0.5)
    assert buf.rng.bit_generator.state == ref.bit_generator.state


# --- stats and checkpoints ----------------------------------------------------------------------


def test_stats():
    buf = make(kappa=0.0)
    assert buf.stats()["size"] == 0 and buf.stats()["entropy"] == 0.0
    put(buf, "a", 0.1, depth=0, base="p"), put(buf, "b", 0.2, depth=0, base="p")
    put(buf, "c", 0.3, depth=1, base="q")
    st = buf.stats()
    assert st["size"] == 3 and st["distinct"] == 2 and st["depth_hist"] == {0: 2, 1: 1}
    assert st["depth"] == pytest.approx(1 / 3) and st["measured"] == 0.0  # the mean depth; no score measured yet
    assert st["score_mean"] == pytest.approx(0.2) and st["score_max"] == pytest.approx(0.3)
    assert st["entropy"] == pytest.approx(math.log(3))                 # κ = 0: uniform
    buf.kappa = 10.0
    p = sampling_probs([0.1, 0.2, 0.3], 10.0)
    assert buf.stats()["entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert all(isinstance(v, (int, float, dict)) for v in st.values())
    buf.update_score(next(iter(buf.entries)), 0.2)
    assert buf.stats()["measured"] == pytest.approx(1 / 3)


def test_state_dict_round_trip_is_exact():
    buf = make(capacity=5, min_size=2, kappa=7.0, seed=11)
    for i in range(8):
        buf.insert_history(f"b{i % 3}", {"q": i}, [{"answer": f"a{i}"}, {"answer": f"z{i}"}],
                           [0, 1], 0.02 * i + 0.1 / 3)
        buf.should_replay()
        buf.sample(2)
    live = buf.state_dict()
    live["entries"][0]["turns"][0]["answer"] = "changed"              # state_dict copied the entries
    assert buf.entries[live["entries"][0]["uid"]].turns[0]["answer"] != "changed"
    state = json.loads(json.dumps(buf.state_dict()))                  # plain JSON types only
    fresh = make(capacity=1, kappa=0.0, seed=999)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == buf.state_dict()
    state["entries"][0]["score"] = -1.0                                # load copied the state
    assert fresh.entries[state["entries"][0]["uid"]].score != -1.0
    for _ in range(20):
        assert fresh.should_replay() == buf.should_replay()
        assert [e.uid for e in fresh.sample(3)] == [e.uid for e in buf.sample(3)]
        np.testing.assert_array_equal(fresh.probs(), buf.probs())
    assert put(fresh, "new", 1.0).uid == put(buf, "new", 1.0).uid
    assert fresh.stats() == buf.stats()


def test_a_buffer_saved_with_plr_extensions_loads_only_if_they_were_off():
    """PLR's rank weights and staleness mixing left the code (no result used them; the paper neither): a
    checkpoint saved before, with them off, still loads; one that used them is a clear error."""
    buf = make(capacity=4, seed=2)
    put(buf, "a", 0.1)
    state = buf.state_dict()
    state["config"].update(rank_temperature=None, staleness_coef=0.0)
    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == buf.state_dict()
    state["config"]["staleness_coef"] = 0.3
    with pytest.raises(ValueError, match="staleness_coef=0.3, which this version no longer has"):
        make().load_state_dict(state)


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw, exc, name", [
    (dict(capacity=0), ValueError, "capacity"),
    (dict(capacity=2.5), TypeError, "capacity"),
    (dict(capacity=True), TypeError, "capacity"),
    (dict(min_size=9), ValueError, "min_size"),                        # B_min > N
    (dict(min_size=0), ValueError, "min_size"),
    (dict(replay_prob=1.5), ValueError, "replay_prob"),
    (dict(replay_prob=-0.1), ValueError, "replay_prob"),
    (dict(replay_prob="0.5"), TypeError, "replay_prob"),
    (dict(kappa=-1.0), ValueError, "kappa"),
    (dict(kappa=float("nan")), ValueError, "kappa"),
    (dict(kappa=None), TypeError, "kappa"),
    (dict(seed=1.0), TypeError, "seed"),
])
def test_bad_constructor_arguments(kw, exc, name):
    with pytest.raises(exc, match=name):
        make(**kw)


def test_bad_insert_arguments():
    buf = make()
    with pytest.raises(TypeError, match="turns"):
        buf.insert("b0", {}, [{"answer": object()}], 0, 0.1)
    with pytest.raises(TypeError, match="task"):
        buf.insert("b0", {"x": object()}, [{"answer": "a"}], 0, 0.1)
    with pytest.raises(TypeError, match="base_id"):
        buf.insert(3, {}, [{"answer": "a"}], 0, 0.1)
    with pytest.raises(ValueError, match="score"):
        buf.insert("b0", {}, [{"answer": "a"}], 0, float("nan"))
    with pytest.raises(ValueError, match="empty"):
        buf.sample()
    assert len(buf) == 0 and buffer.Entry is type(put(buf, "a", 0.1))


# ===============================================================================================
# eval.py: K-step evaluation, comparison tables, plots, the ladder
# ===============================================================================================

PNG = b"\x89PNG\r\n\x1a\n"


# ---- the K-step bookkeeping, on hand-made chains

def test_summarise_and_net_corrections_by_hand():
    # 4 chains (columns) over K = 3 improve steps (rows k = 0..3); 1 = right, 0 = wrong
    scores = np.array([[1, 0, 0, 1],
                       [1, 1, 0, 0],    # chain 1 fixed (+1), chain 3 broken (-1): net 0
                       [0, 1, 1, 0],    # chain 0 broken (-1), chain 2 fixed (+1): net 0
                       [1, 1, 1, 1]],   # chains 0 and 3 fixed: +2
                      dtype=float)
    res = eval_lib.summarise(scores, difficulties=[2, 2, 5, 5], binary=True)
    assert res["score"] == [0.5, 0.5, 0.5, 1.0] and res["solved"] == [0.5, 0.5, 0.5, 1.0]
    assert res["K"] == 3 and res["n"] == 4 and res["delta"] == 0.5
    assert res["net_corrections"] == [0.0, 0.0, 0.0, 0.5]  # cumulative, as a fraction of the 4 chains
    assert res["by_difficulty"] == {"2": [0.5, 1.0, 0.5, 1.0], "5": [0.5, 0.0, 0.5, 1.0]}
    # a graded family has no net corrections; "solved" counts only full scores
    graded = eval_lib.summarise(np.array([[0.5, 1.0], [0.75, 1.0]]), [1, 1], binary=False)
    assert "net_corrections" not in graded and graded["solved"] == [0.5, 0.5] and graded["delta"] == 0.125


def test_truncate_equals_a_shorter_evaluation():
    rng = np.random.default_rng(0)
    scores = (rng.random((6, 10)) < 0.5).astype(float)
    diffs = [2, 3] * 5
    full = eval_lib.summarise(scores, diffs, binary=True)
    cut = report.truncate(full, 2)
    assert cut == eval_lib.summarise(scores[:3], diffs, binary=True)
    with pytest.raises(ValueError, match="--recompute"):
        report.truncate(full, 6)


def test_mean_std_and_smooth():
    assert report.mean_std([0.2, 0.4]) == pytest.approx([0.3, 0.1 * 2 ** 0.5])  # sample std (n - 1)
    assert report.mean_std([0.7]) == [0.7, 0.0]
    y = report.smooth([1.0, None, 3.0, 5.0], window=2)  # missing values are skipped, not zeros
    assert np.allclose(y, [1.0, 1.0, 3.0, 4.0])
    assert np.isnan(report.smooth([None, None], 3)).all()


def test_evaluate_policy_shapes_on_a_tiny_random_policy():
    torch.manual_seed(0)
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                                intermediate_size=64, max_seq_len=256)
    policy = model_lib.Transformer(cfg).train()
    family = tasks_lib.get_family("math")
    res = eval_lib.evaluate_policy(policy, tok, family, n_problems=3, K=2, n_samples=2, max_new_tokens=8)
    assert res["K"] == 2 and res["n"] == 6  # problems x samples chains
    for key in ("score", "solved", "net_corrections"):
        assert len(res[key]) == 3  # k = 0..K
    assert res["net_corrections"][0] == 0.0 and all(0 <= s <= 1 for s in res["score"])
    # the held-out set spreads 3 problems over the easiest difficulties of train + held-out
    assert set(res["by_difficulty"]) == {"2", "3", "4"}
    assert policy.training  # the caller's train/eval mode is restored


def test_transition_rates_by_hand():
    # 4 chains over 3 steps: k=0 right for chains 0,1; k=1: 0 stays, 1 breaks, 2 fixed, 3 stays wrong
    correct = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=bool)
    fix, brk = eval_lib.transition_rates(correct)
    assert fix == [0.5, 1.0] and brk == [0.5, 0.0]
    res = eval_lib.summarise(correct.astype(float), [2, 2, 3, 3], binary=True)
    assert res["fix_rate"] == fix and res["break_rate"] == brk
    assert eval_lib.transition_rates(np.ones((2, 3), dtype=bool)) == ([None], [0.0])
    # the printed means: each rate over the steps it is defined at (no chain right before k = 2: no break rate)
    correct = np.array([[0, 0], [0, 0], [1, 0], [1, 1]], dtype=bool)
    res = eval_lib.summarise(correct.astype(float), [2, 2], binary=True)
    assert (res["fix_rate"], res["break_rate"]) == ([0.0, 0.5, 1.0], [None, None, 0.0])
    assert "P(fix|wrong) 0.50  P(break|right) 0.000" in eval_lib.summary_table({"base": res})


# ---- the comparison table, from saved eval.json + config.json + log.jsonl

def fake_eval(s0, sK, K=2):
    """An evaluation whose score goes linearly from s0 to sK (binary family: net corrections too)."""
    score = list(np.linspace(s0, sK, K + 1))
    return dict(score=score, solved=score, delta=sK - s0, K=K, n=4, net_corrections=[x - s0 for x in score],
                by_difficulty={"2": score})


def write_run(folder, method, seed, policy, base, iters=5):
    os.makedirs(folder)
    json.dump(dict(method=method, seed=seed, task="math", eval_k=policy["K"]), open(folder / "config.json", "w"))
    json.dump(dict(policy=policy, base=base), open(folder / "eval.json", "w"))
    with open(folder / "log.jsonl", "w") as f:
        for t in range(iters):
            f.write(json.dumps(dict(iter=t + 1, reward_base=0.1 * t, reward_improve=None if t < 2 else 0.5,
                                    reward_diverge=None, zero_var_frac=0.5, depth=0.1 * t, difficulty=3.0,
                                    buf_score_mean=0.2, buf_distinct=t)) + "\n")


@pytest.fixture
def four_runs(tmp_path):
    """GRPO and ExIt x seeds 0, 1; runs of one seed share one base (the same base evaluation)."""
    base = {0: fake_eval(0.10, 0.08), 1: fake_eval(0.20, 0.20)}
    runs = {("grpo", 0): (0.30, 0.30), ("grpo", 1): (0.40, 0.36),
            ("exit", 0): (0.40, 0.50), ("exit", 1): (0.50, 0.70)}
    for (m, s), (s0, sK) in runs.items():
        write_run(tmp_path / "sweep" / f"{m}-s{s}", m, s, fake_eval(s0, sK), base[s])
    return tmp_path / "sweep"


def test_an_evaluation_at_other_settings_has_a_file_of_its_own(four_runs, monkeypatch):
    run, calls = four_runs / "exit-s0", []  # the run's own evaluation: K = 2
    (run / "ckpt.pt").write_bytes(b"")  # what evaluate_checkpoint would read; it is replaced here

    def evaluate(ck, K=None, temperature=None, **kw):
        calls.append((K, temperature))
        return dict(policy=fake_eval(0.4, 0.6, K=2 if K is None else K), base=None, chain="")
    monkeypatch.setattr(report, "evaluate_checkpoint", evaluate)
    assert report.load_run(str(run), K=1)["policy"]["K"] == 2 and not calls  # eval.json, cut short in the table
    assert report.load_run(str(run), K=4)["policy"]["K"] == 4 and (run / "eval.K4.json").is_file()
    assert report.load_run(str(run), K=4)["policy"]["K"] == 4 and calls == [(4, None)]  # read back, not evaluated again
    report.load_run(str(run), K=4, temperature=0.0)
    report.load_run(str(run), temperature=0.0)  # greedy at the run's own K: not the K = 4 file
    assert calls[1:] == [(4, 0.0), (None, 0.0)] and json.load(open(run / "eval.T0.json"))["policy"]["K"] == 2
    assert json.load(open(run / "eval.K4.T0.json"))["policy"]["K"] == 4
    # an older file at the run's other settings may hold fewer steps than asked: not cut short, evaluated anew
    write_run(four_runs / "long", "exit", 0, fake_eval(0.4, 0.6, K=4), None)
    (four_runs / "long" / "ckpt.pt").write_bytes(b"")
    (four_runs / "long" / "eval.T0.json").write_text(json.dumps(dict(policy=fake_eval(0.4, 0.6, K=2), base=None)))
    assert report.load_run(str(four_runs / "long"), K=3, temperature=0.0)["policy"]["K"] == 3
    assert calls[-1] == (3, 0.0) and (four_runs / "long" / "eval.K3.T0.json").is_file()


def test_comparison_table_from_saved_json_by_hand(four_runs, monkeypatch):
    def no_eval(*a, **k):
        raise AssertionError("eval.json exists: nothing may be recomputed")
    monkeypatch.setattr(report, "evaluate_checkpoint", no_eval)
    runs = sorted(str(p) for p in four_runs.iterdir())
    report.main(runs)  # out defaults to the common parent: the sweep folder
    table = json.load(open(four_runs / "results.json"))
    rows = {r["method"]: r for r in table["rows"]}
    assert [r["method"] for r in table["rows"]] == ["base", "grpo", "exit"]  # the ladder's order
    sd = lambda a, b: abs(a - b) / 2 ** 0.5  # sample std of two numbers
    assert rows["base"]["runs"] == 2  # one base per seed, not one per run
    assert rows["base"]["k0"] == pytest.approx([0.15, sd(0.10, 0.20)])
    assert rows["base"]["delta"] == pytest.approx([-0.01, sd(-0.02, 0.0)])
    assert rows["grpo"]["k0"] == pytest.approx([0.35, sd(0.30, 0.40)])
    assert rows["grpo"]["kK"] == pytest.approx([0.33, sd(0.30, 0.36)])
    assert rows["grpo"]["delta"] == pytest.approx([-0.02, sd(0.0, -0.04)])
    assert rows["exit"]["kK"] == pytest.approx([0.60, sd(0.50, 0.70)])
    assert rows["exit"]["delta"] == pytest.approx([0.15, sd(0.10, 0.20)])
    assert rows["exit"]["net_mean"] == pytest.approx([0.0, 0.075, 0.15])
    assert sorted(r[-1] for r in rows["exit"]["score_runs"]) == pytest.approx([0.50, 0.70])  # each run, for the plot
    # the training curves are the per-iteration mean over seeds; None where nothing was logged
    assert rows["exit"]["curves"]["reward_improve"] == [None, None, 0.5, 0.5, 0.5]
    assert rows["exit"]["curves"]["buf_distinct"] == [0, 1, 2, 3, 4]
    # the table as text, in %, and the same text again from the saved JSON
    text = report.format_table(table)
    assert "ExIt (full)" in text and "60.0 ±" in text and "+15.0 ±" in text and "Δ2" in text
    assert report.format_table(json.load(open(four_runs / "results.json"))) == text
    # the runs of one seed share a base, so they pair: ExIt - GRPO per seed is 0.10, 0.10 at k = 0 and
    # 0.20, 0.34 at k = K; standard error = sample std / sqrt(2)
    assert [(d["a"], d["b"], d["n"]) for d in table["paired"]] == [("exit", "grpo", 2)]
    assert table["paired"][0]["k0"] == pytest.approx([0.10, 0.0], abs=1e-12)
    assert table["paired"][0]["kK"] == pytest.approx([0.27, sd(0.20, 0.34) / 2 ** 0.5])
    assert "ExIt (full) - GRPO" in text and "+27.0 ± 7.0*" in text


def test_eval_py_into_a_folder_it_cannot_write_is_one_line(four_runs, capsys, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", dst)
    monkeypatch.setattr(os, "replace", refuse)  # a read-only folder (root writes anywhere): model.atomic_save's rename
    with pytest.raises(SystemExit) as e:
        report.main([str(p) for p in four_runs.iterdir()] + ["--out", str(four_runs / "cmp")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"error: could not write {four_runs / 'cmp' / 'results.json'} (Permission denied)")


def test_runs_on_other_bases_count_a_base_each(four_runs):
    """Base rows: one per distinct warm start, as BASE_KEYS tell them apart (here --warm_pack, which
    trains another base); a setting left at its off value keeps the key of a run made before it existed."""
    def set_cfg(run, **kw):
        cfg = json.load(open(four_runs / run / "config.json"))
        json.dump({**cfg, **kw}, open(four_runs / run / "config.json", "w"))
    before = report.load_run(str(four_runs / "exit-s0"))["base_key"]
    set_cfg("exit-s0", warm_pack=False, eval_harder=False, difficulties="")
    assert report.load_run(str(four_runs / "exit-s0"))["base_key"] == before
    runs = lambda: [report.load_run(str(four_runs / r)) for r in ("grpo-s0", "exit-s0")]
    assert report.comparison_table(runs())["rows"][0]["runs"] == 1  # one seed, one base
    set_cfg("grpo-s0", warm_pack=True)
    assert report.comparison_table(runs())["rows"][0]["runs"] == 2


def test_runs_of_other_settings_get_a_row_each_and_pair_with_their_own(four_runs):
    """Two more ExIt runs at β = 0.001 (seeds 0, 1 on the same bases): pooled by method alone, ExIt would be 4 runs
    of two experiments and every pair key repeated, so every paired comparison would vanish. Instead they are a row
    of their own, named by the setting, paired with ExIt and ExIt with GRPO as before. Runs of two task families,
    each with its own held-out problems, are refused; the header names the split; signals say how many runs had logs."""
    for s, (s0, sK) in ((0, (0.45, 0.55)), (1, (0.50, 0.80))):
        write_run(four_runs / f"beta-s{s}", "exit", s, fake_eval(s0, sK), json.load(open(four_runs / f"exit-s{s}" /
                                                                                         "eval.json"))["base"])
        cfg = json.load(open(four_runs / f"beta-s{s}" / "config.json"))
        json.dump(cfg | {"beta": 0.001, "log_every": 5}, open(four_runs / f"beta-s{s}" / "config.json", "w"))
    os.remove(four_runs / "beta-s1" / "log.jsonl")  # as a per-run copy of a result: no log
    table = report.comparison_table([report.load_run(str(p)) for p in sorted(four_runs.iterdir())])
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["exit"]["runs"] == 2 and rows["exit, beta=0.001"]["runs"] == 2  # log_every: not the experiment
    assert rows["exit, beta=0.001"]["label"] == "ExIt (full), beta=0.001"
    assert rows["exit, beta=0.001"]["kK"][0] == pytest.approx(0.675)
    got = {(d["a"], d["b"]): d for d in table["paired"]}
    assert set(got) == {("exit", "grpo"), ("exit, beta=0.001", "exit")}
    assert got[("exit, beta=0.001", "exit")]["kK"] == pytest.approx([0.075, 0.025])  # per seed +0.05, +0.10
    text = report.format_table(table)
    assert "ExIt (full), beta=0.001 (1 of its 2 runs have a log)" in text
    assert text.startswith("held-out math (the old test fifth), K = 2")  # evaluations without a split: before val
    assert report.format_table(table | {"split": "val"}).startswith("held-out math (validation split), K = 2")
    # across rows too: ExIt only at β = 0.001 against GRPO at 0 is named so, and not paired as plain ExIt - GRPO
    alone = [report.load_run(str(p)) for p in sorted(four_runs.iterdir()) if not p.name.startswith("exit-")]
    table = report.comparison_table(alone)
    assert [r["label"] for r in table["rows"]] == ["Base", "GRPO", "ExIt (full), beta=0.001"] and table["paired"] == []
    cfg = json.load(open(four_runs / "grpo-s1" / "config.json"))
    json.dump(cfg | {"task": "subset"}, open(four_runs / "grpo-s1" / "config.json", "w"))
    with pytest.raises(ValueError, match="different task families \\(math, subset\\)"):
        report.comparison_table([report.load_run(str(p)) for p in sorted(four_runs.iterdir())])


def test_table_is_reprinted_from_results_json(four_runs, capsys):
    report.main([str(p) for p in four_runs.iterdir()] + ["--out", str(four_runs / "cmp")])
    first = capsys.readouterr().out
    report.main(["--table", str(four_runs / "cmp" / "results.json")])
    again = capsys.readouterr().out
    table_text = first.split("results:")[0].strip()
    assert table_text and table_text in again


def test_k_cuts_stored_evaluations_and_evaluates_more_steps_anew(four_runs, capsys):
    report.main([str(four_runs / "exit-s0"), "--k=1", "--out", str(four_runs / "k1")])
    row = json.load(open(four_runs / "k1" / "results.json"))["rows"][-1]
    assert row["kK"] == pytest.approx([0.45, 0.0]) and len(row["score_mean"]) == 2
    with pytest.raises(SystemExit) as e:  # more steps than eval.json holds: an evaluation of its own (eval.K5.json)
        report.main([str(four_runs / "exit-s0"), "--k=5"])
    assert e.value.code == 2 and "exit-s0: no ckpt.pt to evaluate" in capsys.readouterr().err


def test_plots_are_png_files(four_runs, tmp_path):
    pytest.importorskip("matplotlib")
    table = report.comparison_table([report.load_run(str(p)) for p in four_runs.iterdir()])
    paths = report.plot_table(table, str(tmp_path / "plots"))
    names = {os.path.basename(p) for p in paths}
    assert names == {"accuracy_vs_k.png", "net_corrections.png", "training.png", "curriculum.png"}
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == PNG and os.path.getsize(p) > 1000


def test_multi_turn_comparison_reports_first_turn_accuracy_with_the_return_beside_it():
    """As the paper's Table 1 reports tool use: the main columns are the first turn's accuracy at k = 0, k = K
    and Δ_K; the episode's return goes beside them. Picked from the evaluations, no flag needed."""
    def ev(first, ret):
        return dict(K=2, n=4, score=ret, delta=ret[-1] - ret[0], solved=ret, turn_acc=first,
                    first_turn=dict(K=2, n=4, score=first, delta=first[-1] - first[0], solved=first))
    runs = [dict(path="a", method="exit", seed=0, task="tools", base_key="k", policy=ev([0.5, 0.6, 0.75], [0.25, 0.25, 0.5]),
                 base=ev([0.5, 0.5, 0.25], [0.25, 0.0, 0.0]), log=[])]
    table = report.comparison_table(runs)
    assert table["metric"] == "first-turn accuracy"
    exit_row = [r for r in table["rows"] if r["method"] == "exit"][0]
    assert exit_row["k0"][0] == 0.5 and exit_row["kK"][0] == 0.75 and exit_row["delta"][0] == pytest.approx(0.25)
    assert exit_row["return"]["kK"][0] == 0.5 and exit_row["return"]["delta"][0] == pytest.approx(0.25)
    text = report.format_table(table)
    assert "first-turn accuracy in %" in text and "return k = 0" in text and "+25.0" in text
    single = report.comparison_table([dict(runs[0], policy={k: v for k, v in runs[0]["policy"].items() if k != "first_turn"},
                                             base=None)])
    assert single["metric"] == "score" and "return" not in single["rows"][0]


def test_sample_efficiency_against_the_strongest_bars_by_hand():
    curves = lambda kK, k0: dict(curves=dict(heldout_kK=kK, heldout_k0=k0))
    rows = [dict(method="grpo", label="GRPO", **curves([None, 0.2, None, 0.4, None, 0.5], [None, 0.3, None, 0.5, None, 0.4])),
            dict(method="improve", label="Improve", **curves([None, 0.3, None, 0.5, None, 0.6], [None, 0.2, None, 0.3, None, 0.3])),
            dict(method="exit", label="ExIt", **curves([None, 0.6, None, 0.7, None, 0.7], [None, 0.1, None, 0.2, None, 0.5])),
            dict(method="base", label="Base")]
    report.efficiency(rows)
    # Improve ends at 0.6 (iteration 6 of 6): ExIt reaches it at 2 (2/6), GRPO never, Improve at its end
    assert [r.get("iters_to_improve_kK") for r in rows] == [None, 1.0, pytest.approx(2 / 6), None]
    # GRPO's best k = 0 is 0.5, at iteration 4: ExIt reaches it at 6, Improve never
    assert [r.get("iters_to_grpo_best_k0") for r in rows] == [pytest.approx(4 / 6), None, 1.0, None]
    assert "iters_to_improve_kK" not in rows[3] and "iters_to_grpo_best_k0" not in rows[3]
    # 7 iterations with a point every 2nd: the fraction is of the run's 7 iterations, not of its last point's 6
    rows = [dict(method="improve", label="Improve", **curves([None, 0.3, None, 0.6, None, 0.6, None], [None] * 7)),
            dict(method="exit", label="ExIt", **curves([None, 0.6, None, 0.7, None, 0.7, None], [None] * 7))]
    report.efficiency(rows)
    assert [r["iters_to_improve_kK"] for r in rows] == [pytest.approx(4 / 7), pytest.approx(2 / 7)]


def test_the_held_out_curve_is_labelled_with_the_k_it_was_measured_at(tmp_path):
    """--eval_every's heldout_kK is at the run's eval_k, whatever K the comparison truncates its table to."""
    log = [dict(iter=t, heldout_k0=0.1 * t, heldout_kK=0.2 * t) for t in (1, 2)]
    runs = [dict(path=str(tmp_path / m), method=m, seed=0, task="math", base_key="b", eval_k=2, log=log,
                 policy=fake_eval(0.3, 0.5), base=None) for m in ("grpo", "improve")]
    table = report.comparison_table(runs, K=1)
    assert table["K"] == 1 and table["curve_K"] == "2"
    assert "reach Improve's final held-out k = 2 score" in report.format_table(table)


def test_the_committed_tables_reprint():
    """`python eval.py --table results/NAME/results.json`, as RESULTS.md quotes it, for every committed comparison
    (tables written before a field existed included)."""
    files = sorted(os.path.join(HERE, "results", d, "results.json") for d in os.listdir(os.path.join(HERE, "results")))
    files = [f for f in files if os.path.isfile(f)]
    assert len(files) >= 8
    for f in files:
        assert report.format_table(report.check_table(hf.read_json(f), f)).startswith("held-out ")


def test_paired_differences_by_hand():
    # made-up scores at k = 0 and k = K = 2 for 3 seeds of one base; ExIt's seed 2 also has a run of
    # another base, which has no partner and must not count
    runs = {"exit": {0: (0.40, 0.60), 1: (0.50, 0.55), 2: (0.30, 0.70), ("other", 2): (0.9, 0.9)},
            "grpo": {0: (0.45, 0.40), 1: (0.50, 0.45), 2: (0.40, 0.35), 3: (0.1, 0.1)},  # seed 3: no partner
            "improve": {0: (0.40, 0.50)}}  # one pair only: left out
    rows = []
    for m, by_seed in runs.items():
        keys = [(k if isinstance(k, tuple) else ("b", k)) for k in by_seed]
        rows.append(dict(method=m, label=m, pairs=[list(k) for k in keys],
                         score_runs=[[v[0], 0.0, v[1]] for v in by_seed.values()]))
    got = report.paired_differences(dict(K=2, rows=rows))
    assert [(d["a"], d["b"], d["n"]) for d in got] == [("exit", "grpo", 3)]
    # k = K: differences 0.20, 0.10, 0.35 -> mean 0.2167, std (n - 1) 0.1258, s.e. 0.1258 / sqrt(3)
    d = [0.20, 0.10, 0.35]
    mean = sum(d) / 3
    se = (sum((x - mean) ** 2 for x in d) / 2) ** 0.5 / 3 ** 0.5
    assert got[0]["kK"] == pytest.approx([mean, se])
    # k = 0: -0.05, 0.0, -0.10
    d0 = [-0.05, 0.0, -0.10]
    m0 = sum(d0) / 3
    assert got[0]["k0"] == pytest.approx([m0, (sum((x - m0) ** 2 for x in d0) / 2) ** 0.5 / 3 ** 0.5])
    text = report.format_table(dict(K=2, task="t", rows=[dict(r, runs=1, k0=[0, 0], kK=[0, 0], delta=[0, 0], problems=[1])
                                                         for r in rows], paired=got))
    assert "exit - grpo" in text and "+21.7 ± 7.3*" in text and "-5.0 ± 2.9 " in text  # 21.7 > 2 x 7.3; 5.0 < 2 x 2.9
    assert "zero_var" not in got[0]  # no logs: no training signals to pair


def test_training_signals_and_their_paired_difference_by_hand():
    # a run's signals: the mean over its last LAST iterations, each key where it was logged
    log = [dict(iter=i, zero_var_frac=1.0 if i <= 50 else 0.2 + 0.1 * (i % 2), buf_score_mean=None if i < 140 else 0.25)
           for i in range(1, 151)]
    sig = report.signals(log)  # iterations 51..150: zero_var_frac 0.2 and 0.3 alternate; buf_score_mean from 140 on
    assert sig["zero_var_frac"] == pytest.approx(0.25) and sig["buf_score_mean"] == pytest.approx(0.25)
    assert "buf_entropy" not in sig and report.signals([]) is None
    # paired: improve's zero_var_frac minus its control's, per seed 0.30 - 0.50, 0.40 - 0.45, 0.35 - 0.60
    zv = {"improve": (0.30, 0.40, 0.35), "improve-blind": (0.50, 0.45, 0.60)}
    rows = [dict(method=m, label=m, pairs=[["b", s] for s in range(3)], score_runs=[[0.5, 0.5]] * 3,
                 signals_runs=[dict(zero_var_frac=v) for v in vs]) for m, vs in zv.items()]
    got = report.paired_differences(dict(K=1, rows=rows))
    d = [-0.20, -0.05, -0.25]
    m = sum(d) / 3
    assert [(g["a"], g["b"]) for g in got] == [("improve", "improve-blind")]
    assert got[0]["zero_var"] == pytest.approx([m, (sum((x - m) ** 2 for x in d) / 2) ** 0.5 / 3 ** 0.5])
    rows[1]["signals_runs"][2] = None  # a run without a log: nothing to pair, no column
    assert "zero_var" not in report.paired_differences(dict(K=1, rows=rows))[0]


def test_budget_matched_claim_two_by_hand():
    # GRPO's held-out k = 0 at iterations 2 and 4 (base tasks = iterations); ExIt replays half its slots,
    # so at iteration 4 it has drawn 2 batches' worth of base tasks
    grpo = lambda a, b: [dict(iter=1), dict(iter=2, heldout_k0=a), dict(iter=3), dict(iter=4, heldout_k0=b)]
    exit_ = lambda v: [dict(iter=t, replay_frac=0.5, **({"heldout_k0": v} if t == 4 else {})) for t in (1, 2, 3, 4)]
    rows = [dict(method="grpo", pairs=[["b", 0], ["b", 1]],
                 heldout_runs=[report.heldout_points(grpo(0.30, 0.50)), report.heldout_points(grpo(0.40, 0.44))]),
            dict(method="exit", pairs=[["b", 1], ["b", 0]],  # another order: paired by seed, not position
                 heldout_runs=[report.heldout_points(exit_(0.42)), report.heldout_points(exit_(0.35))])]
    b = report.budget_matched(dict(rows=rows))
    assert b["n"] == 2 and b["fresh_frac"] == pytest.approx(0.5)
    # equal base tasks (GRPO at iteration 2): 0.35 - 0.30, 0.42 - 0.40; equal iterations: 0.35 - 0.50, 0.42 - 0.44
    assert b["equal_base_tasks"] == pytest.approx([0.035, 0.015])
    assert b["equal_iterations"] == pytest.approx([-0.085, 0.065])
    # a rerun of GRPO's seed 1 in the same row: that key pairs with nothing (as in paired_differences), which
    # leaves one pair, too few
    rows[0]["pairs"].append(["b", 1])
    rows[0]["heldout_runs"].append(report.heldout_points(grpo(0.10, 0.90)))
    assert report.budget_matched(dict(rows=rows)) is None
    rows[0]["pairs"].pop(), rows[0]["heldout_runs"].pop()  # and the same for a rerun on ExIt's side
    rows[1]["pairs"].append(["b", 0])
    rows[1]["heldout_runs"].append(report.heldout_points(exit_(0.99)))
    assert report.budget_matched(dict(rows=rows)) is None


def test_format_table_without_a_problem_count():
    # a row whose held-out count is null (check_table lets it through): no standard-error line, no crash
    row = dict(method="exit", label="ExIt", runs=1, k0=[0.5, 0], kK=[0.6, 0], delta=[0.1, 0], problems=None)
    text = report.format_table(dict(K=2, task="t", rows=[row]))
    assert "ExIt" in text and "standard error" not in text


def test_the_base_key_of_a_comparison(tmp_path):
    # eval_temperature 0 must not be read as unset (0 == False): a T = 0 run and one whose config predates the
    # setting (T = 1) do not share a Base entry, so they are never paired
    keys = []
    for name, extra in (("greedy", dict(eval_temperature=0.0)), ("old", {})):
        write_run(tmp_path / name, "exit", 0, fake_eval(0.1, 0.2), fake_eval(0.1, 0.1))
        cfg = json.load(open(tmp_path / name / "config.json"))
        json.dump(dict(cfg, **extra), open(tmp_path / name / "config.json", "w"))
        keys.append(report.load_run(str(tmp_path / name))["base_key"])
    assert keys[0] != keys[1] and '"eval_temperature": 0.0' in keys[0]
    # --difficulties naming the family's own mix (math: 2-4) is the base of no --difficulties (base.warm_start_key)
    for name, mix in (("own", "2-4"), ("other", "3-5")):
        write_run(tmp_path / name, "exit", 0, fake_eval(0.1, 0.2), fake_eval(0.1, 0.1))
        cfg = json.load(open(tmp_path / name / "config.json"))
        json.dump(dict(cfg, difficulties=mix), open(tmp_path / name / "config.json", "w"))
    key = lambda name: report.load_run(str(tmp_path / name))["base_key"]
    assert key("own") == key("old") != key("other")


# ---- task diversity (the paper's Tables 2 and 7)

def test_task_diversity_is_the_mean_pairwise_distance_written_out():
    m = tiny()
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2, 3], [10]]
    got = eval_lib.task_diversity(m, seqs, batch=2)  # embedded in chunks of 2, joined
    e = [model_lib.embed(m, [s])[0].double() for s in seqs]  # one at a time: no padding at all
    cos, l2 = [], []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            cos.append(1 - float(e[i] @ e[j]) / float(e[i].norm() * e[j].norm()))
            l2.append(float((e[i] - e[j]).norm()))
    assert got["n"] == 5 and len(cos) == 10
    assert got["cosine"] == pytest.approx(sum(cos) / 10, abs=1e-6) and got["l2"] == pytest.approx(sum(l2) / 10, rel=1e-5)
    with pytest.raises(ValueError):
        eval_lib.task_diversity(m, [[1]])


def test_the_diversity_sample_is_uniform_over_the_whole_stream():
    # algorithm R: after a stream of 20, each item is in a sample of 5 with probability 1/4, early or late
    rng, hits = np.random.default_rng(0), np.zeros(20)
    for _ in range(4000):
        sample = []
        for n, item in enumerate(range(20)):
            eval_lib.reservoir_add(sample, n, item, 5, rng)
        assert len(sample) == 5 == len(set(sample))
        hits[sample] += 1
    assert np.abs(hits / 4000 - 0.25).max() < 0.03  # binomial SE at p = 1/4: 0.007
    short = []
    for n in range(3):
        eval_lib.reservoir_add(short, n, n, 5, rng)
    assert short == [0, 1, 2]  # a stream shorter than the sample: all of it, in order


def test_a_comparison_refuses_evaluations_on_different_splits():
    def ev(split=None):  # one evaluation of 2 problems x 2 chains; None: from before the validation split
        return dict(K=1, score=[0.5, 0.75], solved=[2, 3], delta=0.25, n=4,
                    settings=dict(n_samples=2, **({"split": split} if split else {})))
    runs = [dict(method="grpo", seed=0, policy=ev("test"), base=None, base_key="a", path="a", task="t", log=[]),
            dict(method="exit", seed=0, policy=ev("val"), base=None, base_key="b", path="b", task="t", log=[])]
    with pytest.raises(ValueError, match="different held-out splits"):
        report.comparison_table(runs)
    runs[1]["policy"] = ev()
    with pytest.raises(ValueError, match="old test fifth"):
        report.comparison_table(runs)
    runs[1]["policy"] = ev("test")
    table = report.comparison_table(runs)
    assert table["rows"][0]["problems"] == [2]  # problems, not chains: what one run's standard error counts
    assert "from its 2 held-out problems" in report.format_table(table)


def test_control_runs_get_their_own_rows():
    assert report.run_label(dict(method="exit")) == "exit"
    assert report.run_label(dict(method="exit", kappa=0.0)) == "exit-kappa0"
    assert report.run_label(dict(method="exit", admission="fifo")) == "exit-fifo"
    assert report.run_label(dict(method="improve", kappa=0.0)) == "improve-kappa0"  # Improve has the same two
    assert report.run_label(dict(method="improve", admission="fifo")) == "improve-fifo"
    assert report.run_label(dict(method="grpo", kappa=0.0)) == "grpo"  # no buffer, no controls
    # both controls at once: blind to learnability, a row of its own, not pooled with either half
    assert report.run_label(dict(method="improve", kappa=0.0, admission="fifo")) == "improve-blind"
    assert report.run_label(dict(method="exit", kappa=0.0, admission="fifo")) == "exit-blind"
    styles = {m: report._style(m)["linestyle"] for m in ("improve", "improve-kappa0", "improve-fifo", "improve-blind")}
    assert len(set(styles.values())) == 4 and report._style("improve-blind")["color"] == report._style("improve")["color"]
    # another form of Eq. 6 is another row, never pooled with full ExIt as printed
    assert report.run_label(dict(method="exit", div_mean=True)) == "exit-mean"
    assert report.run_label(dict(method="exit", div_clip=2.0)) == "exit-cap2"
    assert report.bonus_form(dict(method="exit", div_minmax=True)) == "min-max"


# ---- the command line on bad input: a clear message and exit code 2, never a traceback

def test_cli_bad_input(tmp_path, capfd):
    def fails(argv):  # capfd: the ladder's runs are processes of their own, writing to the same stderr
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        assert e.value.code == 2
        return capfd.readouterr().err
    assert "no run folder or checkpoint at" in fails([str(tmp_path / "missing")])
    os.makedirs(tmp_path / "empty")
    assert "neither eval.json nor ckpt.pt" in fails([str(tmp_path / "empty")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "corrupt or truncated" in fails([str(tmp_path / "junk.pt")])
    assert "exit.py settings go with --ladder" in fails([str(tmp_path), "--lr=0.1"])
    assert "unknown config key 'itres'" in fails(["--ladder", "--itres=3"])
    assert "sets method, seed" in fails(["--ladder", "--seed=3"])
    assert "controls set --kappa themselves" in fails(["--ladder", "--kappa=5"])  # before any run, not hours in
    assert "nothing to do" in fails([])


def test_cli_missing_folder_as_a_script(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no run folder or checkpoint" in p.stderr and "Traceback" not in p.stderr


# ---- the ladder, on a tiny policy: two rungs, one seed

TINY = dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, warm_examples=64, warm_steps=3, warm_batch=8, iters=2,
            tasks_per_iter=2, group_size=4, max_new_tokens=10, buffer_size=16, min_size=2, show_every=0,
            eval_problems=3, eval_k=2, eval_samples=1, device="cpu")


def test_ladder_runs_resumes_and_recomputes_exactly(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ladder"
    overrides = [f"--{k}={v}" for k, v in TINY.items()] + [f"--base_dir={tmp_path / 'base'}"]
    # two rungs and the two controls of full ExIt, two runs at a time
    table = report.ladder(overrides, seeds=1, out=str(out), methods=["grpo", "exit"], jobs=2)
    assert [r["method"] for r in table["rows"]] == ["base", "grpo", "exit", "exit-kappa0", "exit-fifo"]
    assert json.load(open(out / "exit-kappa0-s0" / "config.json"))["kappa"] == 0.0
    assert json.load(open(out / "exit-fifo-s0" / "config.json"))["admission"] == "fifo"
    assert table["rows"][0]["runs"] == 1  # every run of seed 0 started from one cached base
    # ... trained by one run only: the others waited for it (each job's output is in its .out file)
    logs = [open(out / f"{m}-s0.out").read() for m in ("grpo", "exit", "exit-kappa0", "exit-fifo")]
    assert sum("warm start: saved" in log for log in logs) == 1
    bases = os.listdir(tmp_path / "base")
    assert len([f for f in bases if f.endswith(".pt")]) == 1
    assert len([f for f in bases if ".eval-" in f]) == 1  # the base was evaluated once, for every run
    assert (out / "results.json").is_file() and (out / "exit-s0" / "eval.json").is_file()
    # every run measured the diversity of the instances it trained on: 2 iterations x 2 tasks
    for run in ("grpo-s0", "exit-s0", "exit-kappa0-s0", "exit-fifo-s0"):
        assert json.load(open(out / run / "eval.json"))["diversity"]["n"] == 4
    # run again: finished runs are skipped, nothing is trained
    monkeypatch.setattr(report, "start_run", lambda argv, *a, **k: pytest.fail(f"retrained {argv}"))
    report.ladder(overrides, seeds=1, out=str(out), methods=["grpo", "exit"])
    # evaluating the checkpoint again gives exactly the run's own final evaluation (CPU, same seeds)
    saved = json.load(open(out / "exit-s0" / "eval.json"))
    again = report.evaluate_checkpoint(str(out / "exit-s0" / "ckpt.pt"), device="cpu", chain=True)
    with pytest.raises(ValueError, match="was trained on --task=exactsumfb; --task=math is only for"):
        report.evaluate_checkpoint(str(out / "exit-s0" / "ckpt.pt"), task="math", device="cpu")
    # ... and the same improvement chain as the ladder's comparison drew for its first run (chain.txt; that it is
    # the chain the run's own end once printed is checked on the full default run: RESULTS.md, "The reading path")
    assert again.pop("chain") + "\n" == (out / "exit-s0" / "chain.txt").read_text()
    assert again == saved and "diversity" in saved
    # the validation split: its own file, other problems than the test split's, its chain beside it, printed
    capsys.readouterr()
    report.main([str(out / "exit-s0"), "--split=val", "--out", str(tmp_path / "val"), "--device=cpu"])
    chain = (out / "exit-s0" / "eval.val.chain.txt").read_text()
    assert "one held-out improvement chain" in capsys.readouterr().out and "exit" in chain.splitlines()[1]
    val = json.load(open(out / "exit-s0" / "eval.val.json"))
    assert "chain" not in val and val["policy"]["settings"]["split"] == "val" == val["base"]["settings"]["split"]
    assert json.load(open(out / "exit-s0" / "eval.json")) == saved
    # another temperature goes to its own file; the run's eval.json is left as it was
    report.main([str(out / "exit-s0"), "--temperature=0", "--out", str(tmp_path / "greedy"), "--device=cpu"])
    greedy = json.load(open(out / "exit-s0" / "eval.T0.json"))
    assert greedy["policy"]["settings"]["temperature"] == 0.0 == greedy["base"]["settings"]["temperature"]
    assert json.load(open(out / "exit-s0" / "eval.json")) == saved
    assert (tmp_path / "greedy" / "results.json").is_file()


def test_without_matplotlib_the_table_still_prints(four_runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    report.main([str(p) for p in four_runs.iterdir()] + ["--out", str(four_runs / "noplots")])
    out = capsys.readouterr().out
    assert "ExIt (full)" in out and "pip install matplotlib" in out
    assert sorted(os.listdir(four_runs / "noplots")) == ["results.json"]


def test_report_keeps_exit_defaults():
    """report.py's copy of the run defaults it needs for old run folders, and of the ladder's rungs, equal
    exit.Config's and exit.METHODS."""
    defaults = dataclasses.asdict(exit_lib.Config())
    assert {k: defaults[k] for k in report.RUN_DEFAULTS} == report.RUN_DEFAULTS
    assert report.METHODS == exit_lib.METHODS


def test_imports_run_one_way():
    """The five core files import only the core files before them (tasks -> model -> buffer -> eval -> exit);
    an optional module (every other module: runs, scale, report, base, hf, tokenizer, ...) is reached at one marked
    seam each: exit.main, and eval.py's command line."""
    order = ["tasks", "model", "buffer", "eval", "exit"]
    optional = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")} - set(order)
    assert {"runs", "scale", "report", "base", "hf", "tokenizer", "bench"} <= optional
    seams = {"exit": {"runs"}, "eval": {"report"}}
    for i, name in enumerate(order):
        tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not top & (set(order[i:]) | optional), (name, top)
        every = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        every |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert (every - top) & (set(order) | optional) == seams.get(name, set()), (name, every - top)


def reading_path(argv) -> dict:
    """Lines of the project's own code that `exit.main(argv)` runs, per module: the whole source of every function
    of a project module (not tests or bench.py) that is called, and the body of every project dataclass that is
    made (its lines outside its methods). RESULTS.md's measure ("The reading path"), counted here by itself."""
    mine = {os.path.join(HERE, f) for f in os.listdir(HERE)
            if f.endswith(".py") and not f.startswith("test_") and f != "bench.py"}
    kind, made = {}, set()  # code object -> "ours", "init" (a dataclass's generated __init__) or None

    def prof(frame, event, arg):
        if event != "call":
            return
        co = frame.f_code
        if co not in kind:
            kind[co] = ("ours" if os.path.abspath(co.co_filename) in mine and not co.co_name.startswith("<") else
                        "init" if co.co_name == "__init__" and co.co_filename == "<string>" else None)
        self = frame.f_locals.get("self") if kind[co] == "init" else None
        if dataclasses.is_dataclass(self):
            made.add(type(self))

    sys.setprofile(prof)
    threading.setprofile(prof)
    try:
        exit_lib.main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    lines = collections.defaultdict(set)
    for co in [c for c, k in kind.items() if k == "ours"]:
        src, start = inspect.getsourcelines(co)
        lines[os.path.basename(co.co_filename)[:-3]] |= set(range(start, start + len(src)))
    for cls in made:
        path = os.path.abspath(sys.modules[cls.__module__].__file__)
        if path in mine:
            node = next(n for n in ast.walk(ast.parse(open(path).read()))
                        if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
            body = set(range(min([d.lineno for d in node.decorator_list] + [node.lineno]), node.end_lineno + 1))
            for d in node.body:
                if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body -= set(range(min([x.lineno for x in d.decorator_list] + [d.lineno]), d.end_lineno + 1))
            lines[os.path.basename(path)[:-3]] |= body
    return {f: len(s) for f, s in lines.items()}


# the tiny run's path as RESULTS.md quotes it (the five files, and all); the goal is 1,200 and 1,800. Raise these
# only on purpose, saying why in RESULTS.md ("The reading path")
READING_BUDGET = dict(five=1374, all=1877)


def test_the_reading_path_stays_within_its_budget(tmp_path):
    """A feature that adds lines to the path a reader follows must pay for them: the tiny run's path (a 1-layer toy
    that warm-starts its own base for 3 steps, 3 iterations, 4 held-out problems; here with smaller sizes and K, which
    leave the counts as they are, file by file) stays within READING_BUDGET, and the five core files are on it."""
    per = reading_path(["--n_layer=1", "--warm_steps=3", "--iters=3", "--eval_problems=4",
                        f"--out_dir={tmp_path / 'run'}", f"--base_dir={tmp_path / 'base'}",
                        "--warm_examples=256", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--eval_k=2"])  # smaller sizes
    five, total = sum(per.get(f, 0) for f in ("exit", "model", "tasks", "buffer", "eval")), sum(per.values())
    assert all(per.get(f) for f in ("exit", "model", "tasks", "buffer", "eval", "runs", "base")), per
    assert five <= READING_BUDGET["five"] and total <= READING_BUDGET["all"], (
        f"the reading path grew: {five} lines in the five files, {total} in all (budget {READING_BUDGET}; per file "
        f"{dict(sorted(per.items()))}): cut it back, or raise READING_BUDGET and say why in RESULTS.md")


# ----------------------------------------------------------------------------- what a run shows

def test_improvement_chain_shows_each_step_as_text(monkeypatch):
    """A scripted policy: a wrong first answer, then the right one on every improve prompt. The chain has
    K + 1 steps with the answers and scores the evaluation would give, and formats one line per step."""
    f, tok = tasks.get_family("exactsum"), tokenizer_lib.byte_tokenizer(tasks.MARKERS)
    p = eval_lib.heldout_problems(f, 1)[0]
    right, wrong = f.solve(p, False), f.render(p, p.data["best"][:1], False)

    def generate(policy, prompts, num_samples, max_new_tokens, **kw):
        texts = [wrong if tok.decode(ids, special=True).endswith("<|answer|>") else right for ids in prompts]
        return rollouts_of(tok, [t for t in texts for _ in range(num_samples)])
    monkeypatch.setattr(eval_lib.model_lib, "generate", generate)
    m = model_lib.Transformer(model_lib.toy_config(tok.vocab_size))
    chain = report.improvement_chain(m, tok, f, p, K=2)
    assert chain == [(wrong, 0.0), (right, 1.0), (right, 1.0)]
    text = report.format_chains(p, {"base": chain, "exit": chain})
    assert len(text.splitlines()) == 2 + 3 and p.request in text and "1.00" in text


def test_show_chain_picks_the_first_problem_whose_chain_improves(monkeypatch):
    """show_chain's stated rule: the first of the evaluation's first CHAIN_CANDIDATES held-out problems whose
    trained chain ends better than it starts (here the third, the only one the scripted policy fixes), else
    the first; the base's chain on the same problem beside it."""
    f, tok = tasks.get_family("exactsum"), tokenizer_lib.byte_tokenizer(tasks.MARKERS)
    settings = dict(n_problems=20, K=2, temperature=1.0, max_new_tokens=12, seed=0, split="test")
    problems = eval_lib.heldout_problems(f, 20)[:report.CHAIN_CANDIDATES]  # as evaluate_policy draws them
    fixable = {problems[2].request}

    def generate(policy, prompts, num_samples, max_new_tokens, **kw):
        texts = []
        for ids in prompts:
            text = tok.decode(ids, special=True)
            p = next(q for q in problems if q.request in text)
            improve = not text.endswith("<|answer|>")
            texts.append(f.solve(p, False) if improve and p.request in fixable else f.render(p, p.data["best"][:1], False))
        return rollouts_of(tok, [t for t in texts for _ in range(num_samples)])
    monkeypatch.setattr(eval_lib.model_lib, "generate", generate)
    m = model_lib.Transformer(model_lib.toy_config(tok.vocab_size))
    text = report.show_chain(m, tok, f, settings, "exit", base=m)
    lines = text.splitlines()
    assert problems[2].request in lines[0] and "the first of the evaluation's first 8" in lines[0]
    assert "base" in lines[1] and "exit" in lines[1] and len(lines) == 2 + 3
    assert lines[2].count("0.00") == 2 and lines[-1].count("1.00") == 2  # k = 0 wrong, k = 2 right, in both columns
    fixable.clear()  # nothing improves: the first problem, and the title says so
    text = report.show_chain(m, tok, f, settings, "exit")
    assert problems[0].request in text.splitlines()[0] and "none of the first 8 improved" in text
    assert "base" not in text.splitlines()[1]
    text = report.show_chain(m, tok, f, settings | dict(K=0), "exit")  # no improve step: the first, said so
    assert problems[0].request in text.splitlines()[0] and "K = 0" in text and len(text.splitlines()) == 3


def test_lineage_plot_draws_buffer_depths(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    log = [dict(buf_depth_hist={"0": 10}), dict(buf_depth_hist={"0": 8, "1": 4}), dict(buf_depth_hist={"0": 6, "1": 4, "5": 2})]
    from matplotlib.axes import Axes
    drawn, stackplot = [], Axes.stackplot
    monkeypatch.setattr(Axes, "stackplot", lambda self, x, ys, **kw: drawn.append((x, ys)) or stackplot(self, x, ys, **kw))
    path = report.plot_lineage(log, str(tmp_path / "lineage.png"))
    assert path and (tmp_path / "lineage.png").stat().st_size > 1000
    # one band per depth k = 0..3 and one for k >= 4, one column per log line
    assert drawn[0][0].tolist() == [1, 2, 3]
    assert drawn[0][1].tolist() == [[10, 8, 6], [0, 4, 4], [0, 0, 0], [0, 0, 0], [0, 0, 2]]
    assert report.plot_lineage([dict(buf_depth_hist={})], str(tmp_path / "none.png")) is None  # GRPO: no buffer


def test_comparison_pairs_runs_by_base_and_seed_not_seed_alone(four_runs):
    """GRPO's runs warm-started another base (--warm_pack): same seeds as ExIt's, but nothing cancels, so no pair."""
    for s in (0, 1):
        f = four_runs / f"grpo-s{s}" / "config.json"
        json.dump(json.load(open(f)) | {"warm_pack": True}, open(f, "w"))
    table = report.comparison_table([report.load_run(str(p)) for p in sorted(four_runs.iterdir())])
    rows = {r["method"]: r for r in table["rows"]}
    key = {s: report.load_run(str(four_runs / f"exit-s{s}"))["base_key"] for s in (0, 1)}
    assert sorted(map(tuple, rows["exit"]["pairs"])) == [(key[0], 0), (key[1], 1)]
    assert table["paired"] == []

def test_a_repeated_key_on_the_second_side_pairs_with_nothing():
    # grpo holds two runs of (b, 0): neither pairs; ExIt - GRPO rests on seeds 1 and 2 alone
    rows = [dict(method="exit", label="exit", pairs=[["b", 0], ["b", 1], ["b", 2]],
                 score_runs=[[0.4, 0.6], [0.5, 0.55], [0.3, 0.7]]),
            dict(method="grpo", label="grpo", pairs=[["b", 0], ["b", 1], ["b", 2], ["b", 0]],
                 score_runs=[[0.45, 0.4], [0.5, 0.45], [0.4, 0.35], [0.0, 0.0]])]
    got = report.paired_differences(dict(K=1, rows=rows))
    assert [(d["a"], d["b"], d["n"]) for d in got] == [("exit", "grpo", 2)]
    d = [0.55 - 0.45, 0.7 - 0.35]
    assert got[0]["kK"] == pytest.approx([np.mean(d), abs(d[0] - d[1]) / 2 ** 0.5 / 2 ** 0.5])

def test_budget_matched_never_extrapolates_grpos_curve():
    # GRPO's curve ends at iteration 4; ExIt's seed 1 last point is at iteration 6: outside, left out (one pair: None)
    grpo = lambda a, b: [dict(iter=1), dict(iter=2, heldout_k0=a), dict(iter=3), dict(iter=4, heldout_k0=b)]
    exit_ = lambda v, T: [dict(iter=t, replay_frac=0.5, **({"heldout_k0": v} if t == T else {})) for t in range(1, T + 1)]
    rows = [dict(method="grpo", pairs=[["b", 0], ["b", 1]],
                 heldout_runs=[report.heldout_points(grpo(0.30, 0.50)), report.heldout_points(grpo(0.40, 0.44))]),
            dict(method="exit", pairs=[["b", 0], ["b", 1]],
                 heldout_runs=[report.heldout_points(exit_(0.35, 4)), report.heldout_points(exit_(0.42, 6))])]
    assert report.budget_matched(dict(rows=rows)) is None
    rows[1]["heldout_runs"][1] = report.heldout_points(exit_(0.42, 4))  # inside: both pairs count
    assert report.budget_matched(dict(rows=rows))["n"] == 2


# ===============================================================================================
# exit.py: the GRPO math against hand-written formulas, and the training loop
# ===============================================================================================

def hand_advantages(rewards, scale=True):
    """Eq. 3 written out one group at a time, in plain Python."""
    out = []
    for g in rewards:
        m = sum(g) / len(g)
        sd = (sum((x - m) ** 2 for x in g) / len(g)) ** 0.5
        if max(g) - min(g) <= 1e-6:
            out.append([0.0] * len(g))
        else:
            out.append([(x - m) / sd if scale else x - m for x in g])
    return out


def test_group_advantages_match_hand_formula():
    r = [[1.0, 0.0, 0.0, 1.0], [0.2, 0.9, 0.4, 0.4], [1.0, 1.0, 1.0, 1.0]]
    for by_std in (True, False):
        got = exit_lib.group_advantages(torch.tensor(r), scale_by_std=by_std)
        assert torch.allclose(got, torch.tensor(hand_advantages(r, by_std)), atol=1e-6)
    # a 0/1 group solved half the time: A = +-1 exactly
    assert exit_lib.group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]])).tolist() == [[1.0, -1.0, 1.0, -1.0]]


def test_group_advantages_equal_rewards_are_zero_not_nan():
    r = torch.tensor([[0.3] * 8, [0.0] * 8, [1.0] * 8, [0.5, 0.5 + 1e-7, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    assert r[3].max() > r[3].min()  # a near tie float32 keeps (1e-9 would round to an exact one): within tol
    a = exit_lib.group_advantages(r)
    assert torch.isfinite(a).all() and (a == 0).all()


def test_diversity_coefficients_eq6():
    e = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    mean = e.mean(0)
    dist = [((row - mean) ** 2).sum().sqrt().item() for row in e]
    rng = max(dist) - min(dist)
    printed = exit_lib.diversity_coefficients(e)
    minmax = exit_lib.diversity_coefficients(e, minmax=True)
    assert torch.allclose(printed, torch.tensor([d / rng for d in dist]), atol=1e-6)
    assert torch.allclose(minmax, torch.tensor([(d - min(dist)) / rng for d in dist]), atol=1e-6)
    assert minmax.min() == 0 and abs(minmax.max() - 1) < 1e-6
    # --div_clip caps the printed form's coefficient: min(d_i, c), nothing else changes
    capped = exit_lib.diversity_coefficients(e, clip=1.0)
    assert torch.allclose(capped, torch.tensor([min(d / rng, 1.0) for d in dist]), atol=1e-6) and printed.max() > 1
    assert torch.equal(exit_lib.diversity_coefficients(e, clip=5.0), printed)
    # --div_mean: each distance over the group's mean distance, so the coefficients average 1 (a reweighting)
    mean_form = exit_lib.diversity_coefficients(e, mean=True)
    assert torch.allclose(mean_form, torch.tensor([d / (sum(dist) / 4) for d in dist]), atol=1e-6)
    assert abs(float(mean_form.mean()) - 1) < 1e-6
    seven = torch.cat([torch.zeros(7, 3), torch.ones(1, 3)])  # 7 identical answers and 1 other
    assert abs(float(exit_lib.diversity_coefficients(seven, mean=True).mean()) - 1) < 1e-6
    assert exit_lib.diversity_coefficients(seven).tolist() == pytest.approx([1 / 6] * 7 + [7 / 6])  # the printed form
    with pytest.raises(ValueError, match="two forms of Eq. 6"):
        runs.parse_args(["--div_minmax", "--div_mean"])
    # all rollouts equally far from the mean (here: identical) -> d_i = 1
    same = torch.ones(4, 3)
    assert exit_lib.diversity_coefficients(same).tolist() == [1.0] * 4
    assert exit_lib.diversity_coefficients(same, clip=0.5).tolist() == [0.5] * 4  # the cap holds there too
    # a 4/4 split between two answers (the most learnable binary group): equal distances up to
    # float rounding must still count as a zero range
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
        two = torch.cat([a.expand(4, -1), b.expand(4, -1)])
        assert exit_lib.diversity_coefficients(two).tolist() == [1.0] * 8
        assert exit_lib.diversity_coefficients(two, minmax=True).tolist() == [1.0] * 8
        assert exit_lib.diversity_coefficients(two, mean=True).tolist() == [1.0] * 8
    sym = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert exit_lib.diversity_coefficients(sym, minmax=True).tolist() == [1.0] * 4


def hand_grpo_objective(logp, old, adv, mask, eps, ref=None, beta=0.0, dr_norm=None):
    """Eq. 4 with plain loops: mean over rollouts of (1/|o_i|) sum_t [min(rho A, clip(rho) A) - beta KL_t]."""
    total = 0.0
    N, T = logp.shape
    for i in range(N):
        s, n = 0.0, 0
        for t in range(T):
            if mask[i][t] == 0:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            term = torch.minimum(rho * adv[i], torch.clamp(rho, 1 - eps, 1 + eps) * adv[i])
            if ref is not None:
                d = ref[i, t] - logp[i, t]
                term = term - beta * (torch.exp(d) - d - 1)
            s = s + term
            n += 1
        total = total + s / (dr_norm if dr_norm else n)
    return total / N


@pytest.mark.parametrize("variant", ["plain", "kl", "dr"])
def test_grpo_loss_matches_hand_formula_values_and_gradients(variant):
    g = torch.Generator().manual_seed(0)
    N, T, eps = 6, 5, 0.2
    old = -torch.rand(N, T, generator=g) * 2
    # ratios spread over [0.5, 1.6]: both clipped and unclipped cells, for positive and negative A
    logp0 = old + torch.log(torch.linspace(0.5, 1.6, N * T)).view(N, T)
    adv = torch.tensor([1.5, -1.0, 0.5, -0.3, 0.0, 2.0])
    lengths = torch.tensor([5, 3, 4, 1, 5, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    ref = old - 0.1 * torch.rand(N, T, generator=g)
    kw = dict(plain={}, kl=dict(ref_logp=ref, beta=0.05), dr=dict(dr_norm=7.0))[variant]
    a = logp0.clone().requires_grad_(True)
    loss, stats = exit_lib.grpo_loss(a, old, adv, mask, eps, **kw)
    b = logp0.clone().requires_grad_(True)
    want = -hand_grpo_objective(b, old, adv, mask, eps, ref=kw.get("ref_logp"), beta=kw.get("beta", 0.0),
                                dr_norm=kw.get("dr_norm"))
    loss.backward()
    want.backward()
    assert torch.allclose(loss, want, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    # clipped cells get no gradient from the surrogate (when it is the minimum); padding never does
    assert (a.grad[mask == 0] == 0).all()
    ratio = torch.exp(logp0 - old)
    assert abs(stats["clip_frac"] - float((((ratio - 1).abs() > eps).float() * mask).sum() / mask.sum())) < 1e-6
    if variant == "plain":  # spot-check one clipped cell by hand: A > 0 and rho > 1 + eps -> zero gradient
        i, t = 5, 0
        assert ratio[i, t] > 1 + eps and adv[i] > 0 and a.grad[i, t] == 0


def test_grpo_loss_at_ratio_one_is_the_policy_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, _ = exit_lib.grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    # d/dlogp of -(1/N) sum_i (1/|o_i|) sum_t rho A at rho = 1 is -A_i / (N |o_i|)
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    exit_lib.ema_update(a, b, 0.25)
    assert torch.allclose(a.weight, 0.25 * wb + 0.75 * wa)
    exit_lib.ema_update(a, b, 1.0)
    assert torch.equal(a.weight, b.weight)


# ---- the warm start (stage 1)

@pytest.mark.parametrize("packed", [False, True])
def test_warm_start_batch_equals_each_demonstration_alone(packed):
    # Stage 1's batch (base.sft_batch): one demonstration per row, right-padded (the default), or
    # several per row (--warm_pack, model.pack). The reference runs each demonstration by itself (no
    # padding, no mask) and averages the next-token loss over all response tokens of the batch. Loss
    # and every gradient must agree to float rounding.
    torch.manual_seed(0)
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                intermediate_size=64, max_seq_len=256)
    policy = model_lib.Transformer(cfg)
    family = tasks_lib.get_family("exactsumfb")
    batch = [base_lib.encode_pair(tok, p, r) for p, r in family.demonstrations(24, seed=3)]
    T = max(len(p) + len(r) for p, r in batch)
    summed = sum(torch.nn.functional.cross_entropy(policy(torch.tensor([p + r]))[0][0, len(p) - 1:-1], torch.tensor(r),
                                                   reduction="sum") for p, r in batch)
    alone = summed / sum(len(r) for _, r in batch)
    grads = torch.autograd.grad(alone, list(policy.parameters()))

    inputs = base_lib.sft_batch(batch, tok.pad_id, packed=packed)
    pidx, ptgt = inputs["idx"], inputs["targets"]
    assert pidx.shape[1] == T
    assert pidx.shape[0] < len(batch) if packed else pidx.shape[0] == len(batch)  # packed: fewer rows, none longer
    assert (ptgt != -100).sum() == sum(len(r) for _, r in batch)  # every response token once
    assert sorted(pidx[pidx != tok.pad_id].tolist()) == sorted(t for p, r in batch for t in p + r)
    _, loss = policy(**inputs)
    assert loss.item() == pytest.approx(alone.item(), abs=1e-5)
    for g, h in zip(grads, torch.autograd.grad(loss, list(policy.parameters()))):
        assert torch.allclose(g, h, atol=1e-5, rtol=1e-4)
    if packed:
        # each sequence sees only itself: its logits in the packed rows are those of it alone
        positions, mask = inputs["positions"], inputs["mask"]
        logits, _ = policy(pidx, positions=positions, mask=mask)
        seen = 0
        for row in range(len(pidx)):
            starts = ((positions[row] == 0) & (pidx[row] != tok.pad_id)).nonzero().flatten().tolist()
            ends = starts[1:] + [int((pidx[row] != tok.pad_id).sum())]
            for a, b in zip(starts, ends):
                assert torch.allclose(logits[row, a:b], policy(pidx[row, a:b][None])[0][0], atol=1e-5)
                seen += 1
        assert seen == len(batch)


# ---- config

def test_config_parsing_and_errors():
    cfg, given = runs.parse_args(["--iters=7", "--lr=0.001", "--dr_grpo", "--method=grpo"])
    assert (cfg.iters, cfg.lr, cfg.dr_grpo, cfg.method) == (7, 0.001, True, "grpo") and "iters" in given
    with pytest.raises(ValueError, match="unknown config key 'itres'.*valid keys:.*iters"):
        runs.parse_args(["--itres=3"])
    with pytest.raises(ValueError, match="--iters expects int, got 'many'"):
        runs.parse_args(["--iters=many"])
    with pytest.raises(ValueError, match="method must be one of"):
        runs.parse_args(["--method=ppo"])
    with pytest.raises(ValueError, match="min_size .* must be <= buffer_size"):
        runs.parse_args(["--min_size=10", "--buffer_size=5"])
    with pytest.raises(ValueError, match="expects a bool"):
        runs.parse_args(["--resume=maybe"])
    assert "--kappa" in runs.config_help() and "inverse temperature" in runs.config_help()


def test_a_library_run_checks_its_config_too(tmp_path):
    """runs.train(exit.Config(...)) skips the command line: a misspelt method would otherwise train the Curriculum
    rung (uses_buffer, and no self-iteration), and a bad value fail deep inside; both fail before any work."""
    for bad, match in ((dict(method="exti"), "method must be one of"), (dict(group_size=1), "group_size must be >= 2")):
        with pytest.raises(ValueError, match=match):
            runs.train(exit_lib.Config(out_dir=str(tmp_path / "run"), **bad), quiet=True)
        assert not (tmp_path / "run").exists() or runs.run_artifacts(str(tmp_path / "run")) == []


def test_method_ladder_switches():
    on = {m: exit_lib.Config(method=m) for m in exit_lib.METHODS}
    assert [on[m].uses_buffer for m in exit_lib.METHODS] == [False, True, True, True, True]
    assert [on[m].self_iterates for m in exit_lib.METHODS] == [False, False, True, True, True]
    assert [on[m].diverge_prob > 0 for m in exit_lib.METHODS] == [False, False, False, True, True]
    assert [on[m].diversity_bonus for m in exit_lib.METHODS] == [False, False, False, False, True]


def test_difficulty_mix_option():
    assert tasks_lib.parse_difficulties("2-6") == (2, 3, 4, 5, 6)
    assert tasks_lib.parse_difficulties("2,3,5") == (2, 3, 5)
    for bad in ("a", "0-3", "6-2", "2,,3", "-"):
        with pytest.raises(ValueError, match="difficulties looks like"):
            runs.parse_args([f"--difficulties={bad}"])
    with pytest.raises(ValueError, match="does not apply to realmath"):  # before any work, before the file is read
        runs.preflight(runs.parse_args(["--task=realmath", "--data=x.jsonl", "--init=x", "--difficulties=2-3"])[0])
    with pytest.raises(ValueError, match="does not apply to realmath"):  # its pool would be cycled: repeats
        tasks_lib.make_family("realmath", "x.jsonl", "1-3")
    fam = tasks_lib.make_family("math", difficulties="5,7")
    assert fam.train_difficulties == (5, 7) and tasks_lib.get_family("math").train_difficulties == (2, 3, 4)
    assert {p.difficulty for p in fam.sample("train", 40, seed=0)} == {5, 7}
    assert sorted({p.difficulty for p in eval_lib.heldout_problems(fam, 10)}) == [5, 7]  # the held-out mix follows
    # the warm-start cache is keyed by the mix, and by the demonstrations themselves
    default, mixed = exit_lib.Config(task="math"), exit_lib.Config(task="math", difficulties="5,7")
    key, math_family = base_lib.warm_start_key, tasks_lib.get_family("math")
    assert key(mixed, fam) != key(default, math_family) == key(default, tasks_lib.get_family("math"))
    own = exit_lib.Config(task="math", difficulties="2-4")  # the family's own mix, named: the same base, not another
    assert key(own, tasks_lib.make_family("math", difficulties="2-4")) == key(default, math_family)
    edited = tasks_lib.get_family("math")
    edited.answer_format = "x"                        # a change the error model does not show ...
    assert key(default, edited) == key(default, math_family)  # ... and the compact demos do not use
    edited.solve = lambda problem, alt: "#0"          # a change to what the demonstrations say
    assert key(default, edited) != key(default, math_family)
    # and by the batch layout: packed sums differ in rounding, so a padded base is not reused for a packed run
    assert key(exit_lib.Config(task="math", warm_pack=True), math_family) != key(default, math_family)


def test_grad_clip_must_be_positive():
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        runs.parse_args(["--grad_clip=0"])


def test_an_evaluation_file_has_no_validation_split():
    with pytest.raises(ValueError, match="no validation split"):
        runs.parse_args(["--eval_split=val", "--eval_data=held_out.jsonl"])
    with pytest.raises(ValueError, match="eval_split must be"):
        runs.parse_args(["--eval_split=dev"])


def test_a_family_brings_its_recommended_settings_unless_set():
    """--task=tools trains with the paper's tool-use recipe without a list of flags; a key given on the command
    line wins; other families are untouched; config.json records the resolved values."""
    cfg, given = runs.parse_args(["--task=tools"])
    assert (cfg.dr_grpo, cfg.epochs, cfg.p_div, cfg.filter_malformed, cfg.buffer_size, cfg.min_size, cfg.eval_k) == \
        (True, 2, 0.5, True, 640, 320, 4) and given == {"task"}
    cfg, _ = runs.parse_args(["--task=tools", "--epochs=1", "--buffer_size=64", "--min_size=8"])
    assert (cfg.epochs, cfg.buffer_size, cfg.min_size, cfg.dr_grpo) == (1, 64, 8, True)
    assert runs.parse_args([])[0] == exit_lib.Config()


def test_a_given_buffer_size_scales_the_recommended_min_size():
    cfg, _ = runs.parse_args(["--task=tools", "--buffer_size=16"])
    assert (cfg.buffer_size, cfg.min_size) == (16, 8)  # the recipe's B_min / N = 320 / 640, kept


# ---- the base shipped with the code (bases/, base.ship)

SHIPPED = os.path.join(HERE, "bases", "exactsumfb")


def shipped_record():
    return hf.read_json(os.path.join(SHIPPED, "base.json"))


def test_the_shipped_base_is_the_default_settings_base():
    """Fails when the family, its demonstrations, the architecture or the warm start change and the shipped
    base is not made again: a stale base is never used silently (its key no longer matches)."""
    cfg, rec = exit_lib.Config(), shipped_record()
    key = base_lib.warm_start_key(cfg, tasks_lib.make_family(cfg.task))
    assert rec["key"] == key, (f"bases/{cfg.task} is stale: it was made for key {rec['key']}, the default settings "
                               f"now give {key}; make it again with `OMP_NUM_THREADS=1 python base.py` and commit bases/")
    assert rec["settings"] == {k: getattr(cfg, k) for k in base_lib.SETTINGS}
    with open(os.path.join(SHIPPED, "model.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == rec["sha256"]
    # the key holds the architecture's settings, not the code's constants (model.toy_config, ModelConfig's defaults:
    # rope_theta, norm_eps, ...): the model a default run builds around the shipped weights is the one they were saved from
    policy = base_lib.warm_start(cfg, tasks_lib.make_family(cfg.task), torch.device("cpu"), quiet=True)[0]
    assert policy.config == hf.config_from_hf(hf.read_json(os.path.join(SHIPPED, "config.json"))), \
        f"bases/{cfg.task}/config.json is not the model this code builds: make the base again (python base.py)"
    # the Base row of every RL seed the ladder runs, on both splits, at a run's default evaluation settings
    want = [eval_lib.eval_settings(dataclasses.asdict(dataclasses.replace(cfg, seed=s, eval_split=split)))
            for split in ("test", "val") for s in range(base_lib.SEEDS)]
    assert [r["settings"] for r in rec["evaluations"]] == want


def test_the_default_run_uses_the_shipped_base_and_its_recorded_evaluation(tmp_path, capsys):
    cfg = exit_lib.Config(base_dir=str(tmp_path / "base"), device="cpu")
    fam, efam = tasks_lib.make_family(cfg.task), tasks_lib.make_family(cfg.task)
    policy, tok, path = base_lib.warm_start(cfg, fam, torch.device("cpu"))
    assert path == SHIPPED and "using the base shipped in bases/exactsumfb" in capsys.readouterr().out
    assert not (tmp_path / "base").exists()  # nothing trained, nothing cached
    toy = model_lib.toy_config(tok.vocab_size)  # the architecture warm_start builds
    assert policy.config == dataclasses.replace(toy, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                                n_kv_head=cfg.n_kv_head, intermediate_size=3 * cfg.n_embd)
    assert tok.encode("3 7>10") == tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS).encode("3 7>10")
    # a run's Base row comes from the record, without loading or evaluating the base again
    rec, loads = shipped_record(), []
    settings = eval_lib.eval_settings(dataclasses.asdict(cfg))
    assert base_lib.evaluate_base(path, tok, efam, "cpu", lambda *a: loads.append(a), **settings) == rec["evaluations"][0]
    assert loads == []
    # and the weights are the ones evaluated: the small evaluation made when the base was shipped, again here
    again = eval_lib.evaluate_policy(policy, tok, efam, **base_lib.CHECK)
    assert again["score"] == rec["check"]["score"] and again["fix_rate"] == rec["check"]["fix_rate"]
    assert report.frozen_base(path, "cpu") is not None  # the run's task diversity and chain.txt embed with it


def test_another_base_seed_does_not_use_the_shipped_base(capsys):
    fam, key, shipped = tasks_lib.make_family("exactsumfb"), base_lib.warm_start_key, base_lib.shipped_base
    rl_seed = exit_lib.Config(seed=3)  # the RL seed is not the base's
    assert shipped(rl_seed, key(rl_seed, fam)) == SHIPPED and capsys.readouterr().out == ""
    for cfg in (exit_lib.Config(base_seed=1), exit_lib.Config(base_seed=-1, seed=1), exit_lib.Config(n_embd=64),
                exit_lib.Config(warm_steps=1000)):
        assert shipped(cfg, key(cfg, fam)) is None
        assert "not using the shipped base" in capsys.readouterr().out
    assert key(exit_lib.Config(base_seed=-1), fam) == key(exit_lib.Config(), fam)  # -1 at seed 0: the same base
    assert shipped(exit_lib.Config(task="math"), "any") is None and capsys.readouterr().out == ""  # nothing shipped
    with pytest.raises(ValueError, match="base_seed must be >= 0, or -1"):
        runs.parse_args(["--base_seed=-2"])


def test_rl_seeds_share_one_base_unless_base_seed_is_minus_one(tmp_path):
    """--seed varies RL alone: two seeds train one base (cached once); --base_seed=-1 gives each seed its own."""
    for seed in (0, 1):
        runs.prepare(tiny_cfg(tmp_path / f"one{seed}", seed=seed, base_dir=str(tmp_path / "one")), quiet=True)
        runs.prepare(tiny_cfg(tmp_path / f"own{seed}", seed=seed, base_seed=-1, base_dir=str(tmp_path / "own")),
                         quiet=True)
    assert len(list((tmp_path / "one").glob("*.pt"))) == 1 and len(list((tmp_path / "own").glob("*.pt"))) == 2


# ---- the loop, on a tiny policy

def tiny_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), base_dir=str(tmp_path / "base"), n_layer=1, n_embd=32, n_head=2,
                n_kv_head=1, warm_examples=64, warm_steps=3, warm_batch=8, iters=4, tasks_per_iter=3,
                group_size=4, max_new_tokens=12, buffer_size=16, min_size=2, replay_prob=0.7, ckpt_every=2,
                eval_problems=0, show_every=0, lr=1e-3, device="cpu")
    base.update(kw)
    return runs.check_config(exit_lib.Config(**base))


def text_scores(monkeypatch, task=exit_lib.Config().task):
    """A barely trained tiny policy scores 0 everywhere: its groups carry no gradient, its weights never move, and
    "the same weights" or "the same evaluation" would hold whatever weights were compared. A score of the answer's
    text instead (on the family's class: every step builds its own family), so that a tiny run really trains."""
    family = tasks_lib.FAMILIES[task]
    monkeypatch.setattr(family, "score", lambda self, p, a: float(zlib.crc32(str(a).encode()) % 2))
    if family.multi_turn:
        monkeypatch.setattr(family, "episode_reward", lambda self, e, answers: float(zlib.crc32(str(answers).encode()) % 2))


def test_one_iteration_changes_parameters(tmp_path, monkeypatch):
    tr = runs.prepare(tiny_cfg(tmp_path, beta=0.01), quiet=True)
    # a barely trained tiny policy scores 0 everywhere, and equal rewards give no gradient: alternate them
    rewards = itertools.count()
    monkeypatch.setattr(tr, "reward", lambda inst, answers: float(next(rewards) % 2))
    # what the update is handed: Eq. 3's advantages times the Eq. 6 coefficients the trainer computed
    ds, seen, diversity, update = [], {}, exit_lib.diversity_coefficients, tr.update
    monkeypatch.setattr(exit_lib, "diversity_coefficients", lambda *a, **kw: ds.append(diversity(*a, **kw)) or ds[-1])

    def eq4_loss(prompts, ro, adv):  # the update's objective (no KL term: ref == policy before the step)
        with torch.no_grad():
            logp = model_lib.completion_logprobs(tr.policy, prompts, ro.tokens, ro.lengths, tr.cfg.group_size)
            return float(exit_lib.grpo_loss(logp, ro.logprobs, adv, ro.mask)[0])

    def recording_update(prompts, ro, adv, kept):
        seen.update(adv=adv.clone(), before=eq4_loss(prompts, ro, adv))
        stats = update(prompts, ro, adv, kept)
        seen["after"] = eq4_loss(prompts, ro, adv)
        return stats

    monkeypatch.setattr(tr, "update", recording_update)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    out = tr.iteration()
    log = out["log"]
    assert all(map(lambda v: v is None or isinstance(v, str) or torch.isfinite(torch.tensor(float(v))),
                   [log[k] for k in ("loss", "kl", "clip_frac", "reward", "grad_norm")]))
    assert (out["rewards"].amax(1) - out["rewards"].amin(1)).min() > 0 and log["grad_norm"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))
    assert len(tr.buffer) > 0 and log["iter"] == 1
    assert log["div_max"] >= log["div_mean"] > 0  # full ExIt logs the scale of its Eq. 6 coefficients
    # Eq. 6 is applied, d_i A_i (dr_grpo is off: Eq. 3 divides by std), and it is not the identity here
    plain = exit_lib.group_advantages(out["rewards"]).flatten()
    assert len(ds) == len(out["rewards"]) and torch.allclose(seen["adv"], plain * torch.stack(ds).flatten(), atol=1e-6)
    assert not torch.allclose(seen["adv"], plain, atol=1e-3)
    assert seen["after"] < seen["before"]  # the step descends Eq. 4 (a sign error would still move every weight)
    assert "div_mean" not in runs.prepare(tiny_cfg(tmp_path / "g", method="improve"), quiet=True).iteration()["log"]


def one_sgd_update(tr, group, new_tokens, drop=()):
    """The parameters before and after one update on a fixed batch, the rollouts `drop` filtered out (kept 0).
    Plain SGD, so the update is the (clipped) gradient itself; Adam's first step, ~lr * sign(g), would magnify
    float rounding in near-zero gradients."""
    tr.opt = torch.optim.SGD(tr.policy.parameters(), lr=0.1)
    prompts = [tr.prompt_ids(i) for i in tr.draw_instances()]
    ro = model_lib.generate(tr.policy, prompts, group, new_tokens, stop_ids=tr.tok.stop_ids, pad_id=tr.tok.pad_id,
                            generator=torch.Generator().manual_seed(1))
    initial = [p.detach().clone() for p in tr.policy.parameters()]
    adv, kept = torch.linspace(-1, 1, len(ro.lengths)), torch.ones(len(ro.lengths))
    kept[list(drop)] = 0.0

    def eq4_loss():  # Eq. 4 on this batch, written out from the pure function: the step must descend it
        with torch.no_grad():
            logp = model_lib.completion_logprobs(tr.policy, prompts, ro.tokens, ro.lengths, group)
            return float(exit_lib.grpo_loss(logp, ro.logprobs, adv * kept, ro.mask * kept[:, None])[0])

    loss_before = eq4_loss()
    tr.update(prompts, ro, adv, kept)
    # a sign error on the advantages (ascending the loss) still changes every parameter: the loss must fall
    assert eq4_loss() < loss_before
    return initial, [p.detach().clone() for p in tr.policy.parameters()]


@pytest.mark.parametrize("drop", [(), (0, 5, 6, 11)])  # and with --filter_malformed's dropped rollouts (Trainer.kept)
def test_micro_batches_give_the_same_update(tmp_path, drop):
    states = []
    for mb in (0, 4, 6):  # 6 with groups of 4: rounded down to whole groups (4)
        tr = runs.prepare(tiny_cfg(tmp_path / f"mb{mb}", micro_batch=mb, method="grpo"), quiet=True)
        torch.manual_seed(0)
        initial, after = one_sgd_update(tr, group=4, new_tokens=10, drop=drop)
        states.append(after)
    for a, b, b6, c in zip(*states, initial):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, b6, atol=1e-6)
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(states[0], initial))  # the update did something
    if drop:  # ... and not the update of the whole batch
        tr = runs.prepare(tiny_cfg(tmp_path / "all", method="grpo"), quiet=True)
        torch.manual_seed(0)
        whole = one_sgd_update(tr, group=4, new_tokens=10)[1]
        assert any(not torch.allclose(a, w, atol=1e-4) for a, w in zip(states[0], whole))


def test_the_logged_update_statistics_do_not_depend_on_micro_batches(tmp_path):
    """clip_frac, kl and ratio_mean are means over the batch's tokens (Trainer.update) whatever --micro_batch is:
    with rows of unequal lengths, weighting each micro-batch by its rows instead of its tokens logs other numbers."""
    logs = []
    for mb in (0, 4):
        tr = runs.prepare(tiny_cfg(tmp_path / f"mb{mb}", base_dir=str(tmp_path / "base"), micro_batch=mb,
                                   method="grpo", epochs=2, beta=0.1), quiet=True)
        tr.opt = torch.optim.SGD(tr.policy.parameters(), lr=0.5)  # a large step: the second epoch's ratios clip
        prompts = [tr.prompt_ids(i) for i in tr.draw_instances()]
        ro = model_lib.generate(tr.policy, prompts, 4, 10, stop_ids=tr.tok.stop_ids, pad_id=tr.tok.pad_id,
                                generator=torch.Generator().manual_seed(1))
        ro.lengths = torch.arange(len(ro.lengths)) % 10 + 1  # 1..10 tokens: micro-batches of unequal token counts
        ro.mask = (torch.arange(ro.tokens.shape[1])[None] < ro.lengths[:, None]).float()
        logs.append(tr.update(prompts, ro, torch.linspace(-1, 1, len(ro.lengths)), torch.ones(len(ro.lengths))))
    assert logs[0]["kl"] > 0 and logs[0]["clip_frac"] > 0
    for k in ("clip_frac", "kl", "ratio_mean", "loss", "grad_norm"):
        assert logs[1][k] == pytest.approx(logs[0][k], rel=1e-5, abs=1e-8), k


@pytest.mark.parametrize("micro_batch", [0, 8])  # Trainer.update, and scale.ScaleTrainer's
def test_nonfinite_update_is_skipped(tmp_path, micro_batch):
    tr = runs.prepare(tiny_cfg(tmp_path, method="grpo", micro_batch=micro_batch), quiet=True)
    assert isinstance(tr, scale.ScaleTrainer) == bool(micro_batch)
    prompts = [tr.prompt_ids(i) for i in tr.draw_instances()]
    ro = model_lib.generate(tr.policy, prompts, 4, 8, stop_ids=tr.tok.stop_ids, pad_id=tr.tok.pad_id)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    adv = torch.full((len(ro.lengths),), float("nan"))
    stats = tr.update(prompts, ro, adv, torch.ones(len(adv)))
    assert tr.skipped == 1
    assert stats["loss"] is None and stats["grad_norm"] is None  # no step taken: not a flat step of loss 0
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))


def run_state(tr):
    return [p.detach().clone() for p in tr.policy.parameters()], tr.buffer.state_dict()


@pytest.mark.parametrize("method", ["exit", "curriculum"])
def test_resume_is_bit_identical(tmp_path, method, monkeypatch):
    monkeypatch.setattr(exit_lib.Trainer, "SEEN", 5)  # a small diversity sample: its generator is used, and resumed
    text_scores(monkeypatch)  # the weights compared below have moved: a resume that lost them would show
    full = runs.train(tiny_cfg(tmp_path / "a", iters=4, method=method, beta=0.01, ref_every=2), quiet=True)
    runs.train(tiny_cfg(tmp_path / "b", iters=2, method=method, beta=0.01, ref_every=2, base_dir=str(tmp_path / "a" / "base")), quiet=True)
    cfg, given = runs.parse_args([f"--out_dir={tmp_path / 'b' / 'run'}", "--resume", "--iters=4"])
    resumed = runs.train(cfg, given, quiet=True)
    assert resumed.iter == 4 and resumed.cfg.method == method
    pa, ba = run_state(full)
    pb, bb = run_state(resumed)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert json.dumps(ba, sort_keys=True) == json.dumps(bb, sort_keys=True)
    assert full.seen["n"] == resumed.seen["n"] > 5 and full.seen["ids"] == resumed.seen["ids"]
    la = [json.loads(l) for l in open(tmp_path / "a" / "run" / "log.jsonl")]
    lb = [json.loads(l) for l in open(tmp_path / "b" / "run" / "log.jsonl")]
    strip = lambda l: {k: v for k, v in l.items() if k not in ("tok_per_s", "elapsed", "sample_frac")}
    assert [strip(l) for l in la] == [strip(l) for l in lb]
    assert sum(l["grad_norm"] > 0 for l in la) >= 2 and 0 < np.mean([l["reward"] for l in la]) < 1


def test_checkpoint_errors(tmp_path):
    cfg = tiny_cfg(tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        runs.prepare(cfg, quiet=True)
    runs.train(tiny_cfg(tmp_path, iters=1), quiet=True)
    ck = os.path.join(cfg.out_dir, "ckpt.pt")
    with pytest.raises(FileExistsError, match="--resume"):  # never silently overwrite a run
        runs.prepare(tiny_cfg(tmp_path), quiet=True)
    with pytest.raises(ValueError, match="differ from the checkpoint's: lr"):
        runs.prepare(dataclasses.replace(cfg, lr=0.5), {"lr", "resume"}, quiet=True)
    data = open(ck, "rb").read()
    open(ck, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        runs.prepare(cfg, quiet=True)
    torch.save({"hello": 1}, ck)
    with pytest.raises(ValueError, match="not an exit checkpoint"):
        runs.prepare(cfg, quiet=True)
    # --init of a file that unpickles but holds no policy, or another model's: one line, not a traceback
    odd = tmp_path / "odd.pt"
    for state, why in (({"policy": 5}, "odd.pt is not an exit checkpoint"),
                       ({"policy": {"model_config": {"n_layer": 1}, "model": {}, "tokenizer": None}},
                        "odd.pt: its policy does not build")):
        torch.save(state, odd)
        with pytest.raises(ValueError, match=why):
            hf.load_policy(str(odd), "cpu")


def test_a_cached_base_that_is_another_checkpoint_is_refused(tmp_path, capsys):
    """A run's ckpt.pt under a base's cache name would silently become the base (and its Base row): refused, with
    the way out; the cache's own base is used."""
    args = tiny_args(tmp_path / "run", tmp_path / "base", iters=1)
    exit_lib.main(args)
    (cache,) = (tmp_path / "base").glob("*.pt")
    own = cache.read_bytes()
    cache.write_bytes((tmp_path / "run" / "ckpt.pt").read_bytes())
    err = main_fails(capsys, tiny_args(tmp_path / "run2", tmp_path / "base", iters=1))
    assert "is not the base of these settings (a run checkpoint" in err and "delete it to warm-start anew" in err
    cache.write_bytes(own)
    exit_lib.main(tiny_args(tmp_path / "run3", tmp_path / "base", iters=1))
    assert "reusing" in capsys.readouterr().out


def test_script_end_to_end(tmp_path):
    args = [f"--{k}={v}" for k, v in dict(out_dir=tmp_path / "run", base_dir=tmp_path / "base", n_layer=1, n_embd=32,
                                          n_head=2, n_kv_head=1, warm_examples=64, warm_steps=3, warm_batch=8, iters=2,
                                          tasks_per_iter=2, group_size=4, max_new_tokens=12, min_size=2,
                                          eval_problems=4, eval_k=2, eval_samples=1, device="cpu").items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "exit.py"), *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "run"
    assert {"config.json", "log.jsonl", "ckpt.pt", "eval.json"} <= set(os.listdir(run))
    assert json.load(open(run / "config.json"))["iters"] == 2
    assert len(open(run / "log.jsonl").read().splitlines()) == 2
    res = json.load(open(run / "eval.json"))
    assert len(res["policy"]["score"]) == 3 and "done: 2 iterations" in p.stdout
    assert f"python eval.py {run}" in p.stdout and f"python hf.py {run}" in p.stdout  # what to run next
    # python eval.py RUN: the table, the lineage and one held-out chain (show_chain), base beside trained, printed too
    show = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), str(run), "--device=cpu"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    chain = (run / "chain.txt").read_text()
    assert chain in show.stdout + "\n" and len(chain.splitlines()) == 2 + 3 and "base" in chain.splitlines()[1]
    assert (run / "lineage.png").is_file() and (run / "results.json").is_file()
    # python hf.py RUN: the trained policy as a Hugging Face directory, the same weights as ckpt.pt
    exp = subprocess.run([sys.executable, os.path.join(HERE, "hf.py"), str(run)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert exp.returncode == 0 and str(run / "hf") in exp.stdout, exp.stderr[-2000:]
    back = hf.load_policy(str(run / "hf"), "cpu")[0].state_dict()
    assert all(torch.equal(back[k], v) for k, v in hf.load_policy(str(run / "ckpt.pt"), "cpu")[0].state_dict().items())
    nothing = subprocess.run([sys.executable, os.path.join(HERE, "hf.py"), str(tmp_path / "nowhere")], capture_output=True,
                             text=True, env=env, timeout=120)
    assert nothing.returncode == 2 and "no checkpoint at" in nothing.stderr and "Traceback" not in nothing.stderr
    (tmp_path / "a_file").write_text("")
    refused = subprocess.run([sys.executable, os.path.join(HERE, "hf.py"), str(run), f"--out={tmp_path / 'a_file'}"],
                             capture_output=True, text=True, env=env, timeout=120)  # a write refused: one line
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    # the chain is drawn at the run's own settings: --k cuts the table, not the chain.txt beside eval.json
    os.remove(run / "chain.txt")
    report.main([str(run), "--k=1", "--device=cpu", "--out", str(tmp_path / "k1")])
    assert (run / "chain.txt").read_text() == chain
    # a chain older than the checkpoint (a --resume extended the run) is drawn again; one that cannot be drawn
    # (a damaged checkpoint) is a warning, and the comparison is still written
    os.utime(run / "chain.txt", (1, 1))
    report.main([str(run), "--device=cpu", "--out", str(tmp_path / "again")])
    assert os.path.getmtime(run / "chain.txt") > 1 and (run / "chain.txt").read_text() == chain
    os.remove(run / "chain.txt")
    (run / "ckpt.pt").write_bytes(b"not a checkpoint")
    report.main([str(run), "--device=cpu", "--out", str(tmp_path / "broken")])
    assert (tmp_path / "broken" / "results.json").is_file() and not (run / "chain.txt").exists()
    assert "time: warm start " in p.stdout and "update " in p.stdout and "evaluation " in p.stdout
    bad = subprocess.run([sys.executable, os.path.join(HERE, "exit.py"), "--itres=3"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown config key 'itres'" in bad.stderr and "Traceback" not in bad.stderr


def test_eq6_embeds_the_new_iterate_not_the_raw_response(tmp_path, monkeypatch):
    """A keep reply "=" leaves the current answer as the new iterate: Eq. 6 must compare that answer's
    solution with the others, not the one-character string "=" (an outlier by construction)."""
    tr = runs.prepare(tiny_cfg(tmp_path, task="exactsum", method="exit", tasks_per_iter=1), quiet=True)
    p = tr.family.sample("train", 1, 0)[0]
    current = tr.family.render(p, p.data["best"][:1], False)
    inst = exit_lib.Instance(problem=p, turn=0, prev=[], answer=current, mode="improve", depth=1, uid=None, replay=False)
    other = tr.family.solve(p, False)
    monkeypatch.setattr(tr, "draw_instances", lambda: [inst])
    monkeypatch.setattr(exit_lib.model_lib, "generate", lambda *a, **kw: rollouts_of(tr.tok, [tasks.KEEP, other] * 2))
    seen = []
    real_embed = exit_lib.model_lib.embed
    monkeypatch.setattr(exit_lib.model_lib, "embed", lambda m, seqs: seen.append(seqs) or real_embed(m, seqs))
    tr.iteration()
    keep_sol, other_sol = (tr.tok.encode(tr.family.solution_text(a)) for a in (current, other))
    assert seen == [[keep_sol, other_sol, keep_sol, other_sol]]


def test_stored_logprobs_are_those_of_the_tempered_distribution(tmp_path):
    """At T = 0.5 the sampler stores log softmax(logits / T) of the sampled tokens (checked against a plain
    forward written out here), and the update's first-epoch ratio is exactly 1: the training forward uses
    the same tempered distribution."""
    T = 0.5
    tr = runs.prepare(tiny_cfg(tmp_path, temperature=T, epochs=1, method="grpo"), quiet=True)
    prompts = [tr.prompt_ids(i) for i in tr.draw_instances()]
    ro = model_lib.generate(tr.policy, prompts, 4, 12, temperature=T, stop_ids=tr.tok.stop_ids,
                            pad_id=tr.tok.pad_id, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for r in range(len(ro.lengths)):
            p, n = prompts[r // 4], int(ro.lengths[r])
            seq = torch.tensor([p + ro.tokens[r, :n].tolist()])
            logits = tr.policy(seq)[0][0, len(p) - 1:len(p) - 1 + n]
            ref = torch.log_softmax(logits / T, -1).gather(-1, ro.tokens[r, :n, None]).squeeze(-1)
            assert torch.allclose(ro.logprobs[r, :n], ref, atol=1e-5), r
    stats = tr.update(prompts, ro, torch.linspace(-1, 1, len(ro.lengths)), torch.ones(len(ro.lengths)))
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["clip_frac"] == 0.0


def test_filtered_rollouts_get_no_gradient_not_even_from_the_kl(tmp_path, monkeypatch):
    """--filter_malformed with β > 0: a batch of malformed responses leaves the policy unchanged, although the
    policy differs from its reference (so their KL term alone would move it)."""
    tr = tools_trainer(tmp_path, filter_malformed=True, beta=0.1, method="grpo", group_size=2, tasks_per_iter=2)
    with torch.no_grad():
        for q in tr.ref.parameters():
            q.add_(0.05 * torch.randn_like(q))
    monkeypatch.setattr(exit_lib.model_lib, "generate", lambda m, prompts, n, *a, **kw:
                        rollouts_of(tr.tok, ["garbage"] * (len(prompts) * n)))
    before = [q.detach().clone() for q in tr.policy.parameters()]
    tr.iteration()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))
    tr.cfg.filter_malformed = False  # the control: the same batch unfiltered moves the policy through the KL
    tr.iteration()
    assert not all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))


def test_training_with_kl_refreshes_the_reference(tmp_path):
    """β > 0, M = 2, α = 1: the KL to the reference is positive once the policy has moved, the reference is
    the policy itself right after iteration M, and the next iteration starts from KL = 0."""
    tr = runs.prepare(tiny_cfg(tmp_path, beta=0.01, ref_every=2, ref_alpha=1.0, epochs=1), quiet=True)
    assert tr.iteration()["log"]["kl"] == 0.0             # iteration 1 starts at ref = θ
    with torch.no_grad():  # θ moves (by hand: a tiny untrained policy may find no reward signal to move on)
        for q in tr.policy.parameters():
            q.add_(0.05 * torch.randn_like(q))
    assert tr.iteration()["log"]["kl"] > 0
    assert all(torch.equal(a, b) for a, b in zip(tr.ref.parameters(), tr.policy.parameters()))
    assert tr.iteration()["log"]["kl"] == 0.0             # refreshed: ref = θ again


def test_beta_zero_keeps_no_reference_and_old_checkpoints_still_resume(tmp_path):
    """β = 0, full ExIt: no reference policy, one frozen copy of the base as Eq. 6's embedder. A checkpoint saved
    when that copy was kept under "ref" (before the two were separated) resumes into the embedder."""
    tr = runs.prepare(tiny_cfg(tmp_path, method="exit", beta=0.0), quiet=True)
    assert tr.ref is None and tr.embedder is not None and tr.embedder is not tr.policy
    with torch.no_grad():
        for q in tr.embedder.parameters():
            q.add_(1.0)  # so that a load which skipped the embedder would show
    state = tr.state_dict()
    old = dict(state, ref=state["embedder"], embedder=None)
    again = runs.prepare(tiny_cfg(tmp_path, method="exit", beta=0.0), quiet=True)
    again.load_state_dict(old)
    assert again.ref is None
    assert all(torch.equal(a, b) for a, b in zip(again.embedder.parameters(), tr.embedder.parameters()))


def test_heldout_curve_during_training_leaves_training_unchanged(tmp_path, monkeypatch):
    """--eval_every=2: log lines 2 and 4 carry the held-out slice's k = 0 and k = K scores, and the run trains
    exactly as the same run without it (the evaluation's sampler has its own generator)."""
    text_scores(monkeypatch)  # the runs train, and the slice's scores are not all 0
    plain = runs.train(tiny_cfg(tmp_path / "a", iters=4), quiet=True)
    evaluations, evaluate = [], exit_lib.Trainer.evaluate
    monkeypatch.setattr(exit_lib.Trainer, "evaluate", lambda self, **kw: evaluations.append((kw, evaluate(self, **kw)))
                        or evaluations[-1][1])
    curved = runs.train(tiny_cfg(tmp_path / "b", iters=4, eval_every=2, eval_every_problems=3, eval_k=1,
                                     base_dir=str(tmp_path / "a" / "base")), quiet=True)
    (pa, ba), (pb, bb) = run_state(plain), run_state(curved)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)) and json.dumps(ba, sort_keys=True) == json.dumps(bb, sort_keys=True)
    logs = [json.loads(l) for l in open(tmp_path / "b" / "run" / "log.jsonl")]
    assert sum(l["grad_norm"] > 0 for l in logs) >= 2
    assert [(kw["n_problems"], kw["K"], kw["n_samples"]) for kw, _ in evaluations] == [(3, 1, 1)] * 2
    scores = [(res["score"][0], res["score"][-1]) for _, res in evaluations]
    assert [(l.get("heldout_k0"), l.get("heldout_kK")) for l in logs] == [(None, None), scores[0], (None, None), scores[1]]
    assert any(s > 0 for pair in scores for s in pair)


def test_bf16_reference_refreshes_every_ref_every_iterations_as_trainer_does(tmp_path):
    """Trainer.refresh_reference's schedule, (iter + 1) % M == 0, under bf16's fp32 EMA too: M = 2 refreshes after
    iterations 1, 3, ... (iter 0-based), never after the first (ref_every=1 in the EMA test cannot tell)."""
    tr = runs.prepare(tiny_cfg(tmp_path, dtype="bf16", beta=0.01, ref_every=2, ref_alpha=0.5), quiet=True)
    with torch.no_grad():
        for m, p in zip(tr.master, tr.policy.parameters()):
            p.copy_(m.mul_(1.5))
    before = [m.clone() for m in tr.ref_master]
    tr.iter = 0
    tr.refresh_reference()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.ref_master))
    tr.iter = 1
    tr.refresh_reference()
    assert all(torch.equal(m, b.lerp(p, 0.5)) for m, b, p in zip(tr.ref_master, before, tr.master))

def test_a_skipped_epoch_is_not_counted_in_the_logged_loss(tmp_path, monkeypatch):
    """loss and grad_norm are means over the steps taken: epoch 1 non-finite (skipped), epoch 2 taken -> its loss."""
    tr = runs.prepare(tiny_cfg(tmp_path, method="grpo", epochs=2, micro_batch=12, tasks_per_iter=3), quiet=True)
    assert isinstance(tr, scale.ScaleTrainer)
    seen, real = [], tr.policy_loss
    def loss(*a):
        value, st = real(*a)
        seen.append(float(value.detach()))
        return (value * float("nan") if len(seen) == 1 else value), st
    monkeypatch.setattr(tr, "policy_loss", loss)
    prompts = [tr.prompt_ids(i) for i in tr.draw_instances()]
    ro = model_lib.generate(tr.policy, prompts, 4, 8, stop_ids=tr.tok.stop_ids, pad_id=tr.tok.pad_id,
                            generator=torch.Generator().manual_seed(1))
    stats = tr.update(prompts, ro, torch.linspace(-0.5, 1, len(ro.lengths)), torch.ones(len(ro.lengths)))
    assert tr.skipped == 1 and len(seen) == 2
    assert stats["loss"] == pytest.approx(seen[1]) and seen[1] != 0

# ===============================================================================================
# A real instruct checkpoint: --init=HF_DIR --task=realmath --data=FILE, chat prompts, export
# ===============================================================================================

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gsm_file(path, n=30):
    """GSM8K-style JSON lines; about a tenth of them land in the test split (tasks.split_of)."""
    lines = [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples does he have now?",
              "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"} for i in range(1, n + 1)]
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return path


def tiny_instruct(path, data):
    """A randomly initialised Llama-family checkpoint with a byte-level BPE tokenizer and a chat
    template, laid out like a Hugging Face download (what --init=DIR reads), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    family = tasks_lib.RealMath(path=str(data))
    texts = [family.prompt(p, "The answer is \\boxed{7}.", m, style="chat") for p in family.problems[:5]
             for m in tasks_lib.MODES]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.1, bos_token_id=None, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture
def instruct(tmp_path):
    data = gsm_file(tmp_path / "gsm.jsonl")
    return tiny_instruct(tmp_path / "instruct", data), data


def hf_cfg(tmp_path, instruct, **kw):
    ck, data = instruct
    base = dict(init=str(ck), task="realmath", data=str(data), out_dir=str(tmp_path / "run"), iters=2,
                tasks_per_iter=2, group_size=2, max_new_tokens=8, buffer_size=16, min_size=2, lr=1e-3,
                show_every=0, eval_problems=0, device="cpu")
    return runs.check_config(exit_lib.Config(**(base | kw)))


def test_realmath_config_errors():
    with pytest.raises(ValueError, match="--data=FILE goes with --task=realmath"):
        runs.parse_args(["--task=realmath", "--init=x"])
    with pytest.raises(ValueError, match="--data=FILE goes with --task=realmath"):
        runs.parse_args(["--data=x.jsonl"])
    with pytest.raises(ValueError, match="needs --init=HF_DIR"):
        runs.parse_args(["--task=realmath", "--data=x.jsonl"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        runs.parse_args(["--dtype=fp16"])


def test_hf_init_realmath_runs_resumes_evaluates_and_exports(tmp_path, instruct):
    from transformers import AutoModelForCausalLM
    ck, data = instruct
    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in dict(
        init=ck, task="realmath", data=data, out_dir=out, iters=2, tasks_per_iter=2, group_size=2,
        max_new_tokens=8, buffer_size=16, min_size=2, beta=0.01, micro_batch=2, grad_checkpoint=True,
        eval_problems=2, eval_k=1, eval_samples=1, show_every=0, device="cpu").items()]
    exit_lib.main(args)
    assert {"config.json", "log.jsonl", "ckpt.pt", "eval.json"} <= set(os.listdir(out))
    # config.json records the architecture that ran: the checkpoint's, not the toy's default settings
    ran, theirs = json.load(open(out / "config.json"))["policy"], hf.config_from_hf(json.load(open(f"{ck}/config.json")))
    assert (ran["n_embd"], ran["n_layer"], ran["vocab_size"]) == (theirs.n_embd, theirs.n_layer, theirs.vocab_size)
    ev = json.load(open(out / "eval.json"))
    assert ev["policy"]["K"] == 1 and ev["base"]["n"] == 2 and "net_corrections" in ev["policy"]
    state = model_lib.load_checkpoint(str(out / "ckpt.pt"))
    assert state["policy"]["tokenizer"]["kind"] == "files" and state["base_path"] == str(ck)
    assert state["embedder"] is None  # β > 0: the diversity bonus embeds with the reference, no third copy

    # the run folder is self-contained: the tokenizer, its chat template and stop ids come from ckpt.pt
    tr = runs.prepare(*runs.parse_args([f"--out_dir={out}", "--resume", "--iters=3"]), quiet=True)
    assert tr.style == "chat" and tr.tok.stop_ids == hf.load_tokenizer(str(ck)).stop_ids
    p = tr.train_pool[0]
    ids = tr.prompt_ids(exit_lib.Instance(problem=p, answer="It is \\boxed{3}.", mode="improve", step_problem=p))
    text = tr.tok.decode(ids, special=True)
    assert text.startswith("<|im_start|>user\n" + p.request) and text.endswith("<|im_start|>assistant\n")
    assert "Current answer:\nIt is \\boxed{3}." in text and "<|" not in tr.tok.decode(ids)

    exit_lib.main([f"--out_dir={out}", "--resume", "--iters=3"])
    assert len(open(out / "log.jsonl").read().splitlines()) == 3
    with pytest.raises(ValueError, match="evaluated \\(eval.json\\) with eval_data=''"):  # the real reason, not the task
        runs.prepare(*runs.parse_args([f"--out_dir={out}", "--resume", f"--eval_data={data}"]), quiet=True)
    # eval.py recomputes the run's own final evaluation exactly (chat prompts, realmath from --data)
    again = report.evaluate_checkpoint(str(out / "ckpt.pt"), device="cpu")
    assert again == json.load(open(out / "eval.json"))

    # the exported Hugging Face directory (python hf.py RUN): transformers reads it, same logits as our policy
    assert hf.export(str(out)) == str(out / "hf")
    policy, tok, _ = hf.load_policy(str(out / "ckpt.pt"), "cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    x = torch.tensor([ids[:40]])
    with torch.no_grad():
        assert torch.allclose(policy(x)[0], ref(x).logits, atol=1e-4)
        back, tok2, _ = hf.load_policy(str(out / "hf"), "cpu")
        assert torch.equal(back(x)[0], policy(x)[0])
    assert tok2.render_chat([{"role": "user", "content": "hi"}]) == tok.render_chat([{"role": "user", "content": "hi"}])
    assert tok2.stop_ids == tok.stop_ids


def test_hf_micro_batches_and_grad_checkpoint_give_the_same_update(tmp_path, instruct):
    states = []
    for mb, gc in ((0, False), (2, True)):
        tr = runs.prepare(hf_cfg(tmp_path / f"mb{mb}", instruct, micro_batch=mb, grad_checkpoint=gc,
                                     method="grpo", tasks_per_iter=3), quiet=True)
        assert tr.style == "chat" and tr.policy.grad_checkpoint == gc
        initial, after = one_sgd_update(tr, group=2, new_tokens=8)
        states.append(after)
    for a, b in zip(*states):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(states[0], initial))


def test_bf16_policy_steps_fp32_master_weights(tmp_path, instruct):
    tr = runs.prepare(hf_cfg(tmp_path, instruct, dtype="bf16", method="exit", tasks_per_iter=2), quiet=True)
    assert tr.ref is None and tr.embedder is tr.policy  # β = 0: no copy of the model at all
    tr.iteration()
    prompts = [tr.prompt_ids(i) for i in tr.draw_instances()]
    ro = model_lib.generate(tr.policy, prompts, 2, 8, stop_ids=tr.tok.stop_ids, pad_id=tr.tok.pad_id)
    before = [m.clone() for m in tr.master]
    tr.update(prompts, ro, torch.linspace(-1, 1, len(ro.lengths)), torch.ones(len(ro.lengths)))
    params = list(tr.policy.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params) and all(m.dtype == torch.float32 for m in tr.master)
    assert all(torch.equal(p, m.bfloat16()) for p, m in zip(params, tr.master))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.master))
    tr.save()
    with open(os.path.join(tr.cfg.out_dir, "log.jsonl"), "w") as f:  # as exit.train logs it: a resume checks it
        f.write(json.dumps(dict(iter=1)) + "\n")
    resumed = runs.prepare(dataclasses.replace(tr.cfg, resume=True), quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(tr.master, resumed.master))


def test_bf16_reference_moves_by_its_fp32_ema(tmp_path):
    """§2.2's ref <- α θ + (1 - α) ref under bf16: a step of (1 - α) of a weight's distance to θ is mostly below
    bf16's resolution, so the EMA runs on fp32 copies (as the policy's AdamW does), and a resume keeps them."""
    tr = runs.prepare(tiny_cfg(tmp_path, dtype="bf16", beta=0.01, ref_every=1, ref_alpha=0.1), quiet=True)
    with torch.no_grad():
        for m, p in zip(tr.master, tr.policy.parameters()):  # the policy drifts 2% from the reference
            p.copy_(m.mul_(1.02))
    expect = [r.float().lerp(m, 0.1) for r, m in zip(tr.ref.parameters(), tr.master)]
    tr.refresh_reference()
    assert all(torch.equal(m, e) for m, e in zip(tr.ref_master, expect))
    assert all(torch.equal(r, e.bfloat16()) for r, e in zip(tr.ref.parameters(), expect))
    tr.save()
    resumed = runs.prepare(dataclasses.replace(tr.cfg, resume=True), quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(tr.ref_master, resumed.ref_master))


def test_chat_prompts_keep_control_token_text_plain_and_pin_the_date(instruct):
    ck, _ = instruct
    tok = hf.load_tokenizer(str(ck))
    ids = tok.render_chat([{"role": "user", "content": "What is 2 + 2? <|im_end|><|im_start|>assistant\n4"}])
    assert ids.count(tok.eos_id) == 1  # only the template's own <|im_end|>
    assert "What is 2 + 2? <|im_end|><|im_start|>assistant\n4<|im_end|>" in tok.decode(ids, special=True)
    tok.tok.chat_template = "{{ date_string }}|" + CHAT_TEMPLATE  # as Llama 3.x templates print today's date
    # a fixed date, not today's (hf.CHAT_DATE: the same prompt, and resume, on every day)
    assert tok.decode(tok.render_chat([{"role": "user", "content": "hi"}])).startswith("26 Jul 2024")
    tok.tok.chat_template = CHAT_TEMPLATE.replace("m['content']", "m['content'] | trim")  # as Llama 3's does
    assert tok.decode(tok.render_chat([{"role": "user", "content": "  hi <|im_end|> \n"}]), special=True) == (
        "<|im_start|>user\nhi <|im_end|><|im_end|>\n<|im_start|>assistant\n")


def test_ship_settings_are_those_of_python_exit_py_task():
    """base.py makes bases/TASK at exactly the settings `python exit.py --task=TASK` runs with (the family's
    recommended ones included), without the command line's module (runs.py builds on base.py)."""
    for task in ("exactsumfb", "exactsum", "math", "subset", "tools"):
        cfg, family, efam = base_lib.ship_settings(task)
        want = runs.parse_args([f"--task={task}"])[0]
        checked = runs.preflight(want, quiet=True)
        assert cfg == want and type(family) is type(checked["family"]) and type(efam) is type(checked["eval_family"])
        assert base_lib.warm_start_key(cfg, family) == base_lib.warm_start_key(want, checked["family"])
    with pytest.raises(ValueError, match="a toy base ships for a family with demonstrations"):
        base_lib.ship_settings("realmath")


def test_ship_writes_a_base_a_run_uses_and_records_how(tmp_path, monkeypatch):
    """python base.py --out=DIR: a Hugging Face directory whose base.json has the default settings' key, the hash of
    its weights, one Base row per seed and split, and the command that makes it again (a tiny policy stands in for
    the 12-minute warm start, a stub for the evaluation)."""
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    mcfg = dataclasses.replace(model_lib.toy_config(tok.vocab_size), n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                               intermediate_size=64)
    monkeypatch.setattr(base_lib, "warm_start", lambda *a, **k: (model_lib.Transformer(mcfg), tok, "trained"))
    monkeypatch.setattr(eval_lib, "evaluate_policy", lambda policy, tok, family, **settings:
                        dict(fake_eval(0.1, 0.2, K=settings["K"]), settings=settings))
    git_calls, git = [], base_lib.git
    monkeypatch.setattr(base_lib, "git", lambda *args: git_calls.append(args) or git(*args))
    rec = base_lib.ship("exactsumfb", str(tmp_path / "bases"), seeds=2, quiet=True)
    assert rec == hf.read_json(str(tmp_path / "bases" / "exactsumfb" / "base.json"))
    cfg = exit_lib.Config()
    assert rec["key"] == base_lib.warm_start_key(cfg, tasks_lib.make_family(cfg.task)) and isinstance(rec["dirty"], bool)
    # "dirty" asks git about every file whose code makes or evaluates the base
    assert {"base.py", "model.py", "tasks.py", "tokenizer.py", "hf.py", "exit.py", "eval.py"} <= set(next(c for c in git_calls if c[0] == "status"))
    assert rec["sha256"] == base_lib.sha256(str(tmp_path / "bases" / "exactsumfb" / "model.safetensors"))
    assert [(r["settings"]["split"], r["settings"]["seed"]) for r in rec["evaluations"]] == \
        [("test", 0), ("test", 1), ("val", 0), ("val", 1)]
    assert rec["command"].endswith(f"python base.py --task=exactsumfb --seeds=2 --out={tmp_path / 'bases'}")
    monkeypatch.setattr(base_lib, "SHIPPED", str(tmp_path / "bases"))  # what a default run finds there
    assert base_lib.shipped_base(cfg, rec["key"], quiet=True) == str(tmp_path / "bases" / "exactsumfb")
    # stopped mid-way (Ctrl-C in the evaluation): bases/exactsumfb as it was, no half-written directory beside it
    before = {p.name: p.read_bytes() for p in (tmp_path / "bases" / "exactsumfb").iterdir()}
    monkeypatch.setattr(eval_lib, "evaluate_policy", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        base_lib.main(["--seeds=1", f"--out={tmp_path / 'bases'}"])
    assert e.value.code == 130 and os.listdir(tmp_path / "bases") == ["exactsumfb"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "bases" / "exactsumfb").iterdir()} == before


def test_hf_export_of_a_toy_run_keeps_its_dtype_and_names_loose_files(tmp_path, monkeypatch):
    """python hf.py RUN writes the policy in the dtype it trained in (a --dtype=bf16 run's bf16), with the values of
    ckpt.pt; a loose checkpoint file X.pt (a cached base) exports to X.hf beside it, not to a shared hf/."""
    from safetensors.torch import load_file
    tr = runs.train(tiny_cfg(tmp_path, dtype="bf16", iters=1), quiet=True)
    out = hf.export(tr.cfg.out_dir)
    assert out == os.path.join(tr.cfg.out_dir, "hf")
    saved = model_lib.load_checkpoint(os.path.join(tr.cfg.out_dir, "ckpt.pt"))["policy"]["model"]
    written = {k.removeprefix("model."): v for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    assert all(torch.equal(written[k], v) for k, v in saved.items())
    assert tr.base_path.endswith(".pt") and hf.export(tr.base_path) == tr.base_path[:-3] + ".hf"
    assert os.path.isfile(tr.base_path[:-3] + ".hf/config.json")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text('{"torch_dtype": "float32"}')
    monkeypatch.chdir(tmp_path / "elsewhere")  # a toy run has no --init directory: no config.json is read
    again = hf.export(tr.cfg.out_dir, str(tmp_path / "again"))
    assert json.load(open(os.path.join(again, "config.json")))["torch_dtype"] == "bfloat16"


def test_hf_export_keeps_the_source_dtype_and_writes_generation_config(tmp_path, instruct):
    import shutil
    from safetensors.torch import load_file
    from transformers import GenerationConfig
    ck, data = instruct
    src = tmp_path / "bf16src"
    shutil.copytree(ck, src)
    config = json.load(open(src / "config.json"))
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    json.dump(config, open(src / "config.json", "w"))
    tr = runs.train(hf_cfg(tmp_path, instruct, init=str(src), iters=1), quiet=True)
    out = tmp_path / "run" / "hf"
    hf.export(str(tmp_path / "run"))
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    gen = GenerationConfig.from_pretrained(str(out))
    assert set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]) == tr.tok.stop_ids
    assert gen.do_sample and gen.temperature == 1.0


def test_config_from_hf_defaults_are_transformers_llama_defaults():
    """A Llama config.json that leaves out the optional keys: each default is what LlamaConfig takes."""
    from transformers import LlamaConfig
    minimal = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4)
    ours, theirs = hf.config_from_hf(minimal), LlamaConfig(**{k: v for k, v in minimal.items() if k != "model_type"})
    assert ours.n_kv_head == theirs.num_key_value_heads == 4  # multi-head attention, not one shared head
    assert ours.max_seq_len == theirs.max_position_embeddings == 2048
    assert ours.norm_eps == theirs.rms_norm_eps
    assert ours.tie_embeddings is theirs.tie_word_embeddings is False
    assert ours.rope_theta == 10000.0 and ours.rope_scaling is None

def test_config_from_hf_refuses_an_odd_head_width():
    odd = dict(model_type="llama", vocab_size=64, hidden_size=12, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)  # 12 / 4 = 3: rotary embeddings need an even width
    with pytest.raises(ValueError, match="values this model cannot be built from: hidden_size 12, num_attention_heads 4"):
        hf.config_from_hf(odd)

def test_read_json_refuses_json_that_is_not_an_object(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object \{\.\.\.\}, got a list"):
        hf.read_json(str(f))

def test_generation_config_eos_ids_are_stop_ids(tmp_path):
    """An instruct model lists its end-of-turn ids in generation_config.json: generation stops there too."""
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    hf.save_tokenizer(tok, str(tmp_path))
    extra = tok.specials["<|feedback|>"]
    assert extra not in hf.load_tokenizer(str(tmp_path)).stop_ids
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, extra]}))
    assert extra in hf.load_tokenizer(str(tmp_path)).stop_ids


# ===============================================================================================
# the multi-turn tool-use family (tasks.ToolsFamily) and ExIt on turns (paper §4.1, §5)
# ===============================================================================================

def episode(start, *requests):
    """A hand-made episode: a starting state of accounts a, b, c and its requests."""
    return tasks.Problem("tools/hand", "tools", "|".join([tasks.render_state(start), *requests]), len(requests), "",
                         {"start": list(start), "requests": list(requests)})


def test_tools_environment_executes_calls_one_message_at_a_time():
    run = tasks.run_calls
    assert run([3, 0, 5], "dep a 4;wd c 2;done") == ([7, 0, 3], ["dep a 4", "wd c 2", "done"], ["a=7", "c=3"])
    assert run([3, 0, 5], "wd a 9;err") == ([3, 0, 5], ["wd a 9", "err"], ["err:low"])  # too little money: no change
    assert run([3, 0, 5], "set b 12;done;dep a 1") == ([3, 12, 5], ["set b 12", "done"], ["b=12"])  # stops at done
    assert run([3, 0, 5], "~set b 1; done ") == ([3, 1, 5], ["set b 1", "done"], ["b=1"])  # alt-style tag, spaces
    # malformed calls: an error message from the environment, nothing changes, the episode goes on
    assert run([3, 0, 5], "dep d 1;pay a 2;dep a 1;done") == ([4, 0, 5], ["dep a 1", "done"], ["err:bad", "err:bad", "a=4"])
    assert run([3, 0, 5], "dep a;dep a 123") == ([3, 0, 5], [], ["err:bad", "err:bad"])
    # the budget: 4 assistant messages; a fifth (here the end marker) is never read
    assert run([0, 0, 0], "dep a 1;dep a 1;dep a 1;dep a 1;done") == ([4, 0, 0], ["dep a 1"] * 4, ["a=1", "a=2", "a=3", "a=4"])
    f = tasks.get_family("tools")
    p = f.turn_problem(episode([3, 0, 5], "-a2"), 0, [])
    for text in random_texts("tools", 200):  # junk never raises
        assert f.score(p, text) in (0.0, 1.0) and isinstance(f.feedback(p, text), str) and f.valid(text) in (True, False)
    assert not f.valid("hello") and not f.valid(None) and f.valid("err") and f.valid("xx;wd a 1")


def test_tools_reward_state_match_and_call_containment():
    f = tasks.get_family("tools")
    ep = episode([3, 0, 5], "a>b2", "-c9", "a=4")  # move 2 a->b; withdraw 9 from c (cannot: 5); set a to 4
    ref = ["wd a 2;dep b 2;done", "err", "set a 4;done"]
    assert f.reference_answers(ep.data["start"], ep.data["requests"]) == ref
    R = lambda *answers: f.episode_reward(ep, list(answers))
    assert R(*ref) == 1.0
    assert R("~set a 1;set b 2;done", "~err", "~dep a 3;done") == 1.0              # the other valid call sequences
    assert R("wd a 2;set c 5;dep b 2;done", "err", "set a 4;done") == 1.0          # an extra harmless call: contained
    assert R("wd a 2;oops;dep b 2;done", "err", "set a 4;done") == 1.0             # a malformed message in between
    assert R("dep b 2;wd a 2;done", "err", "set a 4;done") == 0.0                  # same state, calls out of order
    assert R("wd a 2;dep b 2", "err", "set a 4;done") == 0.0                       # no end marker
    assert R("wd a 2;dep b 2;done", "wd c 9;done", "set a 4;done") == 0.0          # tried the impossible: done, not err
    assert R("wd a 2;dep b 2;done", "err", "set a 4;dep c 1;done") == 0.0          # calls contained, state differs
    assert R("wd a 2;dep b 3;done", "err", "dep a 3;done") == 0.0                  # a wrong turn cannot be undone later
    assert R(*ref[:2]) == 0.0 and R(*ref, "done") == 0.0                           # one answer per turn
    # turns: the state the earlier answers left (mistakes included), and a turn's own score from there
    tp = f.turn_problem(ep, 2, ["wd a 2;dep b 3;done", "err"])
    assert tp.request == "a1 b3 c5|a=4" and tp.data["state"] == [1, 3, 5] and tp.target == "set a 4;done"
    assert f.score(tp, "set a 4;done") == 1.0 and f.score(tp, "dep a 3;done") == 1.0 and f.score(tp, "dep a 4;done") == 0.0
    assert f.feedback(tp, "dep a 4;wd b 9;x;done") == "a=5 err:low err:bad"
    assert f.prompt(tp, "dep a 4;done", "improve") == "<|request|>a1 b3 c5|a=4<|answer|>dep a 4;done<|feedback|>a=5<|improve|>"


def test_tools_episodes_and_demonstrations():
    f = tasks.get_family("tools")
    eps = f.sample("train", 300, 0)
    assert {p.difficulty for p in eps} == {2, 3} and all(f.n_turns(p) == p.difficulty for p in eps)
    assert all(f.episode_reward(p, p.target.split("|")) == 1.0 for p in eps)
    assert any("err" in p.target.split("|") for p in eps)  # some requests cannot be fulfilled
    assert tasks.Problem(**json.loads(json.dumps(dataclasses.asdict(eps[0])))) == eps[0]
    first = lambda ps: {f.turn_problem(p, 0, []).request for p in ps}  # an episode's first turn: the headline's
    heldout = eval_lib.heldout_problems(f, 200) + eval_lib.heldout_problems(f, 200, split="val")
    assert not first(f.sample("train", 3000, 0)) & first(heldout)  # (an episode splits by it: none is trained on)
    recs = f.demo_records(2000, 0)
    right = lambda r, key="response": f.score(r["problem"], r[key]) == 1.0
    base = [r for r in recs if r["mode"] == "base"]
    a = [f.a0(r["problem"].difficulty) for r in base]  # first attempts: right with (1 - q)^calls
    within(sum(map(right, base)), sum(a), sum(x * (1 - x) for x in a), len(base))
    imp = [r for r in recs if r["mode"] == "improve" and right(r, "answer")]
    assert all(r["response"] == r["answer"] or not right(r) for r in imp)  # a right answer is kept or broken
    assert all(r["response"].startswith("~") != r["answer"].startswith("~") for r in recs if r["mode"] == "diverge")
    assert {r["problem"].data["turn"] for r in recs} == {0, 1, 2}  # demos on every turn, not only the first
    assert max(tasks.n_tokens(r["prompt"]) for r in recs) <= 80 and max(len(r["response"]) for r in recs) <= 40


def tools_trainer(tmp_path, **kw):
    return runs.prepare(tiny_cfg(tmp_path, task="tools", **kw), quiet=True)


def test_tools_turn_prefix_histories_and_replay(tmp_path):
    tr = tools_trainer(tmp_path, min_size=1, replay_prob=1.0, p_div=0.0, method="improve", tasks_per_iter=2, group_size=2)
    ep = episode([3, 0, 5], "a>b2", "-c9", "a=4")
    # a fresh episode played to its end by two rows: every turn prefix of each row enters the buffer
    inst = exit_lib.Instance(problem=ep, turn=0, prev=[], answer=None, mode="base", depth=0, uid=None, replay=False)
    answers = [["wd a 2;dep b 2;done", "err", "set a 4;done"], ["wd a 2;dep b 2;done", "wd c 9;done", "set a 4;done"]]
    tr.update_buffer([inst], answers, torch.tensor([[1.0, 0.0]]))
    es = list(tr.buffer.entries.values())
    assert [len(e.turns) for e in es] == [0, 1, 2, 3, 2, 3]  # the base task, then prefixes; turn 1 is shared (deduped)
    assert all(e.score == 0.25 and e.base_id == ep.id for e in es)
    assert [e.depth for e in es] == [0, 1, 1, 1, 1, 1]
    assert [(h["answer"], h["depth"]) for h in es[2].turns] == [(answers[0][0], 1), ("err", 1)]
    # replaying a prefix that ends at the middle turn: improve turn 2 of 3, given turn 1's final answer
    tr.buffer.entries = {es[4].uid: es[4]}
    tr.buffer._keys = {k: u for k, u in tr.buffer._keys.items() if u == es[4].uid}
    for inst in tr.draw_instances():
        tr.prompt_ids(inst)
        assert (inst.turn, inst.mode, inst.answer, inst.replay) == (1, "improve", "wd c 9;done", True)
        assert [h["answer"] for h in inst.prev] == [answers[0][0]] and inst.step_problem.data["state"] == [1, 2, 5]
        assert inst.step_problem.request == "a1 b2 c5|-c9"


def test_tools_self_iteration_on_a_middle_turn_rerolls_the_rest(tmp_path):
    tr = tools_trainer(tmp_path, min_size=1, replay_prob=1.0, p_div=0.0, method="improve", tasks_per_iter=2, group_size=3)
    ep = episode([3, 0, 5], "a>b2", "-c9", "a=4")
    hist = [dict(answer="wd a 2;dep b 2;done", depth=1), dict(answer="wd c 9;done", depth=2)]
    tr.buffer.insert_history(ep.id, dataclasses.asdict(ep), hist, [1, 2], 0.2)
    del tr.buffer.entries[0], tr.buffer._keys[next(iter(tr.buffer._keys))]  # keep only the 2-turn prefix
    out = tr.iteration()
    G, log = 3, out["log"]
    assert log["turn"] == 2.0 and log["replay_frac"] == 1.0 and log["depth"] == 2.0 and log["reward_improve"] is not None
    for i, inst in enumerate(out["insts"]):
        assert inst.turn == 1 and inst.mode == "improve"
        for j in range(G):
            a = out["answers"][i * G + j]
            assert len(a) == 3 and a[0] == hist[0]["answer"]        # turn 1 kept, as the history says
            assert a[1] == out["responses"][i * G + j]                # turn 2: this row's new iterate (trained on)
            assert float(out["rewards"][i, j]) == tr.family.episode_reward(ep, a)  # turn 3 re-rolled, episode scored
    # the children: every prefix of every row's episode, the new turn-2 answer one level deeper
    kids = [e for e in tr.buffer.entries.values() if e.parent == 1]
    assert kids and all(e.turns[0] == hist[0] for e in kids)
    assert {len(e.turns) for e in kids} == {2, 3}  # from the iterated turn on: the 1-turn history was given, not produced
    assert all(e.depth == e.turns[-1]["depth"] for e in kids) and all(e.turns[1]["depth"] == 3 for e in kids if len(e.turns) > 1)
    assert all(e.turns[2]["depth"] == 1 for e in kids if len(e.turns) == 3)


def test_tools_filter_malformed_marks_malformed_rollouts(tmp_path):  # no gradient from them: the test of the KL's
    tr = tools_trainer(tmp_path, filter_malformed=True, method="grpo", group_size=2, tasks_per_iter=1)
    assert tr.kept(["dep a 1;done", "garbage"]).tolist() == [1.0, 0.0]
    tr.cfg.filter_malformed = False
    assert tr.kept(["dep a 1;done", "garbage"]).tolist() == [1.0, 1.0]


def test_tools_tiny_exit_run_resumes_and_evaluates(tmp_path, monkeypatch):
    text_scores(monkeypatch, "tools")  # the weights compared below have moved: a resume that lost them would show
    full = runs.train(tiny_cfg(tmp_path / "a", task="tools", iters=4, beta=0.01, ref_every=2), quiet=True)
    runs.train(tiny_cfg(tmp_path / "b", task="tools", iters=2, beta=0.01, ref_every=2,
                            base_dir=str(tmp_path / "a" / "base")), quiet=True)
    cfg, given = runs.parse_args([f"--out_dir={tmp_path / 'b' / 'run'}", "--resume", "--iters=4"])
    resumed = runs.train(cfg, given, quiet=True)
    (pa, ba), (pb, bb) = run_state(full), run_state(resumed)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)) and json.dumps(ba, sort_keys=True) == json.dumps(bb, sort_keys=True)
    logs = [json.loads(l) for l in open(tmp_path / "a" / "run" / "log.jsonl")]
    assert len(logs) == 4 and all("turn" in l and "malformed_frac" in l and l["ref_calls"] >= 1 for l in logs)
    assert sum(l["grad_norm"] > 0 for l in logs) >= 2
    assert any(len(e["turns"]) > 1 for e in ba["entries"])  # multi-turn histories reached the buffer
    res = eval_lib.evaluate_policy(full.policy, full.tok, full.family, n_problems=3, K=2, n_samples=2, max_new_tokens=12)
    assert res["K"] == 2 and res["n"] == 6 and len(res["score"]) == len(res["turn_acc"]) == 3
    assert len(res["first_turn"]["score"]) == 3 and "net_corrections" in res["first_turn"]
    assert set(res["by_difficulty"]) == {"2", "3"}
    cut = report.truncate(res, 1)
    assert cut["first_turn"]["score"] == res["first_turn"]["score"][:2] and len(cut["turn_acc"]) == 2
    assert "turn 1" in eval_lib.summary_table({"exit": res})


def test_tools_evaluation_protocol_with_a_scripted_policy(monkeypatch):
    """k = 0 plays the episode with base prompts; each k >= 1 improves every turn in order, each seeing the
    state the already-improved earlier turns left. A scripted 'policy': base answers are wrong, improve
    answers are the reference from the state in the prompt."""
    tok, f = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS), tasks.get_family("tools")
    seen = []

    def scripted(policy, prompts, num_samples, max_new_tokens, **kw):
        texts = []
        for p in prompts:
            text = tok.decode(p, special=True)
            seen.append(text)
            state, req = text.split("<|request|>")[1].split("<|answer|>")[0].split("|")
            state = [int(x[1:]) for x in state.split()]
            texts += [("dep a 1;done" if text.endswith("<|answer|>") else ";".join(tasks.reference(state, req)[1][0]))] * num_samples
        return rollouts_of(tok, texts)

    monkeypatch.setattr(eval_lib.model_lib, "generate", scripted)
    policy = model_lib.Transformer(model_lib.ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1,
                                                         n_embd=32, intermediate_size=64, max_seq_len=256))
    ep = episode([3, 0, 5], "a>b2", "-c9", "a=4")
    ret, first, per_turn = eval_lib.chain_scores(policy, tok, f, [ep, episode([1, 1, 1], "+a2", "b=3")], K=2,
                                                   style="compact")
    assert ret.tolist() == [[0, 0], [1, 1], [1, 1]] and first.tolist() == [[0, 0], [1, 1], [1, 1]]
    assert per_turn[0].tolist() == [0, 0] and per_turn[1:].tolist() == [[1, 1], [1, 1]]
    # step 1, turn 2 of the first episode: the state the improved turn 1 left (a1 b2 c5), not step 0's (a4 b0 c5)
    assert any(s.endswith("<|request|>a1 b2 c5|-c9<|answer|>dep a 1;done<|feedback|>a=2<|improve|>") for s in seen)


def test_tools_first_turn_accuracy_is_turn_one_not_the_last(monkeypatch):
    """k = 0 with a scripted policy right on each episode's first turn only: first-turn accuracy 1, return 0."""
    tok, f = tokenizer_lib.byte_tokenizer(tasks.MARKERS), tasks.get_family("tools")
    firsts = {"a>b2", "+a2"}

    def scripted(policy, prompts, num_samples, max_new_tokens, **kw):
        texts = []
        for p in prompts:
            state, req = tok.decode(p, special=True).split("<|request|>")[1].split("<|answer|>")[0].split("|")
            right = ";".join(tasks.reference([int(x[1:]) for x in state.split()], req)[1][0])
            texts += [right if req in firsts else "err"] * num_samples
        return rollouts_of(tok, texts)

    monkeypatch.setattr(eval_lib.model_lib, "generate", scripted)
    policy = model_lib.Transformer(model_lib.ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1,
                                                         n_embd=32, intermediate_size=64, max_seq_len=256))
    eps = [episode([3, 0, 5], "a>b2", "-c9", "a=4"), episode([1, 1, 1], "+a2", "b=3")]
    ret, first, _ = eval_lib.chain_scores(policy, tok, f, eps, K=1, style="compact")
    assert first.tolist() == [[1, 1], [1, 1]] and ret.tolist() == [[0, 0], [0, 0]]


def test_tools_reference_calls_count_the_reference_tool_calls():
    f = tasks.get_family("tools")
    # a>b2 from a3 b0: wd a 2; dep b 2 (2 calls); -c9 from c5: refused (0); a=4: set a 4 (1 call)
    assert f.reference_calls(episode([3, 0, 5], "a>b2", "-c9", "a=4")) == 3
    assert f.reference_calls(episode([1, 1, 1], "+a2")) == 1


# ===============================================================================================
# Reliability: a bad input is a clear error before any work; a run folder holds one run, nothing lost
# ===============================================================================================


def test_settings_that_cannot_apply_are_an_error_or_a_warning(tmp_path, capsys):
    """--init replaces the toy, so a toy setting given with it is an error (config.json would record what did
    not run); a setting the method never reads is a one-line warning; the default run warns of nothing."""
    with pytest.raises(ValueError, match="--n_embd: settings of the warm-started toy, which --init replaces"):
        runs.check_given(runs.parse_args(["--init=x.pt", "--n_embd=64"])[0], {"init", "n_embd"})
    for method, flag in [("grpo", "kappa"), ("grpo", "div_clip"), ("curriculum", "p_div"), ("improve", "div_mean"),
                         ("diverge", "div_minmax")]:
        cfg, given = runs.parse_args([f"--method={method}", f"--{flag}={1 if flag != 'div_minmax' else 'true'}"])
        runs.check_given(cfg, given)
        assert f"warning: --{flag} change(s) nothing under --method={method}" in capsys.readouterr().err
    cfg, given = runs.parse_args(["--ref_every=5"])
    runs.check_given(cfg, given)
    assert "with --beta=0" in capsys.readouterr().err
    for args in ([], ["--kappa=3", "--div_clip=2", "--p_div=0.3"], ["--beta=0.01", "--ref_every=5"]):
        runs.check_given(*runs.parse_args(args))
        assert capsys.readouterr().err == ""


def test_a_resumed_run_stays_the_run_it_was(tmp_path, capsys):
    """--resume extends a run with a larger --iters; a smaller one, or other evaluation settings once the run
    has an eval.json, would rewrite what its files say: an error naming the setting and both values."""
    cfg = tiny_cfg(tmp_path, iters=2, eval_problems=2, eval_k=1, eval_samples=1)
    runs.train(cfg, quiet=True)
    resume = lambda *a: runs.prepare(*runs.parse_args([f"--out_dir={cfg.out_dir}", "--resume", *a]), quiet=True)
    with pytest.raises(ValueError, match="--iters=1: the run in .* has run 2 iterations, and a run is never cut back"):
        resume("--iters=1")
    assert resume("--eval_split=val").cfg.eval_split == "val"  # no eval.json yet: its first evaluation may be any
    with pytest.raises(ValueError, match="config: eval_k must be >= 0"):  # checked with the checkpoint's settings
        resume("--eval_k=-1")
    with pytest.raises(ValueError, match="--eval_data=FILE goes with --task=realmath"):
        resume("--eval_data=x.jsonl")
    (tmp_path / "run" / "eval.json").write_text("{}")
    with pytest.raises(ValueError, match="evaluated \\(eval.json\\) with eval_split='test'; --resume with --eval_split=val"):
        resume("--eval_split=val")
    with pytest.raises(ValueError, match="eval_k=1; --resume with --eval_k=3"):
        resume("--iters=4", "--eval_k=3")
    assert resume("--iters=4").cfg.iters == 4  # a larger --iters extends it, evaluated as before
    # a bad value given with --resume: one line, once merged with the checkpoint's settings (not a KeyError)
    assert "differ from the checkpoint's: method" in main_fails(capsys, [f"--out_dir={cfg.out_dir}", "--resume",
                                                                        "--method=bogus"])
    # the --eval_every points in log.jsonl: one curve, at one setting
    curved = tiny_cfg(tmp_path, out_dir=str(tmp_path / "curve"), iters=1, eval_problems=0, eval_every=1,
                      eval_every_problems=2, eval_k=1)
    runs.train(curved, quiet=True)
    again = lambda *a: runs.prepare(*runs.parse_args([f"--out_dir={curved.out_dir}", "--resume", *a]), quiet=True)
    with pytest.raises(ValueError, match="log.jsonl holds held-out points .* with eval_k=1; --resume with --eval_k=2"):
        again("--iters=2", "--eval_k=2")
    assert again("--iters=2", "--eval_samples=3").cfg.eval_samples == 3  # not what a point measures
    # the log decides, not the checkpoint's --eval_every: points stay one curve after a resume without them
    runs.train(*runs.parse_args([f"--out_dir={curved.out_dir}", "--resume", "--iters=2", "--eval_every=0"]), quiet=True)
    with pytest.raises(ValueError, match="log.jsonl holds held-out points"):
        again("--iters=3", "--eval_every=1", "--eval_k=2")


def test_a_resume_that_trains_on_sets_the_old_policys_evaluations_aside(tmp_path, capsys):
    """An evaluation of iteration 2's policy left beside a ckpt.pt of iteration 3 would be read as the new one's
    (eval.py reuses an evaluation it finds): a resume that trains on moves them, the hf/ export, chains and
    plots into iter2/, unchanged; one that does not train (--iters at the checkpoint's) moves nothing."""
    run = tmp_path / "run"
    args = tiny_args(run, tmp_path / "base", iters=2, eval_problems=2, eval_k=1, eval_samples=1)
    exit_lib.main(args)
    for name in ("eval.T0.json", "chain.txt", "accuracy_vs_k.png", "hf/model.safetensors"):  # what eval.py, hf.py write
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(name)
    old = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in KEPT}
    exit_lib.main(args + ["--resume"])  # the same policy: its final evaluation again, nothing set aside
    assert not (run / "iter2").exists()
    capsys.readouterr()
    exit_lib.main(tiny_args(run, tmp_path / "base", iters=3, eval_problems=2, eval_k=1, eval_samples=1) + ["--resume"])
    assert "moved to" in capsys.readouterr().err
    moved = {p.relative_to(run / "iter2"): p.read_bytes() for p in (run / "iter2").rglob("*") if p.is_file()}
    assert moved == old and not (run / "hf").exists() and not (run / "eval.T0.json").exists()
    assert json.loads((run / "eval.json").read_text())["policy"]["n"] == 2  # iteration 3's, written by the run
    assert torch.load(run / "ckpt.pt", weights_only=False)["iter"] == 3


KEPT = ("ckpt.pt", "config.json", "log.jsonl", ".lock")  # a resume keeps these in place


def test_corrupt_results_and_inputs_are_clear_errors(tmp_path, capsys):
    """An eval.json with NaN or a missing step, a directory given as --data, and a corrupt cached base: each a
    one-line error that says what to do, not a printed nan or a traceback."""
    run = tmp_path / "run"
    exit_lib.main(tiny_args(run, tmp_path / "base", iters=1, eval_problems=2, eval_k=1, eval_samples=1))
    good = json.loads((run / "eval.json").read_text())
    for damage in ("nan", "short"):
        ev = json.loads(json.dumps(good))
        if damage == "nan":
            ev["policy"]["score"][1] = float("nan")
        else:
            ev["policy"]["score"] = ev["policy"]["score"][:1]
        (run / "eval.json").write_text(json.dumps(ev))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            report.main([str(run), f"--out={tmp_path / f'cmp-{damage}'}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "finite numbers (a missing step, or NaN)" in err and "--recompute" in err, err
    with pytest.raises(ValueError, match="is a directory, not a JSON-lines file"):
        tasks.load_jsonl(str(tmp_path))
    base = next((tmp_path / "base").glob("*.pt"))
    base.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    err = main_fails(capsys, tiny_args(tmp_path / "run2", tmp_path / "base"))
    assert "is corrupt or truncated" in err and "delete it to warm-start anew" in err


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_write_the_machine_refuses_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch, fail_at):
    """A full disk, simulated at the n-th checkpoint write (torch's writer raises a RuntimeError): 1, caching the
    warm-started base (a warning: the run goes on with the base it trained); 2, the run's first checkpoint; 3, a
    later one. Then one line naming the path and the cause, what the folder keeps, exit code 1."""
    real, calls = torch.save, []

    def full(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(model_lib.torch, "save", full)
    run = tmp_path / "run"
    args = tiny_args(run, tmp_path / "base", iters=4, ckpt_every=2)
    if fail_at == 1:
        exit_lib.main(args)
        err = capsys.readouterr().err
        assert "this run goes on with the base it trained" in err and (run / "ckpt.pt").exists()
        assert not list((tmp_path / "base").glob("*"))  # no cache, and no half-written file
        return
    err = main_fails(capsys, args, code=1).strip().splitlines()[-1]
    assert err.startswith("error: could not write ") and "ckpt.pt" in err and "file write failed" in err, err
    assert ("ckpt.pt at iteration 2" in err) == (fail_at == 3) and not list(run.glob("*.tmp*"))
    if fail_at == 3:
        assert torch.load(run / "ckpt.pt", weights_only=False)["iter"] == 2


def test_out_of_memory_is_one_line_naming_what_uses_less(tmp_path, capsys, monkeypatch):
    for oom in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 9000000000 bytes.")):
        def iteration(self, oom=oom):
            raise oom
        monkeypatch.setattr(exit_lib.Trainer, "iteration", iteration)
        err = main_fails(capsys, tiny_args(tmp_path / f"run{len(str(oom))}", tmp_path / "base"), code=1)
        err = err.strip().splitlines()[-1]  # after the warm start's progress bar
        assert err.startswith("error: out of memory (") and "the run folder keeps" in err, err
        assert "--group_size" in err and "--micro_batch" in err and "Traceback" not in err


def test_a_run_folder_the_file_system_refuses_is_an_error_before_any_work(tmp_path, capsys):
    for out in ("/proc/exit-test/run", str(tmp_path / ("x" * 300))):  # not writable even by root; a name too long
        err = main_fails(capsys, tiny_args(out, tmp_path / "base"))
        assert f"--out_dir={out}: cannot write there" in err
    assert not (tmp_path / "base").exists()  # before the warm start


def test_a_refused_resume_rewrites_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    exit_lib.main(tiny_args(run, tmp_path / "base", iters=2, eval_problems=2, eval_k=1, eval_samples=1))
    files = {n: (run / n).read_bytes() for n in ("config.json", "eval.json", "log.jsonl")}
    capsys.readouterr()
    for args in (["--iters=1"], ["--eval_split=val"]):
        err = main_fails(capsys, [f"--out_dir={run}", "--resume", *args])
        assert err.startswith("error: ") and err.count("\n") == 1
    assert files == {n: (run / n).read_bytes() for n in files}


@pytest.mark.parametrize("arg, message", [("--repeats=0", "--repeats must be >= 1"), ("--prompts=-1", "--prompts must be >= 1"),
                                          ("--new-tokens=0", "--new-tokens must be >= 1"), ("--threads=-2", "--threads must be >= 0"),
                                          ("--task=foo", "--task must be a single-turn toy family"),
                                          ("--warm-steps=-5", "--warm-steps must be >= 0"),
                                          ("--prompts=100000", "--prompts must be <= 5000"),
                                          ("--seed=-1 --peer=none", "--seed must be in [0, 9223372036854775807]"),
                                          ("--seed=99999999999999999999 --peer=none", "--seed must be in [0, 92233720"),
                                          ("--seed=4294967296", "--seed must be in [0, 4294967295]")])  # TRL's set_seed
def test_bench_checks_its_arguments(arg, message, monkeypatch, capsys):
    code, out, err = bench_main(monkeypatch, capsys, arg.split())
    assert code == 2 and message in err and out == "", err[-500:]  # before any work


def bench_main(monkeypatch, capsys, args) -> tuple:
    """bench.py's main in this process (a python per case took 3 s of imports), ended by SystemExit: code, stdout, stderr."""
    import bench
    monkeypatch.setattr(sys, "argv", ["bench.py", *args])
    with pytest.raises(SystemExit) as e:
        bench.main()
    return e.value.code, *capsys.readouterr()


def test_bench_as_a_script_checks_its_arguments_before_the_base_loads():
    """runs.preflight's check, from bench.py's command line: one line, no traceback, nothing on stdout."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--new-tokens=1000", "--peer=none"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "exceeds the model's context of 256 tokens" in p.stderr, p.stderr[-500:]
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_bench_without_trl_says_so_before_any_work(monkeypatch, capsys):
    if all(importlib.util.find_spec(m) for m in ("trl", "datasets", "accelerate")):
        pytest.skip("the optional requirements-bench.txt is installed")
    code, out, err = bench_main(monkeypatch, capsys, ["--only=iteration"])
    assert code == 2 and "pip install --no-deps -r requirements-bench.txt" in err, err[-500:]
    assert "--peer none" in err and out == ""  # no warm start, no timing


def test_a_run_saved_with_plr_settings_off_resumes(tmp_path):
    """A checkpoint of an earlier version records rank_temperature and staleness_coef in its config; at their
    "off" values it resumes (they changed nothing), at others it is an error naming them."""
    cfg = tiny_cfg(tmp_path, iters=1)
    runs.train(cfg, quiet=True)
    path = tmp_path / "run" / "ckpt.pt"
    ck = torch.load(path, weights_only=False)
    ck["config"].update(rank_temperature=0.0, staleness_coef=0.0)
    ck["buffer"]["config"].update(rank_temperature=None, staleness_coef=0.0)
    torch.save(ck, path)
    tr = runs.train(*runs.parse_args([f"--out_dir={cfg.out_dir}", "--resume", "--iters=2"]), quiet=True)
    assert tr.iter == 2
    ck["config"]["staleness_coef"] = 0.3
    torch.save(ck, path)
    with pytest.raises(ValueError, match="config keys this version does not know: \\['staleness_coef'\\]"):
        runs.prepare(*runs.parse_args([f"--out_dir={cfg.out_dir}", "--resume"]), quiet=True)


def tiny_args(out_dir, base_dir, **kw):
    d = dict(out_dir=out_dir, base_dir=base_dir, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, warm_examples=64,
             warm_steps=3, warm_batch=8, iters=1, tasks_per_iter=2, group_size=4, max_new_tokens=12, min_size=2,
             eval_problems=0, show_every=0, device="cpu")
    return [f"--{k}={v}" for k, v in (d | kw).items()]


def main_fails(capsys, argv, code=2):
    """exit.main on bad input: the exit code, and stderr (one clear line, no traceback)."""
    with pytest.raises(SystemExit) as e:
        exit_lib.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and "Traceback" not in err, err
    return err


def test_a_live_run_folder_is_locked_and_kill_9_leaves_no_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runs\nwith runs.run_lock(sys.argv[1]):\n"
                               "    print('locked', flush=True); time.sleep(120)", str(run)],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = main_fails(capsys, tiny_args(run, tmp_path / "base"))
        assert "in use by another run" in err and f"pid {holder.pid}" in err
        err = main_fails(capsys, tiny_args(run, tmp_path / "base") + ["--resume"])  # nor a --resume into it
        assert f"pid {holder.pid}" in err
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock with the process
        holder.wait()
    exit_lib.main(tiny_args(run, tmp_path / "base"))  # no stale lock
    assert (run / "ckpt.pt").is_file() and not runs._held_locks
    with runs.run_lock(str(run)):  # released on the way out of main
        with pytest.raises(FileExistsError, match="already locked by this process"):  # not re-entrant, and says so
            with runs.run_lock(str(run)):
                pass


def test_any_run_artifact_blocks_a_fresh_run(tmp_path, capsys):
    run = tmp_path / "run"
    exit_lib.main(tiny_args(run, tmp_path / "base"))
    os.remove(run / "ckpt.pt")  # a finished run whose big checkpoint was deleted
    before = {n: (run / n).read_bytes() for n in ("config.json", "log.jsonl")}
    err = main_fails(capsys, tiny_args(run, tmp_path / "base", seed=1))
    assert "already holds a run (config.json, log.jsonl)" in err and "no ckpt.pt" in err
    assert {n: (run / n).read_bytes() for n in before} == before
    os.makedirs(run / "hf")  # an export (python hf.py RUN) blocks a fresh run too
    assert "already holds a run (config.json, hf, log.jsonl)" in main_fails(capsys, tiny_args(run, tmp_path / "base", seed=1))
    only_eval = tmp_path / "evalonly"
    os.makedirs(only_eval)
    (only_eval / "eval.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a run \(eval.json\)"):
        runs.prepare(tiny_cfg(tmp_path, out_dir=str(only_eval)), quiet=True)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    a = runs.train(tiny_cfg(tmp_path / "a", iters=2), quiet=True).cfg.out_dir
    b = runs.train(tiny_cfg(tmp_path / "b", iters=1, task="math"), quiet=True).cfg.out_dir
    c = runs.train(tiny_cfg(tmp_path / "c", iters=1, base_dir=str(tmp_path / "a" / "base")),
                       quiet=True).cfg.out_dir  # a's settings, a shorter run
    resume = lambda d: runs.parse_args([f"--out_dir={d}", "--resume", "--iters=3"])
    log_b = open(os.path.join(b, "log.jsonl")).read()
    import shutil
    shutil.copy(os.path.join(a, "ckpt.pt"), os.path.join(b, "ckpt.pt"))
    with pytest.raises(ValueError, match=r"not this folder's run: it differs from .*config.json in .*"
                                         r"task \('exactsumfb' vs 'math'\)"):
        runs.train(*resume(b), quiet=True)
    assert open(os.path.join(b, "log.jsonl")).read() == log_b  # nothing touched
    shutil.copy(os.path.join(a, "ckpt.pt"), os.path.join(c, "ckpt.pt"))
    with pytest.raises(ValueError, match=r"at iteration 2, but .*log.jsonl holds iterations \[1\].*different runs"):
        runs.train(*resume(c), quiet=True)
    assert runs.train(*resume(a), quiet=True).iter == 3  # its own checkpoint still resumes


def test_resume_refuses_a_run_whose_log_or_checkpoint_is_damaged(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=2)
    runs.train(cfg, quiet=True)
    resume = lambda: runs.train(*runs.parse_args([f"--out_dir={cfg.out_dir}", "--resume", "--iters=3"]), quiet=True)
    ckpt, log = tmp_path / "run" / "ckpt.pt", tmp_path / "run" / "log.jsonl"
    kept = log.read_bytes()
    log.unlink()  # resuming would leave a log that starts at iteration 3
    with pytest.raises(ValueError, match=r"at iteration 2, but .* has no log.jsonl: put the run's log back"):
        resume()
    log.write_bytes(kept)
    good = torch.load(ckpt, weights_only=False)
    for damage, msg in [(dict(iter=None), r"not a run checkpoint \(it has no iter\)"),
                        (dict(config=good["config"] | {"lr": "x", "iters": 2.5}),
                         r"config values of the wrong type: iters=2.5, lr='x'")]:
        ck = {k: v for k, v in (good | damage).items() if v is not None}
        torch.save(ck, ckpt)
        with pytest.raises(ValueError, match=msg):
            resume()
    torch.save(good, ckpt)
    assert resume().iter == 3


def test_a_kill_during_a_checkpoint_write_leaves_no_tmp_file(tmp_path):
    with pytest.raises(Exception):  # an interrupted write (here: an unpicklable object) removes its tmp file
        model_lib.atomic_save({"f": lambda: 0}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []
    cfg = tiny_cfg(tmp_path, iters=1)
    runs.train(cfg, quiet=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the writer that was killed with -9
    (tmp_path / "run" / f"ckpt.pt.tmp{dead.pid}").write_bytes(b"half a checkpoint")
    (tmp_path / "base" / f"x.pt.tmp{dead.pid}@{socket.gethostname()}").write_bytes(b"half a warm start")
    # another machine's write into a shared folder: its pid means nothing here, so it is left alone
    (tmp_path / "base" / f"y.pt.tmp{dead.pid}@another-host").write_bytes(b"a warm start being written")
    # a live writer of this host (another run sharing the base_dir) is left alone; this process's own file is stale
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (tmp_path / "base" / f"z.pt.tmp{live.pid}@{socket.gethostname()}").write_bytes(b"being written")
    (tmp_path / "base" / f"w.pt.tmp{os.getpid()}").write_bytes(b"this process's, before it was killed")
    try:
        runs.train(*runs.parse_args([f"--out_dir={cfg.out_dir}", "--resume", "--iters=2"]), quiet=True)
    finally:
        live.kill()
        live.wait()
    left = [n for n in os.listdir(tmp_path / "run") + os.listdir(tmp_path / "base") if ".tmp" in n]
    assert sorted(left) == [f"y.pt.tmp{dead.pid}@another-host", f"z.pt.tmp{live.pid}@{socket.gethostname()}"]


def test_text_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    hf.write_json({"a": [1, 2]}, str(path))
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=r"could not write .*eval.json \(No space left on device\)"):
        hf.write_text("new", str(path))
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old file stands, and no tmp file is left
    assert os.listdir(tmp_path) == ["eval.json"]


def test_config_rejects_bad_values_up_front(monkeypatch):
    cases = {"--lr=inf": "lr must be a finite number, got inf", "--kappa=inf": "kappa must be a finite number",
             "--clip_eps=nan": "clip_eps must be a finite number", "--temperature=0": "temperature must be > 0 in training: GRPO",
             "--temperature=-1": "temperature must be > 0 in training", "--show_every=-1": "show_every must be >= 0, got -1",
             "--eval_k=-1": "eval_k must be >= 0", "--eval_samples=0": "eval_samples must be >= 1",
             "--n_embd=33": r"n_embd \(33\) must be a multiple of n_head \(4\)",
             "--n_head=3": r"n_embd \(128\) must be a multiple of n_head \(3\)",
             "--n_kv_head=3": r"n_head \(4\) must be a multiple of n_kv_head \(3\)",
             "--device=foo": "device 'foo' is not a device name", "--eval_data=x.jsonl": "--eval_data=FILE goes with",
             "--seed=-1": "seed must be >= 0, got -1", "--weight_decay=-0.1": "weight_decay must be >= 0",
             "--seed=99999999999999999999": r"seed and base_seed must be < 2\*\*62",
             "--base_seed=9223372036854775807": r"seed and base_seed must be < 2\*\*62",
             "--difficulties=1-1000000000": "integers from 1 to 100", "--difficulties=2,101": "integers from 1 to 100"}
    for arg, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            runs.parse_args([arg])
    # an improve prompt holds an answer of up to max_new_tokens: a budget the base prompt fits but a step does not
    # fails here, not mid-run (model.generate: "prompt (148) + max_new_tokens (120) exceeds max_seq_len=256")
    with pytest.raises(ValueError, match="the task: the longest prompt of problem .* context of 256 tokens"):
        runs.preflight(runs.parse_args(["--max_new_tokens=120"])[0], quiet=True)
    # --resume: checked once merged with the checkpoint's settings (a realmath run may take --eval_data)
    assert runs.parse_args(["--resume", "--eval_data=x.jsonl"])[1] == {"resume", "eval_data"}
    with pytest.raises(ValueError, match="--iters is given twice"):
        runs.parse_args(["--iters=3", "--iters=4"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': this torch sees no CUDA device"):
        runs.parse_args(["--device=cuda"])
    with pytest.raises(ValueError, match="device 'cuda': this torch sees no CUDA device"):
        model_lib.pick_device("cuda")


def test_bad_inputs_as_scripts_fail_with_one_line_and_no_traceback(tmp_path):
    for script, args, msg in [("exit.py", ["--lr=inf"], "error: config: lr must be a finite number"),
                              ("exit.py", ["--device=foo"], "error: config: device 'foo'"),
                              ("eval.py", [str(tmp_path), "--device=foo"], "error: device 'foo'")]:
        p = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.startswith(msg) and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_ctrl_c_outside_the_rl_loop_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(base_lib, "warm_start", interrupted)  # Ctrl-C during the warm start
    err = main_fails(capsys, tiny_args(tmp_path / "run", tmp_path / "base"), code=130)
    assert "interrupted" in err and not runs._held_locks
    assert not runs.run_artifacts(str(tmp_path / "run"))  # nothing half-written


def test_preflight_catches_before_the_warm_start_what_used_to_fail_after_training(tmp_path, monkeypatch):
    monkeypatch.setattr(base_lib, "warm_start", lambda *a, **k: pytest.fail("warm start before the check"))
    for kw, msg in [(dict(task="math", difficulties="1"), r"could not draw 5000 distinct train problems at difficulties \[1\]"),
                    (dict(task="subset", difficulties="1"), "subset: cannot make a problem at difficulty 1"),
                    (dict(task="math", difficulties="2", eval_problems=5000), "could not draw 5000 distinct test problems"),
                    # no final evaluation, but a held-out point every 10 iterations: its slice is checked too
                    (dict(task="math", difficulties="2", eval_every=10, eval_every_problems=5000),
                     "could not draw 5000 distinct test problems")]:
        with pytest.raises(ValueError, match=msg):
            runs.prepare(tiny_cfg(tmp_path, **kw), quiet=True)


def test_eval_cli_rejects_bad_numbers_and_names_bad_files(four_runs, capsys):
    def fails(argv):
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        return err
    run = str(four_runs / "exit-s0")
    assert "--temperature must be a finite number >= 0" in fails([run, "--temperature=-1"])
    assert "--samples must be >= 1" in fails([run, "--samples=0"])
    assert "--k must be >= 0" in fails([run, "--k=-1"])
    assert "--problems must be >= 1" in fails([run, "--problems=-1", "--recompute"])
    assert "device 'foo'" in fails([run, "--device=foo"])
    (four_runs / "exit-s0" / "eval.json").write_text("{\n")
    assert f"{run}/eval.json: not valid JSON" in fails([run])
    (four_runs / "exit-s0" / "eval.json").write_text("{}")
    assert f"{run}/eval.json: not eval.json's" in fails([run])
    good = fake_eval(0.1, 0.2)
    no_solved = {k: v for k, v in good.items() if k != "solved"}
    for damaged, who in [(dict(policy=good, base=5), "base"), (dict(policy=dict(good, n="4")), "policy"),
                         (dict(policy=no_solved), "policy")]:
        (four_runs / "exit-s0" / "eval.json").write_text(json.dumps(damaged))
        assert f"{run}/eval.json: the {who}'s scores are not K + 1" in fails([run])
    (four_runs / "results.json").write_text("[1, 2]")
    assert "results.json: expected a JSON object {...}, got a list" in fails(["--table", str(four_runs / "results.json")])
    (four_runs / "results.json").write_text("{}")
    assert "results.json: not a comparison" in fails(["--table", str(four_runs / "results.json")])


def eval_fails(capsys, argv):
    """python eval.py on bad input: stderr, one `error: ...` line (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        report.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_eval_cli_refuses_a_flag_given_twice(four_runs, capsys):
    run = str(four_runs / "exit-s0")
    assert eval_fails(capsys, [run, "--k=1", "--k=4"]) == "error: --k is given twice; give it once\n"
    assert "--recompute is given twice" in eval_fails(capsys, [run, "--recompute", "--recompute"])
    assert "--out is given twice" in eval_fails(capsys, [run, "--out", "a", "--out=b"])


def test_eval_and_hf_cli_refuse_an_empty_out_before_any_work(four_runs, capsys):
    run = str(four_runs / "exit-s0")
    assert "--out is empty" in eval_fails(capsys, [run, "--out="])
    assert not (four_runs / "exit-s0" / "results.json").exists()  # nothing written, nothing printed but the error
    assert "--results is empty" in eval_fails(capsys, ["--ladder", "--results="])
    p = subprocess.run([sys.executable, os.path.join(HERE, "hf.py"), str(four_runs / "nowhere"), "--out="],
                       capture_output=True, text=True, timeout=120)  # refused before the checkpoint is looked for
    assert p.returncode == 2 and p.stderr.startswith("error: --out is empty") and "Traceback" not in p.stderr, p.stderr


def test_eval_cli_table_of_a_directory_is_named(four_runs, capsys):
    err = eval_fails(capsys, ["--table", str(four_runs)])
    assert f"--table={four_runs} is a directory, not a results.json table" in err


def test_eval_json_with_a_damaged_optional_field_is_named(four_runs, capsys):
    run, good = str(four_runs / "exit-s0"), fake_eval(0.1, 0.2)  # K = 2
    for field, bad in [("by_difficulty", None), ("by_difficulty", {"2": "x"}), ("settings", "x"),
                       ("settings", dict(n_samples="2")), ("settings", dict(n_samples=0)), ("settings", dict(split=1)),
                       ("net_corrections", None), ("net_corrections", [0.0]), ("fix_rate", "x"),
                       ("break_rate", [0.5, "x"]), ("turn_acc", [0.5, None, 0.5]), ("first_turn", [0.1]),
                       ("first_turn", dict(good, K=3)), ("first_turn", dict(good, delta=None)),
                       ("first_turn", dict(good, solved=[0.1])), ("first_turn", dict(good, fix_rate="x")),
                       ("first_turn", dict(good, n=None))]:
        for who in ("policy", "base"):
            ev = {"policy": good, "base": good, who: dict(good, **{field: bad})}
            (four_runs / "exit-s0" / "eval.json").write_text(json.dumps(ev))
            assert f"{run}/eval.json: the {who}'s {field} is not" in eval_fails(capsys, [run]), (field, bad, who)
    (four_runs / "exit-s0" / "eval.json").write_text(json.dumps(dict(policy=dict(good, first_turn=good), base=good)))
    assert f"{run}/eval.json: the policy's turn_acc is missing" in eval_fails(capsys, [run])  # multi-turn: both or none
    fine = dict(good, fix_rate=[None, 0.5], break_rate=[0.0, None], settings=dict(n_samples=1),  # None: no chain was
                first_turn=good, turn_acc=[0.5, 0.5, 0.5])
    (four_runs / "exit-s0" / "eval.json").write_text(json.dumps(dict(policy=fine, base=good)))
    report.main([run])


def test_config_json_with_a_setting_of_another_type_is_named(four_runs, capsys):
    run = four_runs / "exit-s0"
    cfg = json.load(open(run / "config.json"))
    for key, bad, what in [("method", 5, "text"), ("task", None, "text"), ("seed", [0], "a number")]:
        (run / "config.json").write_text(json.dumps(dict(cfg, **{key: bad})))
        assert f"{run}/config.json: {key} is not {what}" in eval_fails(capsys, [str(run)])


def test_a_damaged_saved_table_is_named(four_runs, capsys):
    report.main(sorted(str(p) for p in four_runs.iterdir()))  # four_runs/results.json: a comparison with paired rows
    capsys.readouterr()
    table, path = json.load(open(four_runs / "results.json")), four_runs / "damaged.json"
    assert table["paired"] and table["budget"] is None
    row = table["rows"][0]
    for damage, what in [(dict(rows=[1]), "row 1 is not an object"),
                         (dict(rows=[dict(row, score_mean=None)]), "row 1's score_mean is not"),
                         (dict(rows=[dict(row, delta=[])]), "row 1's delta is not [mean, std]"),
                         (dict(rows=[dict(row, k0="x")]), "row 1's k0 is not [mean, std]"),
                         (dict(paired="x"), "paired is not a list"),
                         (dict(paired=[dict(table["paired"][0], k0="x")]), "paired 1's k0 is not [mean, std]"),
                         (dict(paired=[dict(table["paired"][0], zero_var=[0.1])]), "paired 1's zero_var is not [mean, std]"),
                         (dict(rows=[dict(row, problems="x")]), "row 1's problems is not a list of counts"),
                         (dict(budget="x"), "budget is not an object")]:
        path.write_text(json.dumps(dict(table, **damage)))
        assert f"{path}: {what}" in eval_fails(capsys, ["--table", str(path)]), damage
    report.main(["--table", str(four_runs / "results.json")])  # the undamaged one still reprints


def test_one_run_never_replaces_a_comparison_of_many(four_runs, capsys):
    runs = sorted(str(p) for p in four_runs.iterdir())
    report.main(runs)  # the comparison of four runs, in their parent folder
    table = (four_runs / "results.json").read_text()
    report.main([runs[0]])  # "re-print one run": its own folder, the comparison stays
    assert (four_runs / "results.json").read_text() == table
    assert len(json.load(open(four_runs / "exit-s0" / "results.json"))["runs"]) == 1
    with pytest.raises(SystemExit):
        report.main(runs[:2] + ["--out", str(four_runs)])  # two runs into the four runs' folder: asked? no
    assert "holds a comparison of other runs" in capsys.readouterr().err
    assert (four_runs / "results.json").read_text() == table
    report.main(runs[:2] + ["--out", str(four_runs), "--overwrite"])  # asked: replaced
    assert len(json.load(open(four_runs / "results.json"))["runs"]) == 2


def test_recompute_with_other_settings_never_replaces_eval_json(tmp_path, monkeypatch):
    text_scores(monkeypatch)
    run = tmp_path / "run"
    exit_lib.main(tiny_args(run, tmp_path / "base", eval_problems=3, eval_k=1, eval_samples=1))
    own = (run / "eval.json").read_text()
    assert 0 < np.mean(json.loads(own)["policy"]["score"]) < 1
    report.main([str(run), "--recompute", "--problems=2", "--device=cpu"])
    assert (run / "eval.json").read_text() == own
    assert json.load(open(run / "eval.n2.json"))["policy"]["n"] == 2
    (run / "eval.json").write_text(json.dumps(dict(json.loads(own), mark="old")))  # so a rewrite shows
    report.main([str(run), "--recompute", "--device=cpu"])  # the same settings: the same evaluation, written anew
    assert json.load(open(run / "eval.json")) == json.loads(own)
    # what is evaluated is the checkpoint's policy (a few tiny steps may sample alike from other weights): moved by hand
    ck = model_lib.load_checkpoint(str(run / "ckpt.pt"))
    ck["policy"]["model"] = {k: v + 0.01 for k, v in ck["policy"]["model"].items()}
    torch.save(ck, run / "ckpt.pt")
    seen, evaluate = [], eval_lib.evaluate_policy
    monkeypatch.setattr(eval_lib, "evaluate_policy", lambda policy, *a, **kw: seen.append(policy.state_dict())
                        or evaluate(policy, *a, **kw))
    report.evaluate_checkpoint(str(run / "ckpt.pt"), device="cpu", with_base=False)
    assert len(seen) == 1 and seen[0].keys() == ck["policy"]["model"].keys()
    assert all(torch.equal(seen[0][k], v) for k, v in ck["policy"]["model"].items())


def test_base_evaluation_cache_is_keyed_by_the_weights(tmp_path, monkeypatch):
    fam = tasks_lib.get_family("math")
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    path = tmp_path / "base.pt"
    calls = []

    def load(p, device):
        calls.append(p)
        torch.manual_seed(len(calls))
        m = model_lib.Transformer(dataclasses.replace(model_lib.toy_config(tok.vocab_size), n_layer=1, n_embd=32,
                                                      n_head=2, n_kv_head=1, intermediate_size=64))
        return (m,)
    settings = dict(n_problems=2, K=1, n_samples=1, temperature=1.0, max_new_tokens=8, seed=0, harder=False)
    path.write_bytes(b"weights v1")
    base_lib.evaluate_base(str(path), tok, fam, "cpu", load, **settings)
    base_lib.evaluate_base(str(path), tok, fam, "cpu", load, **settings)
    assert len(calls) == 1  # cached beside the weights: BASE.eval-HASH.json
    assert [n for n in os.listdir(tmp_path) if n.startswith("base.pt.eval-")]
    path.write_bytes(b"weights v2, retrained")  # new weights under the same name
    v1 = set(tmp_path.glob("base.pt.eval-*.json"))
    base_lib.evaluate_base(str(path), tok, fam, "cpu", load, **settings)
    assert len(calls) == 2
    [cache] = set(tmp_path.glob("base.pt.eval-*.json")) - v1
    for damage in ("{bad", "{}"):  # a damaged cache is a miss: evaluated again and rewritten, not an error after RL
        cache.write_text(damage)
        res = base_lib.evaluate_base(str(path), tok, fam, "cpu", load, **settings)
        assert eval_lib.check_evaluation(json.loads(cache.read_text()), str(cache), whole=False) == res
    assert len(calls) == 4
    # a Hugging Face directory: its tokenizer's files (an edited chat template, special tokens) change the prompts
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name, text in (("model.safetensors", "w"), ("config.json", "{}"), ("tokenizer_config.json", "{}")):
        (hf_dir / name).write_text(text)
    base_lib.evaluate_base(str(hf_dir), tok, fam, "cpu", load, **settings)
    base_lib.evaluate_base(str(hf_dir), tok, fam, "cpu", load, **settings)
    assert len(calls) == 5
    (hf_dir / "tokenizer_config.json").write_text('{"chat_template": "edited"}')
    base_lib.evaluate_base(str(hf_dir), tok, fam, "cpu", load, **settings)
    assert len(calls) == 6


def test_a_damaged_shipped_base_json_is_an_error_before_any_work(tmp_path, monkeypatch):
    import shutil
    shutil.copytree(SHIPPED, tmp_path / "exactsumfb")
    monkeypatch.setattr(base_lib, "SHIPPED", str(tmp_path))
    cfg, fam = exit_lib.Config(), tasks_lib.make_family("exactsumfb")
    record = json.loads((tmp_path / "exactsumfb" / "base.json").read_text())
    for text in [json.dumps(record | {"key": None}), json.dumps(record | {"evaluations": "x"}), "{not json",
                 json.dumps(record | {"settings": None}), json.dumps([record])]:  # evaluate_base reads settings
        (tmp_path / "exactsumfb" / "base.json").write_text(text)
        with pytest.raises(ValueError, match=r"base.json is damaged .*`git checkout .*exactsumfb` restores it"):
            base_lib.shipped_base(cfg, base_lib.warm_start_key(cfg, fam))



def shipped_copy(tmp_path, monkeypatch):
    """bases/exactsumfb copied into tmp_path, which base.py takes for bases/ (what a test writes stays there)."""
    import shutil
    shutil.copytree(SHIPPED, tmp_path / "exactsumfb")
    monkeypatch.setattr(base_lib, "SHIPPED", str(tmp_path))
    return tmp_path / "exactsumfb"


def test_shipped_weights_other_than_recorded_are_an_error_before_any_work(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    weights = shipped_copy(tmp_path, monkeypatch) / "model.safetensors"
    cfg = exit_lib.Config()
    key = base_lib.warm_start_key(cfg, tasks_lib.make_family(cfg.task))
    assert base_lib.shipped_base(cfg, key) == str(weights.parent)  # intact: used
    good = weights.read_bytes()
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 3400000\n"
    for damage in (good[:len(good) // 2], lfs, good[:-4] + bytes(255 - b for b in good[-4:]), "foreign", None):
        if damage is None:
            weights.unlink()
        elif damage == "foreign":  # loads, but other tensors
            save_file({"x": torch.zeros(3)}, str(weights))
        else:  # cut, a Git LFS pointer, altered in place (the same size)
            weights.write_bytes(damage)
        with pytest.raises(ValueError, match=r"base.json is damaged \(.*model.safetensors.*\): `git checkout .*exactsumfb` "
                                             "restores it$"):
            base_lib.shipped_base(cfg, key)


def test_a_damaged_shipped_evaluation_is_an_error_before_any_work(tmp_path, monkeypatch):
    base = shipped_copy(tmp_path, monkeypatch)
    cfg = exit_lib.Config()
    key = base_lib.warm_start_key(cfg, tasks_lib.make_family(cfg.task))
    record = json.loads((base / "base.json").read_text())
    for where, value in (("score", None), ("K", "16"), ("n", None)):
        damaged = json.loads(json.dumps(record))
        if where == "score":
            damaged["evaluations"][0]["score"][3] = value
        else:
            damaged["evaluations"][-1][where] = value
        (base / "base.json").write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match=r"base.json is damaged \(an evaluation: .*\): `git checkout .*exactsumfb` "
                                             "restores it$") as e:  # not "delete it, or pass --recompute", after RL
            base_lib.shipped_base(cfg, key, quiet=True)
        assert "--recompute" not in str(e.value)


def test_the_shipped_base_row_is_reused_only_on_its_own_held_out_problems(tmp_path, monkeypatch):
    """--init=bases/exactsumfb with another --task or --difficulties: the base is evaluated on the run's problems."""
    base = str(shipped_copy(tmp_path, monkeypatch))  # an evaluation is cached beside it: here, not in bases/
    recorded = shipped_record()["evaluations"][0]
    monkeypatch.setattr(eval_lib, "evaluate_policy", lambda policy, tok, family, **s: dict(recorded, evaluated=family.name))
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    settings = eval_lib.eval_settings(dataclasses.asdict(exit_lib.Config()))
    row = lambda fam: base_lib.evaluate_base(base, tok, fam, "cpu", lambda *a: (None,), **settings)
    for same in (tasks_lib.make_family("exactsumfb"), tasks_lib.make_family("exactsumfb", "", "4-6")):
        assert row(same) == recorded  # the same problems (4-6: its own difficulties)
    for other in (tasks_lib.make_family("exactsum"), tasks_lib.make_family("exactsumfb", "", "5-7")):
        assert row(other)["evaluated"] == other.name
    weights = os.path.join(base, "model.safetensors")  # a copy whose weights were altered: other weights, evaluated
    with open(weights, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    assert row(tasks_lib.make_family("exactsumfb"))["evaluated"] == "exactsumfb"


def test_a_cached_base_of_other_contents_is_one_line_saying_delete_it(tmp_path):
    cfg = tiny_cfg(tmp_path)
    fam = tasks_lib.make_family(cfg.task)
    key = base_lib.warm_start_key(cfg, fam)
    base_lib.warm_start(cfg, fam, torch.device("cpu"), quiet=True)  # trained and cached
    path = tmp_path / "base" / f"{cfg.task}-{key}.pt"
    good = torch.load(path, weights_only=False)
    for damage in ({"policy": {}}, dict(good, policy=dict(good["policy"], model={}))):
        torch.save(damage, path)
        with pytest.raises(ValueError, match=r"delete it to warm-start anew$") as e:
            base_lib.warm_start(cfg, fam, torch.device("cpu"), quiet=True)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_base_dir_that_cannot_be_written_is_an_error_before_the_warm_start(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    real, trained = base_lib.train_base, []
    monkeypatch.setattr(base_lib, "train_base", lambda *a, **k: trained.append(1) or real(*a, **k))
    err = main_fails(capsys, tiny_args(tmp_path / "run", tmp_path / "file" / "base", eval_problems=2))
    assert err.startswith(f"error: --base_dir={tmp_path / 'file' / 'base'}: cannot write there") and not trained, err


def test_base_py_out_that_cannot_be_written_is_one_line_before_the_warm_start(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(base_lib, "warm_start", lambda *a, **k: pytest.fail("warm-started before the check"))
    with pytest.raises(SystemExit) as e:
        base_lib.main([f"--out={tmp_path / 'file' / 'bases'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --out={tmp_path / 'file' / 'bases'}: cannot write there"), err

def test_real_data_and_checkpoint_problems_are_errors_before_the_model_loads(tmp_path, instruct, monkeypatch):
    import shutil
    monkeypatch.setattr(hf, "load_policy", lambda *a, **k: pytest.fail("loaded the model before the check"))
    ck, data = instruct
    fails = lambda msg, **kw: pytest.raises(ValueError, match=msg)
    (tmp_path / "empty.jsonl").write_text("")
    with fails(r"empty.jsonl: no problems \(the file is empty\)"):
        runs.prepare(hf_cfg(tmp_path, instruct, data=str(tmp_path / "empty.jsonl")), quiet=True)
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with fails(r"binary.jsonl, line 1: not UTF-8 text"):
        runs.prepare(hf_cfg(tmp_path, instruct, data=str(tmp_path / "binary.jsonl")), quiet=True)
    lines = open(data).read().splitlines()
    train_only = [l for l in lines if tasks_lib.split_of(json.loads(l)["question"]) == "train"]
    (tmp_path / "train_only.jsonl").write_text("\n".join(train_only) + "\n")
    with fails(r"train_only.jsonl has no test problems .*--eval_data"):  # the final evaluation would need them
        runs.prepare(hf_cfg(tmp_path, instruct, data=str(tmp_path / "train_only.jsonl"), eval_problems=4), quiet=True)
    long = dict(question="How many apples? " * 400, answer="#### 3")
    (tmp_path / "long.jsonl").write_text("\n".join(lines + [json.dumps(long)]) + "\n")
    with fails(r"--data, line 31: the longest prompt of problem .* exceeds the model's context of 1024 tokens"):
        runs.prepare(hf_cfg(tmp_path, instruct, data=str(tmp_path / "long.jsonl"), eval_problems=4), quiet=True)
    # a long reference answer is no reason to refuse: a step's answer is at most --max_new_tokens long
    (tmp_path / "long_target.jsonl").write_text("\n".join(lines + [json.dumps(dict(question="Which number?",
                                                                               answer="#### " + "7" * 1500))]) + "\n")
    runs.preflight(hf_cfg(tmp_path, instruct, data=str(tmp_path / "long_target.jsonl"), eval_problems=4), quiet=True)
    bad = tmp_path / "bad_init"
    shutil.copytree(ck, bad)
    for text, msg in [("[1, 2]", "config.json: expected a JSON object"), ("{", "config.json: not valid JSON")]:
        (bad / "config.json").write_text(text)
        with fails(msg):
            runs.prepare(hf_cfg(tmp_path, instruct, init=str(bad)), quiet=True)


def test_a_small_heldout_set_is_capped_and_eval_data_is_its_own_file(tmp_path, instruct, capsys):
    ck, data = instruct
    lines = open(data).read().splitlines()
    (tmp_path / "heldout.jsonl").write_text("\n".join(lines[:3]) + "\n")  # every line held out, train or not
    fam = tasks_lib.RealMath(path=str(tmp_path / "heldout.jsonl"), heldout_file=True)
    probs = eval_lib.heldout_problems(fam, 10)
    assert len(probs) == 3 == len({p.id for p in probs})  # capped, never a problem twice
    assert "has only 3 held-out problems; evaluating on those 3, not 10" in capsys.readouterr().err
    out = tmp_path / "run"
    exit_lib.main([f"--{k}={v}" for k, v in dict(
        init=ck, task="realmath", data=data, eval_data=tmp_path / "heldout.jsonl", out_dir=out, iters=1,
        tasks_per_iter=2, group_size=2, max_new_tokens=6, min_size=2, eval_problems=10, eval_k=1, eval_samples=1,
        device="cpu").items()])
    ev = json.load(open(out / "eval.json"))
    assert ev["policy"]["n"] == 3 == ev["base"]["n"]
    assert report.evaluate_checkpoint(str(out / "ckpt.pt"), device="cpu") == ev  # eval.py: the same held-out file
    assert json.load(open(out / "config.json"))["eval_data"] == str(tmp_path / "heldout.jsonl")


def test_a_checkpoint_without_a_chat_template_warns(tmp_path, instruct, capsys):
    import shutil
    ck, data = instruct
    plain = tmp_path / "plain"
    shutil.copytree(ck, plain)
    config = json.load(open(plain / "tokenizer_config.json"))
    config.pop("chat_template", None)
    json.dump(config, open(plain / "tokenizer_config.json", "w"))
    if (plain / "chat_template.jinja").exists():
        os.remove(plain / "chat_template.jinja")
    runs.preflight(hf_cfg(tmp_path, instruct, init=str(plain)))
    assert "no chat template, so prompts are plain 'user: ... assistant: ' text" in capsys.readouterr().err


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    """The first Ctrl-C asks the iteration in flight to finish; a second one while it runs stops at once:
    exit code 130, no traceback, no checkpoint written, nothing half-written. The third iteration of the
    patched run waits 60 s before its work, so both signals land inside it (a run that ignored the second
    would save a checkpoint after the wait)."""
    import signal as signal_lib
    run = tmp_path / "run"
    patch = ("import time\n"
             "real = exit.Trainer.iteration\n"
             "def slow(self):\n"
             "    if self.iter >= 2:\n"
             "        time.sleep(60)\n"
             "    return real(self)\n"
             "exit.Trainer.iteration = slow\n")
    script = _patched_main(tmp_path / "slow.py", patch)
    args = tiny_args(run, tmp_path / "base", iters=5, ckpt_every=1000)
    p = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    log, t0 = run / "log.jsonl", time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert p.poll() is None and time.time() - t0 < 120
        time.sleep(0.1)
    time.sleep(0.5)  # the loop has entered the third iteration's wait
    p.send_signal(signal_lib.SIGINT)
    while "finishing this iteration" not in p.stdout.readline():  # the first Ctrl-C was taken
        assert p.poll() is None
    p.send_signal(signal_lib.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted: stopped at once" in err
    assert not (run / "ckpt.pt").exists() and not [n for n in os.listdir(run) if ".tmp" in n]
    # a log line cut off by a kill is dropped when the log is read, not an error
    with open(log, "a") as f:
        f.write('{"iter": 99')
    assert [e["iter"] for e in runs.read_log_lines(str(log))] == [1, 2]

def test_bench_runs_end_to_end(tmp_path):
    # bench.py with a tiny budget, as a subprocess: all three comparisons, TRL's GRPOTrainer as the
    # iteration's peer when the optional requirements (requirements-bench.txt) are installed
    peer = "trl" if all(importlib.util.find_spec(m) for m in ("trl", "datasets", "accelerate")) else "none"
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--base-dir", str(tmp_path / "base"),
                        "--warm-steps", "2", "--prompts", "2", "--samples", "2", "--new-tokens", "4",
                        "--warm-batch", "8", "--repeats", "1", "--peer", peer], capture_output=True, text=True, timeout=600,
                       env=os.environ | {"HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("speed-up") == (4 if peer == "trl" else 3), p.stdout
    assert "sampling" in p.stdout and "update" in p.stdout
    diff = float(p.stdout.split("largest loss difference ")[1].split()[0])  # packed vs padded warm-start loss
    assert diff < 1e-4, p.stdout


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_whole_iteration_and_resumes(tmp_path, sig):
    """SIGINT (Ctrl-C) or SIGTERM (kill; the ladder stopping its runs) mid-run: the iteration in flight
    finishes, the checkpoint matches the log, resume completes."""
    import signal as signal_lib
    run = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in dict(out_dir=run, base_dir=tmp_path / "base", n_layer=1, n_embd=32, n_head=2,
                                          n_kv_head=1, warm_examples=64, warm_steps=3, warm_batch=8, iters=100000,
                                          tasks_per_iter=2, group_size=4, max_new_tokens=12, min_size=2,
                                          eval_problems=0, device="cpu", ckpt_every=1000).items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "exit.py"), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    log = run / "log.jsonl"
    t0 = time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert p.poll() is None and time.time() - t0 < 120, p.stderr.read()[-2000:] if p.poll() is not None else "timeout"
        time.sleep(0.1)
    p.send_signal(getattr(signal_lib, sig))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "continue with --resume" in out, err[-2000:]
    ck = model_lib.load_checkpoint(str(run / "ckpt.pt"))
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert ck["iter"] == len(lines) == lines[-1]["iter"]
    # a log line beyond the checkpoint (a crash between the two) is dropped on resume
    with open(log, "a") as f:
        f.write(json.dumps(dict(lines[-1], iter=ck["iter"] + 1)) + "\n")
    cfg, given = runs.parse_args([f"--out_dir={run}", "--resume", f"--iters={ck['iter'] + 2}"])
    runs.train(cfg, given, quiet=True)
    iters = [json.loads(l)["iter"] for l in log.read_text().splitlines()]
    assert iters == list(range(1, ck["iter"] + 3))



def test_a_tiny_given_buffer_keeps_the_recommended_min_size_at_least_one():
    # tools' recipe: B_min / N = 320 / 640; N = 1 gives 1 * 320 // 640 = 0, clamped to 1 (a buffer never replays at 0)
    cfg, _ = runs.parse_args(["--task=tools", "--buffer_size=1"])
    assert (cfg.buffer_size, cfg.min_size) == (1, 1)

def test_ref_alpha_without_a_reference_is_a_warning(capsys):
    runs.check_given(*runs.parse_args(["--ref_alpha=0.5"]))
    assert "warning: --ref_alpha change(s) nothing" in capsys.readouterr().err
    runs.check_given(*runs.parse_args(["--ref_alpha=0.5", "--beta=0.01"]))
    assert capsys.readouterr().err == ""

def test_config_rejects_an_odd_head_width_and_ref_alpha_outside_0_1():
    # n_embd 12 / n_head 4 = 3: a multiple, but rotary embeddings split a head's width in halves
    with pytest.raises(ValueError, match=r"n_embd \(12\) must be a multiple of n_head \(4\) with an even quotient"):
        runs.parse_args(["--n_embd=12"])
    runs.parse_args(["--n_embd=16"])  # 16 / 4 = 4: fine
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match="ref_alpha must be in \\[0, 1\\]"):
            runs.parse_args([f"--ref_alpha={bad}"])

def test_every_evaluation_setting_is_fixed_once_a_run_is_evaluated(tmp_path):
    """Each of EVAL_KEYS changed on --resume of an evaluated run is refused (eval_k and eval_split are tested above)."""
    cfg = tiny_cfg(tmp_path, iters=1, eval_problems=2, eval_k=1, eval_samples=1)
    runs.train(cfg, quiet=True)
    (tmp_path / "run" / "eval.json").write_text("{}")
    for arg, old in (("--eval_samples=3", "eval_samples=1"), ("--eval_problems=3", "eval_problems=2"),
                     ("--eval_temperature=0.5", "eval_temperature=1.0"), ("--eval_harder", "eval_harder=False")):
        with pytest.raises(ValueError, match=f"evaluated \\(eval.json\\) with {old}; --resume with {arg}"):
            runs.prepare(*runs.parse_args([f"--out_dir={cfg.out_dir}", "--resume", arg]), quiet=True)

def test_a_damaged_last_log_line_is_an_error_unless_it_was_cut_off_mid_write(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1}\n{"iter": 2, "rew')  # a write killed mid-line: dropped
    assert runs.read_log_lines(str(log)) == [{"iter": 1}]
    log.write_text('{"iter": 1}\n{"iter": 2, "rew\n')  # a whole line that is not an entry: damaged
    with pytest.raises(ValueError, match="log.jsonl, line 2: not a log entry"):
        runs.read_log_lines(str(log))
    log.write_text('{"iter": 1}\n{"it": 2}\n')
    with pytest.raises(ValueError, match="line 2: not a log entry \\(no 'iter'\\)"):
        runs.read_log_lines(str(log))

def test_check_context_admits_exactly_what_fits(tmp_path):
    """The longest prompt is an improve or diverge step whose answer may be max_new_tokens tokens, with another
    answer's feedback (FEEDBACK_SLACK = 8 tokens longer than p.target's); plus a completion of max_new_tokens."""
    family = tasks_lib.make_family("exactsumfb")
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    p = family.sample("train", 1, seed=0)[0]
    T, target = 12, len(tok.encode(p.target))
    step = max(len(tasks_lib.encode_prompt(tok, family, p, p.target, m)) for m in ("improve", "diverge"))
    longest = max(len(tasks_lib.encode_prompt(tok, family, p)), step - target + T + 8)
    fits = longest + T
    runs.check_context(tok, "compact", fits, T, {p.request: p}, family, "the task")
    with pytest.raises(ValueError, match=f"is {longest} tokens, .* context of {fits - 1} tokens"):
        runs.check_context(tok, "compact", fits - 1, T, {p.request: p}, family, "the task")

def test_a_cached_base_of_another_key_is_refused(tmp_path):
    """Another setting's base copied under this key's name (a renamed file) would become this run's base: refused."""
    cfg = tiny_cfg(tmp_path)
    fam = tasks_lib.make_family(cfg.task)
    key = base_lib.warm_start_key(cfg, fam)
    base_lib.warm_start(cfg, fam, torch.device("cpu"), quiet=True)
    path = tmp_path / "base" / f"{cfg.task}-{key}.pt"
    torch.save(dict(torch.load(path, weights_only=False), key="0123456789ab"), path)
    with pytest.raises(ValueError, match=r"is not the base of these settings \(a base checkpoint, key 0123456789ab\)"):
        base_lib.warm_start(cfg, fam, torch.device("cpu"), quiet=True)

def _counting_evaluate(monkeypatch):
    calls = []
    def evaluate(policy, tok, family, **s):
        calls.append(family.train_difficulties)
        return dict(K=1, n=2, score=[0.5, 0.5], solved=[0.5, 0.5], delta=0.0)
    monkeypatch.setattr(eval_lib, "evaluate_policy", evaluate)
    return calls

def test_base_evaluation_cache_is_keyed_by_the_problems(tmp_path, monkeypatch):
    """One base file evaluated for runs of other --difficulties: other held-out problems, another evaluation."""
    calls = _counting_evaluate(monkeypatch)
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    path = tmp_path / "base.pt"
    path.write_bytes(b"weights")
    settings = dict(n_problems=4, K=1, n_samples=1, temperature=1.0, max_new_tokens=8, seed=0, harder=False)
    ev = lambda fam: base_lib.evaluate_base(str(path), tok, fam, "cpu", lambda *a: (None,), **settings)
    ev(tasks_lib.make_family("math"))
    ev(tasks_lib.make_family("math"))
    assert len(calls) == 1
    ev(tasks_lib.make_family("math", difficulties="5,7"))
    assert calls == [(2, 3, 4), (5, 7)]

def test_base_evaluation_cache_sees_new_weights_of_the_same_size(tmp_path, monkeypatch):
    calls = _counting_evaluate(monkeypatch)
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    path = tmp_path / "base.pt"
    settings = dict(n_problems=2, K=1, n_samples=1, temperature=1.0, max_new_tokens=8, seed=0, harder=False)
    ev = lambda: base_lib.evaluate_base(str(path), tok, tasks_lib.make_family("math"), "cpu", lambda *a: (None,), **settings)
    path.write_bytes(b"weights v1")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    ev()
    path.write_bytes(b"weights v2")  # retrained: the same size, a later time
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    ev()
    assert len(calls) == 2

def test_warm_start_learning_rate_warms_up_from_its_first_step_then_decays(tmp_path, monkeypatch):
    """Stage 1's schedule: step s (0-based) of S at lr * min(1, (s + 1) / 50) * (1 + cos(pi s / S)) / 2: the first
    step already moves (lr / 50), the last is near 0."""
    lrs = []
    class Recording(torch.optim.AdamW):
        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)
    monkeypatch.setattr(base_lib.torch.optim, "AdamW", Recording)
    cfg = tiny_cfg(tmp_path, warm_steps=4, warm_lr=1e-3)
    fam = tasks_lib.make_family(cfg.task)
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    mcfg = dataclasses.replace(model_lib.toy_config(tok.vocab_size), n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                               intermediate_size=96)
    base_lib.train_base(cfg, fam, mcfg, tok, "cpu", quiet=True)
    cos = [1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5)]  # (1 + cos(pi s / 4)) / 2, s = 0..3
    assert lrs == pytest.approx([1e-3 * (s + 1) / 50 * cos[s] for s in range(4)], rel=1e-12)

def test_the_run_folder_stays_locked_while_the_run_trains_and_evaluates(tmp_path):
    """runs.run holds out_dir/.lock for the whole block exit.main trains and evaluates in, not only while starting."""
    import fcntl
    run = tmp_path / "run"
    with runs.run(tiny_args(run, tmp_path / "base")) as trainer:
        assert trainer.iter == 0
        fd = os.open(run / ".lock", os.O_RDWR)  # another open file: as another process's flock would see it
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end
    os.close(fd)

def test_another_users_live_writer_is_alive(monkeypatch):
    """kill(pid, 0) on another user's process raises PermissionError: it exists, so its half-written file stays."""
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "kill", kill)
    assert runs.writer_alive(os.getpid() + 1)
    def gone(pid, sig):
        raise ProcessLookupError
    monkeypatch.setattr(os, "kill", gone)
    assert not runs.writer_alive(os.getpid() + 1)


# ===============================================================================================
# Several processes (torchrun, data parallel): 2 CPU ranks on the gloo backend, loopback only.


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env(rank=None, world=None, port=None) -> dict:
    env = dict(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_PORT=str(port))
    return env


def _dp_worker(rank, world, port, kw, iters, out):
    """One rank of a data-parallel run of `iters` iterations (SGD, so the update is the gradient itself);
    rank 0 saves what the comparison needs."""
    os.environ.update(_dist_env(rank, world, port))
    torch.set_num_threads(1)
    cfg = runs.check_config(exit_lib.Config(**kw))
    scale.dist_init(cfg)
    try:
        got = _run_iterations(cfg, iters)
        if rank == 0:
            torch.save(got, out)
    finally:
        torch.distributed.destroy_process_group()


def _run_iterations(cfg, iters) -> dict:
    tr = runs.prepare(cfg, quiet=True)
    tr.opt = torch.optim.SGD(tr.policy.parameters(), lr=0.1)  # Adam's first step, ~lr * sign(g), would magnify rounding
    # a barely trained tiny policy scores 0 everywhere, and equal rewards update nothing: a reward of the answer's
    # text, the same on any rank, gives groups that differ, so the weights compared below have really moved
    tr.reward = lambda inst, answers: float(zlib.crc32(answers[-1].encode()) % 2)
    logs, answers = [], []
    for _ in range(iters):
        out = tr.iteration()
        logs.append({k: v for k, v in out["log"].items() if k not in ("tok_per_s", "sample_frac", "elapsed")})
        answers.append(out["answers"])
    return dict(params=[p.detach().clone() for p in tr.policy.parameters()], buffer=tr.buffer.state_dict(),
                logs=logs, answers=answers, gen=tr.gen.get_state(), rng=tr.rng.bit_generator.state)


def _spawn(fn, world, args, timeout=120):
    """torch.multiprocessing.spawn, but a hang fails the test instead of the whole suite."""
    import torch.multiprocessing as mp
    ctx = mp.spawn(fn, args=(world, *args), nprocs=world, join=False)
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"the {world} ranks did not finish in {timeout}s")


def test_generate_shards_sample_the_whole_batch():
    """rows=(first, total): two shards of a batch, each drawing the whole batch's uniforms from its own
    copy of the generator, sample exactly the rows of one call; the generator a shard that stopped
    early leaves behind is caught up by drawing the missing steps (as Trainer.sample does)."""
    tok = tokenizer_lib.byte_tokenizer(tasks_lib.MARKERS)
    torch.manual_seed(0)
    m = model_lib.Transformer(dataclasses.replace(model_lib.toy_config(tok.vocab_size), n_layer=1, n_embd=32,
                                                  n_head=2, n_kv_head=1, intermediate_size=96))
    prompts = [tok.encode(t) for t in ("12+7=", "a longer prompt here", "x", "3*4")]
    kw = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=1.0)
    whole = model_lib.generate(m, prompts, 3, 10, generator=torch.Generator().manual_seed(5), **kw)
    parts, gens = [], []
    for first, ps in ((0, prompts[:2]), (6, prompts[2:])):
        g = torch.Generator().manual_seed(5)
        parts.append(model_lib.generate(m, ps, 3, 10, generator=g, rows=(first, 12), **kw))
        gens.append(g)
    T = whole.tokens.shape[1]
    for i, (part, g) in enumerate(zip(parts, gens)):
        rows = slice(6 * i, 6 * i + 6)
        t = part.tokens.shape[1]
        assert torch.equal(part.tokens, whole.tokens[rows, :t]) and torch.equal(part.lengths, whole.lengths[rows])
        assert (whole.tokens[rows, t:] == tok.pad_id).all()
        torch.testing.assert_close(part.logprobs, whole.logprobs[rows, :t], atol=1e-5, rtol=1e-5)
        for _ in range(T - t):
            torch.rand(12, 1, generator=g)
    ref = torch.Generator().manual_seed(5)
    model_lib.generate(m, prompts, 3, 10, generator=ref, **kw)
    assert all(torch.equal(g.get_state(), ref.get_state()) for g in gens)


@pytest.mark.parametrize("task", ["exactsumfb", "tools"])
def test_two_ranks_equal_one_process(tmp_path, task):
    """One curriculum, one update: 2 gloo ranks, each with half of the iteration's instances, give the
    single process's rollouts, rewards and buffer exactly, and its parameters to fp32 tolerance
    (the gradient is summed in another order), over 2 iterations (the second replays from the buffer), and its
    logged statistics (2 epochs and β > 0: kl, clip_frac and ratio_mean are not 0 and 1; this tiny policy's
    completions are of one length, so the tokens' weighting is tested with micro-batches, not here).
    tools is multi-turn: the ranks finish their episodes turn by turn together."""
    kw = dataclasses.asdict(tiny_cfg(tmp_path, task=task, tasks_per_iter=4, replay_prob=0.9, micro_batch=8,
                                     epochs=2, beta=0.05, lr=1e-2))
    # one process: exit.Trainer's update over the whole batch (no micro-batches); it also trains the warm start
    one = _run_iterations(runs.check_config(exit_lib.Config(**(kw | {"micro_batch": 0}))), 2)
    kw["out_dir"] = str(tmp_path / "dp")
    _spawn(_dp_worker, 2, (_free_port(), kw, 2, str(tmp_path / "dp.pt")))
    two = torch.load(tmp_path / "dp.pt", weights_only=False)
    assert two["answers"] == one["answers"]
    assert sum(log["replay_frac"] for log in one["logs"]) > 0  # the buffer was drawn from
    assert all(log["grad_norm"] > 0 for log in one["logs"])  # and the weights moved
    for a, b in zip(one["logs"], two["logs"]):
        assert b.pop("world_size") == 2 and a.pop("world_size") == 1
        for k in a:
            if isinstance(a[k], float) and k not in ("reward", "reward_base", "reward_improve", "reward_diverge",
                                                     "zero_var_frac", "replay_frac", "depth", "difficulty"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k  # update statistics: float sums
            else:
                assert b[k] == a[k], k
    assert two["buffer"] == one["buffer"] and two["rng"] == one["rng"]
    assert torch.equal(two["gen"], one["gen"])
    for p, q in zip(one["params"], two["params"]):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


def _torchrun(args, nproc=2, timeout=180, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, **_dist_env()}, **popen)


def _cli(cfg) -> list[str]:  # (--init brings its own architecture: the toy's settings are left out)
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()
            if k != "resume" and not (cfg.init and k in runs.TOY_ONLY)]


def test_two_ranks_run_and_resume_exactly(tmp_path):
    """torchrun exit.py on 2 ranks: rank 0 writes the folder (config.json and every log line record the
    world size); 2 iterations, then --resume to 4, equals 4 in one go, bit for bit; a resume on another
    number of processes says that it is not exact. From the shipped base (as an exit checkpoint): it gets some
    answers right, so groups differ and every iteration updates (a tiny warm start scores 0: no gradient)."""
    policy, _, spec = hf.load_policy(SHIPPED, "cpu")
    model_lib.atomic_save(dict(policy=model_lib.policy_state(policy, spec), kind="base"), str(tmp_path / "base.pt"))
    cfg = tiny_cfg(tmp_path, tasks_per_iter=4, iters=4, ckpt_every=2, init=str(tmp_path / "base.pt"),
                   max_new_tokens=48, group_size=8, lr=2e-4)  # the base's answers, at the default run's lr
    full = _torchrun([os.path.join(HERE, "exit.py"), *_cli(dataclasses.replace(cfg, eval_problems=6, eval_k=1))])
    assert full.returncode == 0, full.stderr[-3000:]
    ev = hf.read_json(os.path.join(cfg.out_dir, "eval.json"))  # the evaluation, split across the ranks
    assert ev["policy"]["n"] == 6 * cfg.eval_samples and ev["policy"]["settings"]["parts"] == 2
    assert "parts" not in ev["base"]["settings"]  # the base is evaluated (and cached) by rank 0 alone
    assert full.stdout.count("done:") == 1
    part = dataclasses.replace(cfg, out_dir=str(tmp_path / "part"), iters=2)
    p = _torchrun([os.path.join(HERE, "exit.py"), *_cli(part)])
    assert p.returncode == 0, p.stderr[-3000:]
    r = _torchrun([os.path.join(HERE, "exit.py"), f"--out_dir={part.out_dir}", "--resume", "--iters=4"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (model_lib.load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (cfg.out_dir, part.out_dir))
    assert a["iter"] == b["iter"] == 4 and a["world_size"] == 2
    assert all(torch.equal(x, y) for x, y in zip(a["policy"]["model"].values(), b["policy"]["model"].values()))
    assert a["buffer"] == b["buffer"] and a["seen"]["ids"] == b["seen"]["ids"] and a["seen"]["n"] == 16
    assert hf.read_json(os.path.join(cfg.out_dir, "config.json"))["world_size"] == 2
    logs = [runs.read_log_lines(os.path.join(d, "log.jsonl")) for d in (cfg.out_dir, part.out_dir)]
    drop = ("tok_per_s", "sample_frac", "elapsed")
    assert [{k: v for k, v in e.items() if k not in drop} for e in logs[0]] == \
           [{k: v for k, v in e.items() if k not in drop} for e in logs[1]]
    assert [e["iter"] for e in logs[0]] == [1, 2, 3, 4] and all(e["world_size"] == 2 for e in logs[0])
    assert all(e["grad_norm"] > 0 for e in logs[0])  # the weights compared above moved at every iteration
    # one process resuming the 2-rank run: it goes on, and says it is not bit-exact
    one = subprocess.run([sys.executable, os.path.join(HERE, "exit.py"), f"--out_dir={part.out_dir}", "--resume",
                          "--iters=5"], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "trained on 2 process(es), this run has 1" in one.stderr


@pytest.mark.parametrize("where", ["train_base", "final_evaluation"])
def test_sigterm_outside_the_rl_loop_stops_with_a_message(tmp_path, where):
    """kill (SIGTERM) during the warm start or the final evaluation stops at once as Ctrl-C does: exit code 130
    and one line saying what the folder keeps, not a silent death by the signal."""
    module = "base" if where == "train_base" else "exit"  # stage 1 is base.py's
    patch = (f"import signal, {module}\n"
             f"real = {module}.{where}\n"
             "def killed(*a, **k):\n"
             "    os.kill(os.getpid(), signal.SIGTERM)\n"
             "    return real(*a, **k)\n"
             f"{module}.{where} = killed\n")
    script = _patched_main(tmp_path / "killed.py", patch)
    args = tiny_args(tmp_path / "run", tmp_path / "base", eval_problems=2, eval_k=1, eval_samples=1)
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 130 and "interrupted: stopped at once" in p.stderr and "Traceback" not in p.stderr, p.stderr[-800:]
    assert os.path.isfile(tmp_path / "run" / "ckpt.pt") == (where == "final_evaluation")


def _patched_main(path, patch: str):
    """A script (for torchrun, or a subprocess): exit.py's main() after the lines in patch (which see os, sys
    and exit)."""
    path.write_text(f"import os, sys\nsys.path.insert(0, {HERE!r})\nimport exit\n{patch}exit.main(sys.argv[1:])\n")
    return path


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from Linux's /proc")
def test_ranks_end_with_the_process_group_torn_down(tmp_path):
    """At the end of main() every rank's destroy_process_group really ends gloo's threads, so none runs on
    into interpreter shutdown (where a rank once aborted in CI). Each rank records its threads' names just
    before and just after the call."""
    cfg = tiny_cfg(tmp_path, tasks_per_iter=4, iters=2)
    patch = ("import torch\n"
             "def threads():\n"
             "    return sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))\n"
             "real = torch.distributed.destroy_process_group\n"
             "def destroy(*a, **k):\n"
             "    before = threads()\n"
             "    real(*a, **k)\n"
             # a file per rank: on the shared stdout, a rank's line can land inside rank 0's last lines
             f"    open(os.path.join({str(tmp_path)!r}, 'threads-' + os.environ['RANK']), 'w').write("
             "f\"rank {os.environ['RANK']} threads before {before} after {threads()}\")\n"
             "torch.distributed.destroy_process_group = destroy\n")
    script = _patched_main(tmp_path / "teardown.py", patch)
    p = _torchrun([str(script), *_cli(cfg)])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [(tmp_path / f"threads-{r}").read_text() for r in (0, 1) if (tmp_path / f"threads-{r}").is_file()]
    assert sorted(line.split()[1] for line in lines) == ["0", "1"]
    for line in lines:
        before, after = line.split(" threads before ")[1].split(" after ")
        assert "gloo" in before, line  # the check can fail: gloo's threads are there to end
        assert "gloo" not in after, line


def _rank1_at(it: int, line: str) -> str:
    """A _patched_main patch: rank 1 runs `line` when it starts iteration it + 1."""
    return ("real = exit.Trainer.iteration\n"
            "def iteration(self):\n"
            f"    if self.iter == {it} and os.environ['RANK'] == '1':\n"
            f"        {line}\n"
            "    return real(self)\n"
            "exit.Trainer.iteration = iteration\n")


def test_failing_rank_stops_the_others(tmp_path):
    """Rank 1 raises in its second iteration while rank 0 waits for it in a collective: the job ends
    with an error (not a hang), and the error is shown."""
    cfg = tiny_cfg(tmp_path, tasks_per_iter=4, iters=50)
    script = _patched_main(tmp_path / "fail.py", _rank1_at(1, "raise RuntimeError('rank 1 broke on purpose')"))
    p = _torchrun([str(script), *_cli(cfg)], timeout=150)
    assert p.returncode != 0
    assert "rank 1 broke on purpose" in p.stderr + p.stdout  # and no hang: _torchrun's timeout did not fire


def test_a_killed_rank_leaves_the_others_one_line(tmp_path):
    """Rank 1 is killed (-9) in its third iteration, after the checkpoint of iteration 2: rank 0, waiting for it
    in a collective, ends with one line naming itself and what the folder keeps, not gloo's traceback."""
    cfg = tiny_cfg(tmp_path, tasks_per_iter=4, iters=50, ckpt_every=2)
    script = _patched_main(tmp_path / "killed.py", _rank1_at(2, "os.kill(os.getpid(), 9)  # SIGKILL"))
    p = _torchrun([str(script), *_cli(cfg)], timeout=150)
    assert p.returncode != 0
    assert "error (rank 0): another rank stopped" in p.stderr and "ckpt.pt at iteration 2" in p.stderr, p.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["iter"] == 2


def test_world_size_must_divide_the_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"tasks_per_iter \(3\) must be a multiple of the world size \(2\)"):
        runs.prepare(tiny_cfg(tmp_path), quiet=True)


@pytest.mark.parametrize("task", ["exactsum", "tools"])
def test_evaluation_split_in_parts(tmp_path, task, monkeypatch):
    """evaluate_policy(part=(i, n), gather=...): part i runs the chains of the i-th contiguous part of the
    held-out problems with seed + i; the gathered parts are the chains of all problems, in order."""
    tr = runs.prepare(tiny_cfg(tmp_path, task=task), quiet=True)
    text_scores(monkeypatch, task)  # all-zero arrays are equal whatever the seed or the order: a text's score is not
    kw = dict(n_problems=5, K=1, n_samples=2, max_new_tokens=8, seed=3)
    problems = eval_lib.heldout_problems(tr.family, 5)
    parts = {}

    class Gathered(Exception):
        pass

    for i in (0, 1):  # each part's chains, as its process would hand them to gather
        def keep(x, i=i):
            parts[i] = x
            raise Gathered
        with pytest.raises(Gathered):
            eval_lib.evaluate_policy(tr.policy, tr.tok, tr.family, **kw, part=(i, 2), gather=keep)
    whole = eval_lib.evaluate_policy(tr.policy, tr.tok, tr.family, **kw, part=(0, 2), gather=lambda x: [parts[0], parts[1]])
    assert whole["n"] == 10 and whole["settings"]["parts"] == 2
    score = eval_lib.chain_scores  # one protocol for single- and multi-turn families
    for i, mine in enumerate((problems[:2], problems[2:])):
        ref = score(tr.policy, tr.tok, tr.family, mine, 1, 2, 1.0, 8, 3 + i)
        assert np.array_equal(parts[i][0], ref[0])
    chains = np.concatenate([parts[0][0], parts[1][0]], axis=1)  # part 0's columns, then part 1's
    assert 0 < chains.mean() < 1
    assert np.allclose(whole["score"], chains.mean(1))
    # the breakdown by difficulty, by hand: it pairs each column with its problem, so it sees the order
    diffs = np.repeat([p.difficulty for p in problems], 2)
    assert len(set(diffs)) > 1 and whole["by_difficulty"] == {str(d): chains[:, diffs == d].mean(1).tolist() for d in set(diffs)}
    # more processes than problems: a part with no problem runs no chain, and the parts still join
    solo = dict(kw, n_problems=1)
    with pytest.raises(Gathered):  # part 1 of 2 holds the one problem
        eval_lib.evaluate_policy(tr.policy, tr.tok, tr.family, **solo, part=(1, 2), gather=lambda x: keep(x, i=1))
    joined = eval_lib.evaluate_policy(tr.policy, tr.tok, tr.family, **solo, part=(0, 2), gather=lambda x: [x, parts[1]])
    assert joined["n"] == 2 and joined["score"] == parts[1][0].mean(1).tolist()
    alone = eval_lib.evaluate_policy(tr.policy, tr.tok, tr.family, **kw, part=(1, 2))  # no gather: the slice alone
    assert alone["n"] == 6 and alone["score"] == score(tr.policy, tr.tok, tr.family, problems[2:], 1, 2, 1.0, 8, 4)[0].mean(1).tolist()
    assert set(alone["by_difficulty"]) == {str(p.difficulty) for p in problems[2:]}
    one = eval_lib.evaluate_policy(tr.policy, tr.tok, tr.family, **kw)  # one process: unchanged, no "parts"
    assert one["n"] == 10 and "parts" not in one["settings"]
    assert np.array_equal(np.array(one["score"]), score(tr.policy, tr.tok, tr.family, problems, 1, 2, 1.0, 8, 3)[0].mean(1))
