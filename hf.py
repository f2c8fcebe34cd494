"""
Hugging Face checkpoints and real tokenizers: what `--init=HF_DIR` (a Llama or Qwen2 instruct model) and
a run's export (`python hf.py RUN` writes RUN/hf) need, beyond the toy. A local directory (config.json + safetensors +
tokenizer) loads as model.Transformer (`load_hf`) and a policy saves as one (`save_hf`) that
`transformers` reads back with the same logits. Tokenizers: a Llama 3 `tokenizer.model` (tiktoken
ranks), else the checkpoint's own through transformers.AutoTokenizer, with its chat template.
Nothing is ever downloaded. Also the JSON files the optional modules share: `read_json` (an error
that names the file), `write_json` (written whole or not at all). Builds on model.py and tokenizer.py; the core never
imports this file.
"""

import base64
import dataclasses
import json
import math
import os
import tempfile
import warnings

import torch

import model as model_lib
import tokenizer as tokenizer_lib


LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# Meta's Llama 3.1 special tokens, numbered from len(ranks), for a tokenizer.model without a
# tokenizer_config.json beside it
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


CHAT_DATE = "26 Jul 2024"  # the date chat templates that print one (Llama 3.x) show: fixed, not today's


END_OF_TURN = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")


def read_json(path: str) -> dict:
    """A JSON file's object, or a ValueError that names the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, got a {type(obj).__name__}")
    return obj


def write_text(text: str, path: str):
    """Written whole or not at all (model.atomic_save), so an interrupted write never leaves half an eval.json or log."""
    model_lib.atomic_save(text.encode(), path, write=lambda data, f: f.write(data))


def write_json(obj, path: str):
    write_text(json.dumps(obj, indent=2), path)


def check_writable(folder: str, flag: str):
    """folder exists or can be made, and this process can write into it; else a ValueError naming flag, before any work."""
    probe = os.path.join(folder, f".write-test{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag}={folder}: cannot write there ({e.strerror or e})") from None


def load_weights(model: model_lib.Transformer, path: str) -> model_lib.Transformer:
    """model.safetensors of a Hugging Face directory that hf.save_hf wrote for this architecture (a shipped
    base: bases/TASK), loaded into model; HF names are ours under "model."."""
    from safetensors.torch import load_file
    state = load_file(os.path.join(path, "model.safetensors"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model


class Llama3Tokenizer(tokenizer_lib.TiktokenTokenizer):
    """Backend 2: a Llama 3 tokenizer.model (tiktoken ranks), with Meta's chat format."""

    @property
    def has_chat_template(self):
        return True

    def render_chat(self, messages, add_generation_prompt=True):
        # Meta's Llama 3 format: a header per turn, content as plain text, <|eot_id|> after it
        def header(role):
            return self.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n", special=True)
        ids = [self.bos_id]
        for m in messages:
            ids += header(m["role"]) + self.encode(m["content"].strip()) + [self.specials["<|eot_id|>"]]
        if add_generation_prompt:
            ids += header("assistant")
        return ids


def save_tokenizer(tok: tokenizer_lib.Tokenizer, path: str):
    """A tokenizer's files in `path`. A tiktoken one (the toy's, a Llama 3 tokenizer.model): tokenizer.model
    (Llama 3's format) + tokenizer_config.json, which load_tokenizer reads back; any other: its own save."""
    if not isinstance(tok, tokenizer_lib.TiktokenTokenizer):
        return tok.save(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.model"), "w") as f:
        for piece, rank in sorted(tok.ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(piece).decode()} {rank}\n")
    names = {v: k for k, v in tok.specials.items()}
    config = {
        "added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in tok.specials.items()},
        "bos_token": names[tok.bos_id], "eos_token": names[tok.eos_id], "pad_token": names[tok.pad_id],
        "stop_tokens": sorted(names[i] for i in tok.stop_ids),  # ours, not a transformers field
        "pat_str": tok.pat_str, "chat_format": "llama3" if isinstance(tok, Llama3Tokenizer) else "plain",  # ours too
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


class HFTokenizer(tokenizer_lib.Tokenizer):
    """Backend 3: the checkpoint's own tokenizer, with its chat template, via transformers."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"{path}: transformers could not load the tokenizer ({e})") from None
        t = self.tok
        if t.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer defines no eos token")
        probe = t.encode("improve 0123456789", add_special_tokens=False)  # a class without its vocabulary file loads
        if not probe or t.unk_token_id in probe:  # (LlamaTokenizer with no tokenizer.model: 3 tokens) and encodes to nothing
            raise ValueError(f"{path}: the tokenizer cannot encode plain text ({len(t)} tokens): its vocabulary file "
                             "(tokenizer.model or tokenizer.json) is missing")
        self.bos_id, self.eos_id = t.bos_token_id, t.eos_token_id
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
        vocab = t.get_vocab()
        self.stop_ids = {self.eos_id} | {vocab[s] for s in END_OF_TURN if s in vocab} | _config_eos_ids(path)
        self.vocab_size = len(t)

    def encode(self, text, special=False):
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=not special)

    def decode(self, ids, special=False):
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.tok.decode([i for i in ids if i != self.pad_id], skip_special_tokens=not special)

    @property
    def has_chat_template(self):
        return bool(self.tok.chat_template)

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat template's prompt. Message contents are plain text, as on every other path (the toy's
        compact prompts, the llama3 and plain renderings): a problem or an answer that spells a control
        token ("<|eot_id|>") must not become one. So the template is rendered as text around placeholders;
        its own text is encoded with special tokens, the contents without. Templates that print today's
        date (Llama 3.x) get CHAT_DATE instead, so a prompt, and a resume, is the same on every day."""
        if not self.tok.chat_template:
            return super().render_chat(messages, add_generation_prompt)
        def render(msgs):
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                date_string=CHAT_DATE)
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: in no real text
        text = render([dict(m, content=k) for m, k in zip(messages, marks)])
        parts = []
        for mark in marks:
            before, found, text = text.partition(mark)
            if not found:
                raise ValueError("the chat template does not show every message's content")
            parts.append(before)
        contents = [m["content"] for m in messages]
        full = render(messages)
        if "".join(p + c for p, c in zip(parts, contents)) + text != full:  # e.g. Llama 3's template trims them
            contents = [c.strip() for c in contents]
        ids = []
        for before, content in zip(parts, contents):
            ids += self.encode(before, special=True) + self.encode(content)
        return ids + self.encode(text, special=True)

    def save(self, path):
        self.tok.save_pretrained(path)


def _config_eos_ids(path) -> set[int]:
    """eos_token_id(s) named by config.json / generation_config.json (instruct models list their
    end-of-turn ids there)."""
    ids = set()
    for name in ("config.json", "generation_config.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            eos = read_json(f).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def _read_tiktoken_ranks(file) -> dict[bytes, int] | None:
    """Llama 3's tokenizer.model: "base64token rank" per line. None if the file is not in that
    format (Llama 2 and others keep a binary sentencepiece model under the same name)."""
    if not os.path.isfile(file):
        return None
    ranks = {}
    try:
        with open(file, "rb") as f:
            for line in f:
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (ValueError, UnicodeDecodeError):
        return None
    return ranks or None


def load_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
    """The tokenizer of a checkpoint directory: a Llama 3 style tokenizer.model through tiktoken
    when there is one, otherwise transformers' AutoTokenizer (local files only)."""
    ranks = _read_tiktoken_ranks(os.path.join(path, "tokenizer.model"))
    if ranks is not None:
        return _tiktoken_from_dir(path, ranks)
    if not _has_tokenizer_files(path):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.model, tokenizer.json, tokenizer_config.json)")
    return HFTokenizer(path)


def _has_tokenizer_files(path):
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def _tiktoken_from_dir(path, ranks) -> tokenizer_lib.TiktokenTokenizer:
    config = {}
    f = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(f):
        config = read_json(f)
    added = config.get("added_tokens_decoder")
    if added:
        specials = {t["content"]: int(i) for i, t in added.items()}
    else:
        specials = {s: len(ranks) + j for j, s in enumerate(LLAMA3_SPECIALS)}

    def name(key, default):
        v = config.get(key) or default
        return v["content"] if isinstance(v, dict) else v

    bos = name("bos_token", "<|begin_of_text|>")
    eos = name("eos_token", "<|end_of_text|>")
    pad = name("pad_token", "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in specials else eos)
    for s in (bos, eos, pad):
        if s not in specials:
            raise ValueError(f"{path}: special token {s!r} is not among the tokenizer's special tokens")
    names = {i: s for s, i in specials.items()}
    stops = [*config.get("stop_tokens", END_OF_TURN), *(names[i] for i in _config_eos_ids(path) if i in names)]
    chat = config.get("chat_format", "llama3" if "<|start_header_id|>" in specials else "plain")
    cls = Llama3Tokenizer if chat == "llama3" else tokenizer_lib.TiktokenTokenizer
    return cls(ranks, specials, config.get("pat_str", LLAMA3_PAT), bos, eos, pad, stops,
               name=os.path.basename(os.path.normpath(path)) or "checkpoint")


SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's: HF nests everything but lm_head under "model."."""
    return name if name.startswith("lm_head") else "model." + name


HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_dtype(hf: dict) -> torch.dtype | None:
    """The dtype a Hugging Face config.json says its weights are stored in (None if it does not say)."""
    return HF_DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"))


def config_from_hf(hf: dict, where: str = "config.json") -> model_lib.ModelConfig:
    """Translate a Llama / Qwen2 config.json (a dict) into model.ModelConfig, or say what is unsupported."""
    family = hf.get("model_type")
    if family not in SUPPORTED:
        raise ValueError(f"{where}: model_type {family!r} is not supported; load_hf reads the Llama "
                         f"('llama', including Llama 3.x rope scaling) and Qwen2 ('qwen2') families")

    def need(key):
        if key not in hf:
            raise ValueError(f"{where}: missing {key!r}")
        return hf[key]

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    # transformers 5 writes "rope_parameters" (theta inside); older files "rope_theta" + "rope_scaling"
    params = hf.get("rope_parameters") or {}
    rope = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (only the default and 'llama3')")
    cfg = model_lib.ModelConfig(
        vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"), n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
        intermediate_size=need("intermediate_size"), max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta, rope_scaling=rope if rope_type == "llama3" else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    check_shape(cfg, where)
    unsupported = [k for k in ("attention_bias", "mlp_bias", "use_sliding_window") if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    if hf.get("head_dim") not in (None, cfg.head_dim):
        unsupported.append(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads")
    if unsupported:
        raise ValueError(f"{where}: unsupported options {unsupported}")
    return dataclasses.replace(cfg, rope_theta=float(cfg.rope_theta))


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_shape(cfg: model_lib.ModelConfig, where: str):
    """The values a Transformer is built from, of the right types and consistent, or a ValueError naming them
    (not a TypeError, KeyError or assertion from inside the model, mid-run)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    bad = [f"{k}={getattr(cfg, k)!r}" for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                                                 "intermediate_size", "max_seq_len")
           if type(getattr(cfg, k)) is not int or getattr(cfg, k) < 1]
    bad += [f"{k}={getattr(cfg, k)!r}" for k in ("rope_theta", "norm_eps") if not number(getattr(cfg, k))]
    if cfg.rope_scaling is not None:
        bad += [f"rope_scaling.{k}={cfg.rope_scaling.get(k)!r}" for k in LLAMA3_ROPE if not number(cfg.rope_scaling.get(k))]
    if not bad and (cfg.n_embd % cfg.n_head or cfg.head_dim % 2 or cfg.n_head % cfg.n_kv_head):
        bad.append(f"hidden_size {cfg.n_embd}, num_attention_heads {cfg.n_head}, num_key_value_heads {cfg.n_kv_head} (the "
                   "heads must divide the width with an even quotient, and the key/value heads the heads)")
    if bad:
        raise ValueError(f"{where}: values this model cannot be built from: {', '.join(bad)}")


def _read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a single or sharded (model.safetensors.index.json) checkpoint."""
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors checkpoints are read)")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: listed in model.safetensors.index.json but missing")
        try:
            tensors.update(load_file(file))
        except Exception as e:  # truncated or corrupt: safetensors' own error names no file
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


def load_hf(path: str, device=None, dtype=None) -> tuple[model_lib.Transformer, tokenizer_lib.Tokenizer | None]:
    """A local Hugging Face checkpoint directory (config.json + safetensors) of the Llama or Qwen2
    family as model.Transformer, with its tokenizer (None if the directory has no tokenizer files).
    device None picks one (model.pick_device); dtype None keeps fp32 weights (autocast gives bf16
    compute on GPU while the optimizer keeps fp32 masters)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file}: not found; load_hf needs a Hugging Face checkpoint directory")
    cfg = config_from_hf(read_json(config_file), where=config_file)
    tensors = _read_safetensors(path)
    lm, emb = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if cfg.tie_embeddings and lm is not None and emb is not None and not torch.equal(lm, emb):
        # as transformers (5.x) loads it: a stored output layer that differs from the embedding is kept, untied
        warnings.warn(f"{config_file} says tie_word_embeddings, but {path} stores an lm_head.weight that differs from "
                      "the embedding: loaded untied, with that lm_head, as transformers does")
        cfg = dataclasses.replace(cfg, tie_embeddings=False)

    model = model_lib.Transformer(cfg)
    state, missing = {}, []
    for name, p in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # shares embed_tokens.weight; some tied checkpoints still store a copy
        t = tensors.pop(_hf_name(name), None)
        if t is None:
            missing.append(_hf_name(name))
        elif t.shape != p.shape:
            raise ValueError(f"{path}: tensor {_hf_name(name)} has shape {tuple(t.shape)}, "
                             f"config.json implies {tuple(p.shape)}")
        else:
            state[name] = t
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    extra = [k for k in tensors if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"]
    if extra:
        raise ValueError(f"{path}: checkpoint has {len(extra)} tensor(s) this model does not, e.g. {extra[:3]}")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state)
    model.to(device=model_lib.pick_device() if device is None else device, dtype=dtype or torch.float32)
    tokenizer = load_tokenizer(path) if _has_tokenizer_files(path) else None
    return model, tokenizer


def save_hf(model: model_lib.Transformer, tokenizer: tokenizer_lib.Tokenizer | None, path: str,
            dtype: torch.dtype | None = None,
            temperature: float | None = None):
    """A Hugging Face directory that load_hf and transformers read back with the same logits (Llama, or Qwen2)."""
    from safetensors.torch import save_file
    cfg = model.config
    dtype = dtype or model.lm_head.weight.dtype
    family = "qwen2" if cfg.qkv_bias else "llama"
    hf = {
        "architectures": [SUPPORTED[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,  # 4.x names, which 5.x reads too
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family == "llama":
        hf |= {"attention_bias": False, "mlp_bias": False}
    else:
        hf |= {"use_sliding_window": False, "sliding_window": None}
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {cfg.vocab_size}")
        # every stop id (a chat model's end-of-turn too), so transformers' generate stops where ours does
        eos = [tokenizer.eos_id] + sorted(tokenizer.stop_ids - {tokenizer.eos_id})
        hf |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
               "pad_token_id": tokenizer.pad_id}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    if temperature is not None:
        gen |= dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    tensors = {_hf_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
               if not (cfg.tie_embeddings and k == "lm_head.weight")}  # safetensors refuses shared memory
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)


def tokenizer_spec(tok) -> dict:
    """How a checkpoint rebuilds a real checkpoint's tokenizer: its files (save_tokenizer), kept inside the
    checkpoint so that a run folder needs nothing else, and its stop ids (some come from the model's
    config.json, which is not a tokenizer file)."""
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer(tok, d)
        files = {}
        for name in sorted(os.listdir(d)):
            if os.path.isfile(os.path.join(d, name)):
                with open(os.path.join(d, name), "rb") as f:
                    files[name] = f.read()
    return dict(kind="files", files=files, stop_ids=sorted(tok.stop_ids))


def build_tokenizer(spec: dict):
    if spec["kind"] == "byte":  # the toy policy's: rebuilt from its marker list alone
        return tokenizer_lib.byte_tokenizer(spec["markers"])
    if spec["kind"] == "files":
        with tempfile.TemporaryDirectory() as d:
            for name, data in spec["files"].items():
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
            tok = load_tokenizer(d)  # read into memory: the folder may go
        tok.stop_ids = set(spec["stop_ids"])
        return tok
    raise ValueError(f"unknown tokenizer kind {spec['kind']!r}")


def load_policy(path: str, device) -> tuple:
    """(policy, tokenizer, tokenizer spec) from an exit checkpoint file or a local Hugging Face directory."""
    if os.path.isdir(path):
        policy, tok = load_hf(path, device=device)
        if tok is None:
            raise ValueError(f"{path}: no tokenizer files; --init needs a checkpoint with its tokenizer")
        return policy, tok, tokenizer_spec(tok)
    state = model_lib.load_checkpoint(path)["policy"]
    return (*model_lib.policy_from_state(state, device, build_tokenizer, path), state["tokenizer"])


def export(run: str, out: str | None = None) -> str:
    """`python hf.py RUN`: a run's trained policy (RUN/ckpt.pt, or any exit checkpoint file X.pt) as a Hugging
    Face directory (default RUN/hf, or X.hf beside a loose file) for transformers, vLLM or --init, in the
    dtype it trained in; a run from a Hugging Face --init keeps that checkpoint's (a bf16 source stays bf16)."""
    ck_file = os.path.join(run, "ckpt.pt") if os.path.isdir(run) else run
    ck = model_lib.load_checkpoint(ck_file)
    policy, tok = model_lib.policy_from_state(ck["policy"], "cpu", build_tokenizer, ck_file)
    cfg = ck.get("config") or {}
    source = os.path.join(cfg["init"], "config.json") if cfg.get("init") else ""  # an --init directory's
    dtype = (hf_dtype(read_json(source)) if os.path.isfile(source) else None) \
        or next(iter(ck["policy"]["model"].values())).dtype  # else as stored: a --dtype=bf16 run's bf16
    if out is None:
        own = os.path.basename(ck_file) == "ckpt.pt"  # a run's: its folder's hf/; a loose file's: its own
        out = os.path.join(os.path.dirname(os.path.abspath(ck_file)), "hf") if own else os.path.splitext(ck_file)[0] + ".hf"
    save_hf(policy, tok, out, dtype=dtype, temperature=cfg.get("eval_temperature"))
    return out


if __name__ == "__main__":
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python hf.py", description="Export a run's trained policy as a Hugging Face "
                                "directory (config.json, model.safetensors, tokenizer, generation_config.json).")
    p.add_argument("run", metavar="RUN", help="a run folder (exit.py --out_dir) or an exit checkpoint file")
    p.add_argument("--out", metavar="DIR", help="where to write it (default: RUN/hf, or X.hf beside a file X.pt)")
    args = p.parse_args()
    try:
        if args.out == "":  # names no folder: refused before the checkpoint loads, not when writing to it
            raise ValueError("--out is empty: give a folder, or leave it out for the default")
        print(f"Hugging Face directory: {export(args.run, args.out)}")  # a live run's: its last checkpoint (atomic)
    except (ValueError, OSError) as e:  # OSError: a folder that cannot be written (FileExistsError, a full disk)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
