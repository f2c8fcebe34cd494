"""
The policy: a small Llama-family transformer and a batched sampler.

ExIt (METHOD.md) needs three things from the policy in every GRPO iteration, and this file
provides exactly those to exit.py:

  generate()            G completions for each self-iteration prompt, sampled from pi_old,
                        with their log-probs (the denominator of the GRPO ratio, Eq. 5);
                        sample_texts() also decodes them, for the family to score;
  completion_logprobs() log pi_theta of the same completions, with gradients (Eq. 4-5);
  embed()               mean-pooled final hidden states, for the diversity bonus (§4.2).

Prompts are token ids already (tasks.encode_prompt); the sampler takes the tokenizer only for its stop
and pad ids and to decode (tokenizer.py: the toy's byte tokenizer and the interface real ones share). The
same Transformer runs the toy policy (toy_config + tokenizer.byte_tokenizer, 855k parameters, trained from
scratch on CPU) and real Llama / Qwen2 checkpoints (hf.load_hf), so the loop that trains one can train the other.

Contents, top to bottom: config, modules, sampler (KV cache, generate), log-probs and
embeddings, devices, exit's own checkpoints (load_checkpoint, atomic_save). Hugging Face
checkpoints, their tokenizers and chat templates are hf.py's.
"""

import contextlib
import dataclasses
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 512  # token ids covered by the embedding and the output layer
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads; head_dim = n_embd // n_head
    n_kv_head: int = 2  # key/value heads, each shared by n_head // n_kv_head query heads (GQA)
    n_embd: int = 128  # width of the residual stream
    intermediate_size: int = 384  # hidden width of the SwiGLU MLP
    max_seq_len: int = 256  # longest prompt + completion the sampler accepts
    rope_theta: float = 10000.0  # rotary base frequency
    rope_scaling: dict | None = None  # None, or Hugging Face's dict with rope_type "llama3" (Llama 3.1+)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2 has them, Llama does not)
    tie_embeddings: bool = False  # the output layer reuses the token embedding matrix

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def toy_config(vocab_size: int) -> ModelConfig:
    """The toy policy, ModelConfig's defaults: 855k parameters (exit.py's default sizes), fit for 2 CPU cores."""
    return ModelConfig(vocab_size=vocab_size)


# -----------------------------------------------------------------------------
# Modules. Parameter names are Hugging Face's without the leading "model." (see hf._hf_name),
# so reading and writing checkpoints needs no renaming table.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # fp32, cast back before the gain, as HF Llama: logits match transformers to ~1e-6
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies, (head_dim/2,), with Llama 3's scaling when cfg.rope_scaling asks for it."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return inv_freq if cfg.rope_scaling is None else llama3_scaling(inv_freq, cfg)


def llama3_scaling(inv_freq, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's rope scaling of the frequencies (real checkpoints: hf.load_hf)."""
    rope_type = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
    if rope_type != "llama3":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only the default and 'llama3')")
    s = cfg.rope_scaling  # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq, positions):
    """positions (B or 1, T) -> cos, sin (B or 1, 1, T, head_dim) fp32; per call, so rows may differ."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)  # HF's "rotate_half" (pairs i, i + hd/2): HF q/k weights load unpermuted
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, Tk, hd): every cached position so far
        # one query per row (decoding, or a 2-token bucket of _grouped_logprobs): two matmuls beat CPU sdpa
        if T == 1 and cache is not None:
            qg = q.view(B, self.n_kv_head, -1, self.head_dim)  # (B, nkv, nh/nkv, hd): k, v read once
            att = (qg @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, nkv, nh/nkv, Tk)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = (att.softmax(-1) @ v).view(B, self.n_head, 1, self.head_dim)  # (B, nh, 1, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpoint = False  # exit.py --grad_checkpoint: recompute blocks in backward; not config
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # from cfg; fp32 (_apply)
        # nanoGPT init: N(0, 0.02), residual-stream writes scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
            elif not name.endswith("norm.weight"):  # RMSNorm gains stay 1
                nn.init.normal_(p, mean=0.0, std=0.02)

    def _apply(self, fn, recurse=True):
        # .to(), .bfloat16(), ...: keep the rotary frequencies fp32 (bf16: ~1 rad off by position 1000)
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def hidden_states(self, idx, positions=None, mask=None, cache=None):
        """idx (B, T) -> hidden states after the last norm (B, T, n_embd); mask (B, 1, T, Tk) bool, None: causal."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.pos
        if mask is None and T > 1 and start > 0:
            raise ValueError("several new tokens on a non-empty cache need an explicit mask")
        if positions is None:
            if start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            positions = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        x = self.embed_tokens(idx)  # (B, T, C)
        recompute = self.grad_checkpoint and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def forward(self, idx, targets=None, **kwargs):
        """Logits (B, T, vocab) fp32, and the mean loss over targets (B, T) != -100 (else None)."""
        logits = self.lm_head(self.hidden_states(idx, **kwargs)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss


# -----------------------------------------------------------------------------
# Sampler


class KVCache:
    """Keys and values of every layer in two preallocated tensors,
    (n_layer, B, n_kv_head, max_len, head_dim) each; `pos` columns are filled.
    Allocated on the first write, so it takes the dtype the layers produce (bf16 under autocast)."""

    def __init__(self, n_layer: int, batch: int, max_len: int):
        self.n_layer, self.batch, self.max_len, self.pos = n_layer, batch, max_len, 0  # batch: rows at the first write
        self.k = self.v = None

    def update(self, layer, k, v):
        """Write (B, nkv, T, hd) at columns pos..pos+T; return (B, nkv, pos+T, hd). hidden_states advances pos."""
        if self.k is None:
            shape = (self.n_layer, self.batch, k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_rows(self, n: int):
        """Row i becomes rows i*n .. i*n+n-1: one prefilled prompt serves its whole GRPO group."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)

    def keep_rows(self, rows: torch.Tensor):
        """Keep only these rows (a (B,) bool mask or indices), in order: the sampler drops finished ones."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


@dataclass
class Rollouts:
    """Completions of a generate() call, rows group-major (prompt i owns rows i*G .. i*G+G-1)."""
    tokens: torch.Tensor  # (N, T) long, completion tokens, right-padded with pad_id
    lengths: torch.Tensor  # (N,) long, tokens per row, counting the stop token when one was sampled
    logprobs: torch.Tensor  # (N, T) log pi_old, tempered: log_softmax(logits / temperature); 0 past lengths
    mask: torch.Tensor  # (N, T) float, 1 on the first lengths[i] tokens: stopping is credited too
    finished: torch.Tensor  # (N,) bool, True when a stop token ended the row, False when the budget did


def token_logprobs(logits, tokens, temperature=1.0):
    """log_softmax(logits / temperature)[tokens] in fp32: (..., V), (...) -> (...); generate's and the loss's."""
    # fp32 before dividing, on both sides of GRPO's ratio, so they round alike under bf16
    logits = logits.float()
    if temperature not in (0, 1):  # 0: greedy sampling, whose log-probs are the untempered ones
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def sample_next(logits, uniform, temperature=1.0):
    """logits (N, V) -> one token per row (N,), by the draws uniform (N, 1) in [0, 1); temperature 0: argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    # inverse CDF, one uniform per row: torch.multinomial was 10% of the sampler's time on CPU
    cdf = logits.softmax(-1).cumsum(-1)  # (N, V)
    u = uniform * cdf[:, -1:]
    # right=True: zero-probability tokens are never picked (the clamp: u rounded up to the total)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


DROP_FINISHED_AT = 0.25
"""generate() drops finished rows from its batch once they are this fraction of it (> 1: never)"""


def right_align(prompts: list[list[int]], pad_id: int, new_cols: int, device) -> tuple:
    """Prompts right-aligned (left-padded) to (P, L), so all rows write one column: idx, plen, positions, key_ok, mask
    (positions and mask None when no prompt is padded: plain positions, a causal mask)."""
    plen = torch.tensor([len(p) for p in prompts], device=device)
    L = int(plen.max())
    idx = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, L - len(p):] = torch.tensor(p)
    pad = L - plen  # (P,)
    cols = torch.arange(L + new_cols, device=device)
    key_ok = cols[None] >= pad[:, None]
    if not bool((pad > 0).any()):
        return idx.to(device), plen, None, key_ok, None
    positions = (cols[None] - pad[:, None]).clamp(min=0)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # the diagonal keeps a padding query from seeing no key at all (a NaN softmax)
    mask = (causal & key_ok[:, None, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
    return idx.to(device), plen, positions, key_ok, mask


@torch.no_grad()  # not inference_mode: exit.py uses these tensors inside the autograd graph
def generate(model: Transformer, prompts: list[list[int]], num_samples: int, max_new_tokens: int, *,
             temperature: float = 1.0, stop_ids, pad_id: int, generator: torch.Generator | None = None,
             rows: tuple[int, int] | None = None) -> Rollouts:
    """num_samples completions per prompt, N rows group-major; rows=(first, total): a shard of a total-row batch.
    Same generator seed, same rows, however rows are dropped or sharded (uniforms are drawn per original row)."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError("max_new_tokens and num_samples must be >= 1")
    was_training = model.training
    model.eval()
    device = model.inv_freq.device
    P, G, N = len(prompts), num_samples, len(prompts) * num_samples
    first, total_rows = rows or (0, N)
    idx, plen, positions, key_ok, mask = right_align(prompts, pad_id, max_new_tokens, device)
    L = idx.shape[1]
    total = L + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}")
    ragged = mask is not None  # prompts of unequal lengths: explicit positions and key masks

    cache = KVCache(model.config.n_layer, P, total)
    with autocast(device):
        h = model.hidden_states(idx, positions=positions[:, :L] if ragged else None, mask=mask, cache=cache)
        logits = model.lm_head(h[:, -1]).float()  # (P, V)
    cache.repeat_rows(G)
    logits = logits.repeat_interleave(G, dim=0)  # (N, V)
    if ragged:
        positions, key_ok = positions.repeat_interleave(G, 0), key_ok.repeat_interleave(G, 0)

    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((N, max_new_tokens), device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    live = torch.arange(N, device=device)  # the original row of each batch row (finished rows get dropped)
    fin = torch.zeros(N, dtype=torch.bool, device=device)  # batch rows that finished, not yet dropped
    for t in range(max_new_tokens):
        # a uniform for every original row, picked by `live`: dropping rows changes no sample
        u = None if temperature == 0 else torch.rand(total_rows, 1, generator=generator, device=device)[first + live]
        nxt = sample_next(logits, u, temperature).masked_fill(fin, pad_id)  # (B,), B = len(live)
        tokens[live, t] = nxt
        # under the distribution sampled (logits / T): Eq. 4's gradient is the tempered policy's, as in TRL
        logprobs[live, t] = token_logprobs(logits, nxt, temperature).masked_fill(fin, 0.0)
        lengths[live] += ~fin  # before updating fin: the stop token counts
        fin |= torch.isin(nxt, stop)
        done[live] = fin
        if t == max_new_tokens - 1 or bool(fin.all()):
            break
        if int(fin.sum()) >= DROP_FINISHED_AT * len(live):  # enough of the batch has finished: drop those rows
            keep = ~fin
            live, nxt, fin = live[keep], nxt[keep], fin[keep]
            cache.keep_rows(keep)
            if ragged:
                positions, key_ok = positions[keep], key_ok[keep]
        c = L + t  # the cache column this token goes to
        with autocast(device):
            h = model.hidden_states(nxt[:, None], positions=positions[:, c:c + 1] if ragged else None,
                                    mask=key_ok[:, None, None, :c + 1] if ragged else None, cache=cache)
            logits = model.lm_head(h[:, -1]).float()  # (B, V)
    model.train(was_training)

    T = t + 1
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
    return Rollouts(tokens=tokens[:, :T], lengths=lengths, logprobs=logprobs[:, :T], mask=mask, finished=done)


def sample_texts(policy: Transformer, tok, prompts: list[list[int]], num_samples: int, max_new_tokens: int, *,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 rows: tuple[int, int] | None = None) -> tuple[Rollouts, list[str]]:
    """generate() with tok's stop and pad ids, and each row decoded without its stop token."""
    ro = generate(policy, prompts, num_samples, max_new_tokens, temperature=temperature,
                  stop_ids=tok.stop_ids, pad_id=tok.pad_id, generator=generator, rows=rows)
    return ro, [tok.decode(ro.tokens[r, :ro.lengths[r]].tolist()) for r in range(len(ro.lengths))]


# -----------------------------------------------------------------------------
# Log-probs and embeddings of given sequences


def completion_logprobs(model: Transformer, prompts: list[list[int]], completions: torch.Tensor,
                        lengths: torch.Tensor, prompt_repeat: int = 1, temperature: float = 1.0) -> torch.Tensor:
    """Tempered log pi_theta (N, T), with gradients, of completions[i] after prompts[i // prompt_repeat]."""
    N, T = completions.shape
    if len(prompts) * prompt_repeat != N:
        raise ValueError(f"{len(prompts)} prompts x {prompt_repeat} != {N} completions")
    device = model.inv_freq.device
    completions, lengths = completions.to(device), lengths.to(device)
    with autocast(device):
        # grad_checkpoint recomputes blocks of a plain causal forward; keep that path for it
        if prompt_repeat > 1 and not (model.grad_checkpoint and torch.is_grad_enabled()):
            logp = _grouped_logprobs(model, prompts, completions, lengths, prompt_repeat, temperature)
        else:
            h = _flat_hidden(model, prompts, completions, prompt_repeat)  # (N, T, C)
            logp = token_logprobs(model.lm_head(h), completions, temperature)
    inside = torch.arange(T, device=device)[None] < lengths[:, None]
    return logp.masked_fill(~inside, 0.0)


def _flat_hidden(model, prompts, completions, prompt_repeat):
    """Hidden states that predict each completion token, (N, T, C): every row is its whole
    prompt + completion, right-padded, in one causal forward (the padding after a row's tokens
    cannot change them, so no mask is needed)."""
    N, T = completions.shape
    device = completions.device
    plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(prompt_repeat)  # (N,)
    idx = torch.zeros((N, int(plen.max()) + T), dtype=torch.long)
    for i, p in enumerate(prompts):  # built on the CPU, moved once
        idx[i * prompt_repeat:(i + 1) * prompt_repeat, :len(p)] = torch.tensor(p)
    idx, plen = idx.to(device), plen.to(device)
    cols = plen[:, None] + torch.arange(T, device=device)  # (N, T): column of completion token j
    idx.scatter_(1, cols, completions)
    h = model.hidden_states(idx)  # (N, S, C)
    # the token at column c is predicted from column c - 1
    return h.gather(1, (cols - 1)[..., None].expand(-1, -1, h.shape[-1]))  # (N, T, C)


class GroupPromptCache:
    """The KVCache interface for a training forward in two passes: the prompts (rows None), then completion
    rows (rows[i]: the prompt of row i) attending to their prompt's keys and values. Nothing is written in
    place, so the gradients of a group's G completions flow back into one prompt forward."""

    def __init__(self):
        self.k, self.v, self.pos, self.rows = [], [], 0, None

    def update(self, layer, k, v):
        if self.rows is None:  # the prompts: (P, nkv, L, hd)
            self.k.append(k)
            self.v.append(v)
            return k, v
        # completion rows: (n, nkv, L + t, hd), their prompt's columns first (index_select, not [rows]: METHOD.md)
        return (torch.cat([self.k[layer].index_select(0, self.rows), k], dim=2),
                torch.cat([self.v[layer].index_select(0, self.rows), v], dim=2))


LENGTH_BUCKETS = 4
"""_grouped_logprobs runs the rows, sorted by length, in at most this many forwards (fewer: more padding)"""


def _grouped_logprobs(model, prompts, completions, lengths, G, temperature):
    """_flat_hidden + token_logprobs, (N, T): each prompt run once, rows by length in <= LENGTH_BUCKETS forwards."""
    N, T = completions.shape
    device = completions.device
    idx, plen, positions, key_ok, mask = right_align(prompts, 0, 0, device)  # as in generate
    L = idx.shape[1]
    cache = GroupPromptCache()
    last = model.hidden_states(idx, positions=positions, mask=mask, cache=cache)[:, -1]  # (P, C): predicts token 0

    order = lengths.argsort(stable=True)  # rows by length, shortest first
    pieces = []
    for rows in order.chunk(min(LENGTH_BUCKETS, N)):
        t = max(1, int(lengths[rows].max()))  # this bucket's longest row
        prompt = rows // G  # (n,) the prompt of each row
        h = last.index_select(0, prompt)[:, None]  # (n, 1, C)
        if t > 1:
            cache.rows = prompt  # tokens 0..t-2 (j predicts j+1), each seeing its prompt and its row so far
            positions = plen[prompt][:, None] + torch.arange(t - 1, device=device)  # (n, t-1)
            causal = torch.ones(t - 1, t - 1, dtype=torch.bool, device=device).tril()
            mask = torch.cat([key_ok[prompt][:, None, None, :].expand(-1, 1, t - 1, L),
                              causal.expand(len(rows), 1, t - 1, t - 1)], dim=-1)  # (n, 1, t-1, L+t-1)
            h_new = model.hidden_states(completions[rows, :t - 1], positions=positions, mask=mask, cache=cache)
            h = torch.cat([h, h_new], dim=1)  # (n, t, C)
        logp = token_logprobs(model.lm_head(h), completions[rows, :t], temperature)  # (n, t)
        pieces.append(F.pad(logp, (0, T - t)))  # zeros past the bucket's length
    return torch.cat(pieces)[order.argsort()]  # back to the callers' row order, (N, T)


def right_pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Sequences one per row, right-padded to the longest: (N, T); causal attention hides the padding."""
    idx = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    return idx


def pack(seqs: list[list[int]], pad_id: int):
    """Sequences packed several to a row, as few rows as the longest sequence needs (first-fit
    decreasing), for a forward in which no token sees another sequence: each sequence gets its own
    rotary positions from 0 and its own causal block of the attention mask. Padding attends only to
    itself (no empty softmax row). Padded one per row, the warm start's demonstrations are 44%
    padding and the Eq. 6 solutions 56%; packed, the same forward runs on far fewer positions. Used
    by the warm start under --warm_pack (base.sft_batch); embed pads, to keep published runs exact.
    Returns idx (R, W), positions (R, W), mask (R, 1, W, W), and where: (row, start) of each sequence."""
    W = max(len(s) for s in seqs)
    used, where = [], [None] * len(seqs)  # tokens filled in each row; (row, start) of each sequence
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        r = next((r for r, u in enumerate(used) if u + len(seqs[i]) <= W), len(used))  # the first row it fits
        if r == len(used):
            used.append(0)
        where[i] = (r, used[r])
        used[r] += len(seqs[i])
    R = len(used)
    idx = torch.full((R, W), pad_id, dtype=torch.long)
    positions = torch.zeros((R, W), dtype=torch.long)
    segment = torch.full((R, W), -1, dtype=torch.long)  # which sequence; -1 = padding
    for i, (r, at) in enumerate(where):
        n = len(seqs[i])
        idx[r, at:at + n] = torch.tensor(seqs[i])
        positions[r, at:at + n] = torch.arange(n)
        segment[r, at:at + n] = i
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) & causal
    return idx, positions, (mask | torch.eye(W, dtype=torch.bool))[:, None], where


@torch.no_grad()  # the diversity coefficients scale advantages, which carry no gradient
def embed(model: Transformer, seqs: list[list[int]]) -> torch.Tensor:
    """Mean final hidden state per sequence, (N, n_embd) fp32, for the diversity bonus (§4.2); padded, not packed."""
    if min(len(s) for s in seqs) == 0:
        raise ValueError("embed needs non-empty sequences")
    device = model.inv_freq.device
    lens = torch.tensor([len(s) for s in seqs], device=device)
    idx = right_pad(seqs, pad_id=0).to(device)
    with autocast(device):
        h = model.hidden_states(idx).float()  # (N, S, C); right padding is causally invisible
    real = (torch.arange(idx.shape[1], device=device)[None] < lens[:, None]).float()  # (N, S)
    return (h * real[..., None]).sum(1) / lens[:, None]


# -----------------------------------------------------------------------------
# Devices


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda, else mps, else cpu; any other name must be usable now, else a ValueError says why."""
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def check_device(name: str) -> torch.device:
    """A device name this torch can use now, or a ValueError that says why not."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name: auto | cpu | cuda | cuda:N | mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch sees no CUDA device (torch.cuda.is_available() is "
                         "False); use --device=cpu or --device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device=cpu or --device=auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported: auto | cpu | cuda | cuda:N | mps")
    return dev


def autocast(device):
    """bf16 autocast on CUDA (weights stay fp32); plain fp32 elsewhere, where bf16 is slow or unreliable."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# exit's own checkpoints: the weights, their config and how to rebuild the tokenizer, in one file that
# needs nothing else (a run's ckpt.pt, a warm-started base), written atomically.


def policy_state(policy, tokenizer_spec) -> dict:
    return dict(model_config=dataclasses.asdict(policy.config), tokenizer=tokenizer_spec,
                model={k: v.detach().cpu() for k, v in policy.state_dict().items()})


def policy_from_state(state: dict, device, build_tokenizer, where: str = "a checkpoint"):
    """(policy, tokenizer) of a checkpoint's "policy" entry; build_tokenizer(spec) rebuilds its tokenizer
    (hf.build_tokenizer: the toy's from its markers, a real checkpoint's from the files it keeps)."""
    try:
        policy = Transformer(ModelConfig(**state["model_config"]))
        policy.load_state_dict(state["model"])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:  # another model's or version's weights
        raise ValueError(f"{where}: its policy does not build ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return policy.to(device), build_tokenizer(state["tokenizer"])


def atomic_save(obj, path: str, write=None):
    """torch.save(obj, f), or write(obj, f), to a temporary file, fsync, rename: a crash never leaves half a file
    (a checkpoint, eval.json, a log). A write the machine refuses (disk full, read-only) is an OSError naming the path."""
    tmp = f"{path}.tmp{os.getpid()}@{socket.gethostname()}"  # the host: a folder may be shared by machines
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch's writer reports a full disk as a RuntimeError
            raise OSError(f"could not write {path} ({getattr(e, 'strerror', None) or e})") from None
        raise


def load_checkpoint(path: str) -> dict:
    """A checkpoint, or a clear error: missing, truncated/corrupt, or not one of ours."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, pickle errors
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    policy = ckpt.get("policy") if isinstance(ckpt, dict) else None
    if not (isinstance(policy, dict) and isinstance(policy.get("model_config"), dict) and isinstance(policy.get("model"), dict)):
        raise ValueError(f"{path} is not an exit checkpoint (no 'policy' entry with a model and its config)")
    return ckpt
