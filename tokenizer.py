"""
Tokenizers: text <-> token ids, one small interface and three backends, so the loop never asks which.

  byte_tokenizer(markers)  the toy policy's: the 256 bytes, then a few special strings (the prompt
                           markers of tasks.MARKERS, begin/end of text, padding), built with tiktoken
                           from ranks in memory (never downloaded)
  Llama 3 tokenizer.model  a tiktoken BPE file ("base64token rank" lines) in a checkpoint (hf.py)
  anything else            the checkpoint's own tokenizer through transformers.AutoTokenizer (hf.py)

The policy (model.py) and the prompts (tasks.py) take a tokenizer as an argument and import nothing of
this file. A checkpoint stores how to rebuild its tokenizer (base.TOY_TOKENIZER: {"kind": "byte",
"markers": [...]}), not the object; hf.build_tokenizer rebuilds it.
"""

import tiktoken
import torch

# Conventions, the same for all three backends:
#   encode(text, special=False): special strings in the text are plain text, so user or model
#       text can never smuggle in a control token; special=True turns them into their ids.
#   decode(ids, special=False): pad ids are always dropped; other special ids are dropped too,
#       unless special=True renders them as their strings. So decode(encode(s)) == s, and a
#       completion decodes without its stop token.


class Tokenizer:
    bos_id: int | None  # None when the tokenizer has none (Qwen2)
    eos_id: int
    pad_id: int
    stop_ids: set[int]  # any of them ends a completion: eos, plus end-of-turn ids of chat models
    vocab_size: int

    def encode(self, text: str, special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, special: bool = False) -> str:
        raise NotImplementedError

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """A plain rendering for tokenizers without a chat format: "role: content" lines."""
        ids = [] if self.bos_id is None else [self.bos_id]
        for m in messages:
            ids += self.encode(f"{m['role']}: {m['content']}\n")
        if add_generation_prompt:
            ids += self.encode("assistant: ")
        return ids

    def save(self, path: str):
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        """False: render_chat falls back to plain "role: content" lines."""
        return False


BYTE_PAT = r"\S+|\s+"  # with only single-byte ranks the split changes nothing but speed


class TiktokenTokenizer(Tokenizer):
    """Backend 1 (and 2, hf.Llama3Tokenizer): a tiktoken.Encoding built from ranks in memory (never downloaded).
    Its files (tokenizer.model, tokenizer_config.json): hf.save_tokenizer."""

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], pat_str: str,
                 bos: str, eos: str, pad: str, stops=(), name="exit"):
        self.enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.ranks, self.specials, self.pat_str = ranks, specials, pat_str
        self.special_ids = set(specials.values())
        self.bos_id, self.eos_id, self.pad_id = specials[bos], specials[eos], specials[pad]
        self.stop_ids = {self.eos_id} | {specials[s] for s in stops if s in specials}
        self.vocab_size = self.enc.n_vocab

    def encode(self, text, special=False):
        return self.enc.encode(text, allowed_special="all" if special else set(), disallowed_special=())

    def decode(self, ids, special=False):
        if torch.is_tensor(ids):
            ids = ids.tolist()
        drop = {self.pad_id} if special else self.special_ids
        return self.enc.decode([i for i in ids if i not in drop])


def byte_tokenizer(markers: list[str] = ()) -> TiktokenTokenizer:
    """The toy's tokenizer: ids 0-255 are bytes, then <|bos|>, <|eos|>, <|pad|> and the markers, as specials."""
    names = list(dict.fromkeys(["<|bos|>", "<|eos|>", "<|pad|>", *markers]))
    if any(not m for m in names):
        raise ValueError("marker strings must be non-empty")
    return TiktokenTokenizer(ranks={bytes([i]): i for i in range(256)},
                             specials={s: 256 + j for j, s in enumerate(names)}, pat_str=BYTE_PAT,
                             bos="<|bos|>", eos="<|eos|>", pad="<|pad|>", name="exit-bytes")
