"""
Sampler and training-step throughput of the toy policy, against transformers' generate.

Sampling G completions per task is the bottleneck of every GRPO iteration in exit.py, so
model.generate() must be fast. This script times it against `transformers` generate on the same
weights (our model written with model.save_hf, read back with AutoModelForCausalLM), the same
batch and the same number of new tokens, with no early stop on either side; then one GRPO-like
training step (forward + backward of model.completion_logprobs) on that batch.

    python bench.py                       # 16 prompts x 8 samples, 64-token prompts, 48 new tokens
    python bench.py --prompts 4 --samples 4 --repeats 3
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network: the weights are local

import torch

import model


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, repeats):
    fn()  # warm-up: first calls allocate and pick kernels
    return statistics.median(timed(fn) for _ in range(repeats))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts (tasks) per batch")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (GRPO group size G)")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per completion")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 leaves torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    torch.manual_seed(args.seed)
    tok = model.byte_tokenizer(["<|request|>", "<|answer|>", "<|feedback|>", "<|improve|>", "<|diverge|>"])
    cfg = model.toy_config(tok.vocab_size)
    ours = model.Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_hf(ours, None, d)  # no tokenizer: no eos id in the config, so HF never stops early
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
    P, G, L, T = args.prompts, args.samples, args.prompt_len, args.new_tokens
    prompts = torch.randint(0, 256, (P, L)).tolist()  # byte tokens, all the same length
    rows = P * G
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; toy model "
          f"{sum(q.numel() for q in ours.parameters()) / 1e6:.2f}M params; batch {P} prompts x {G} samples "
          f"= {rows} rows, prompt {L} tokens, {T} new tokens, median of {args.repeats}")

    gen = torch.Generator().manual_seed(args.seed)

    def run_ours():
        out = model.generate(ours, prompts, G, T, temperature=1.0, stop_ids=(), pad_id=tok.pad_id, generator=gen)
        assert out.tokens.shape == (rows, T)

    ids = torch.tensor(prompts)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, num_return_sequences=G, max_new_tokens=T,
                              min_new_tokens=T, pad_token_id=tok.pad_id)
        assert out.shape == (rows, L + T)

    # alternate the two so that both see the same machine load (a shared machine's load moves)
    run_ours(), run_hf()
    pairs = [(timed(run_ours), timed(run_hf)) for _ in range(args.repeats)]
    t_ours = statistics.median(o for o, _ in pairs)
    t_hf = statistics.median(h for _, h in pairs)
    print(f"sampler  ours        : {t_ours * 1e3:8.1f} ms  {rows * T / t_ours:9.0f} tokens/s")
    print(f"sampler  transformers: {t_hf * 1e3:8.1f} ms  {rows * T / t_hf:9.0f} tokens/s")
    print(f"sampler  speed-up    : {statistics.median(h / o for o, h in pairs):.2f}x (median of per-run ratios)")

    out = model.generate(ours, prompts, G, T, stop_ids=(), pad_id=tok.pad_id, generator=gen)
    ours.train()

    def train_step():
        logp = model.completion_logprobs(ours, prompts, out.tokens, out.lengths, prompt_repeat=G)
        loss = -(logp * out.mask).sum() / out.mask.sum()
        loss.backward()
        ours.zero_grad(set_to_none=True)

    t_train = median_time(train_step, args.repeats)
    print(f"train step (fwd+bwd) : {t_train * 1e3:8.1f} ms  {rows * T / t_train:9.0f} completion tokens/s, "
          f"{rows * (L + T) / t_train:9.0f} tokens/s incl. prompts")


if __name__ == "__main__":
    main()
