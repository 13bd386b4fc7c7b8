"""Write a small LLaMA-architecture GGUF (v3) with random weights and a SentencePiece-style vocabulary.

The file loads in llama-cpp-python 0.3.x and in ctransformers 0.2.27 (model_type="llama"), so the two
engines (and servers built on them) can be compared on one file. Uses the `gguf` package from PyPI.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

FTYPES = {"f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
_SPACE = "\u2581"  # SentencePiece's word-boundary marker
_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
          "have an they you were her she there been one all we their has would when if so can will more no "
          "who what out up said about into than them some could time only other new like then do my over "
          "model server token request response stream worker engine hello world story once upon").split()


def llama_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style pieces, scores and token types: <unk>, <s>, </s>, 256 byte tokens, word pieces."""
    import gguf

    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256
    if n_vocab < len(tokens) + 1:
        raise ValueError(f"n_vocab must be > {len(tokens)}")
    pieces: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            pieces.append(p)

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    for c in _SPACE + chars:  # every single character, with and without a word boundary
        add(c)
    for c in chars:
        add(_SPACE + c)
    for w in _WORDS:  # whole words reachable by left-to-right merges (every prefix is a piece)
        for k in range(2, len(w) + 1):
            add(_SPACE + w[:k])
            add(w[:k])
    lower = string.ascii_lowercase
    for a in lower:
        for b in lower:
            add(a + b)
            add(_SPACE + a + b)
    for a in lower:
        for b in lower:
            for c in lower:
                add(a + b + c)
                add(_SPACE + a + b + c)
    need = n_vocab - len(tokens)
    i = 0
    while len(pieces) < need:  # very large vocabularies: unique filler pieces
        add(f"{_SPACE}x{i:06d}")
        i += 1
    pieces = pieces[:need]
    tokens += pieces
    types += [tt.NORMAL] * len(pieces)
    # SentencePiece scores: log-probability-like, higher = merged first; shorter pieces rank higher here.
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def write_llama_gguf(path: str | Path, *, n_vocab: int, n_embd: int, n_layer: int, n_head: int, n_ff: int,
                     ctx: int, ftype: str = "q8_0", seed: int = 0, never_eos: bool = True) -> Path:
    """Write a LLaMA GGUF v3 file with random weights (ftype f16, q8_0 or q4_0) and return its path."""
    # never_eos: the output rows of <unk>, <s>, </s> are zero, so their logits are 0 while the best of the
    # other random logits is far above 0: greedy decoding then never stops early and needs no logit bias.
    import gguf

    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {sorted(FTYPES)}")
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError("n_embd must be a multiple of n_head with an even head size")
    if ftype != "f16" and (n_embd % 32 or n_ff % 32):
        raise ValueError("quantized rows must be multiples of 32: choose n_embd and n_ff accordingly")
    qtype = getattr(gguf.GGMLQuantizationType, FTYPES[ftype][0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random-llama-{n_embd}x{n_layer}-{ftype}")
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(getattr(gguf.LlamaFileType, FTYPES[ftype][1])))
    tokens, scores, types = llama_vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def mat(name: str, rows: int, cols: int, std: float, zero_rows: int = 0) -> None:
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float32)
        data[:zero_rows] = 0.0
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32))

    std = 1.0 / np.sqrt(n_embd)
    mat("token_embd.weight", n_vocab, n_embd, 1.0)
    for i in range(n_layer):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", n_embd)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            mat(b + t + ".weight", n_embd, n_embd, std)
        norm(b + "ffn_norm.weight", n_embd)
        mat(b + "ffn_gate.weight", n_ff, n_embd, std)
        mat(b + "ffn_up.weight", n_ff, n_embd, std)
        mat(b + "ffn_down.weight", n_embd, n_ff, 1.0 / np.sqrt(n_ff))
    norm("output_norm.weight", n_embd)
    mat("output.weight", n_vocab, n_embd, std, zero_rows=3 if never_eos else 0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
