"""Constants of the GGML GPT-J container as read by ctransformers 0.2.27 (ggml of mid-2023).

Two different enumerations appear in a file: the *ftype* in the header (the "mostly" type of the whole
file, plus 1000 x the quantization version) and the *ggml type* of every tensor record.
"""

from __future__ import annotations

GGML_MAGIC = 0x67676D6C  # "ggml" (unversioned container), little-endian uint32
QNT_VERSION = 2  # current quantization version (fp16 scales, nibble halves)
QNT_VERSION_FACTOR = 1000  # header ftype = base ftype + QNT_VERSION_FACTOR * quantization version

# Magics of other containers, recognised only to give a better error message.
OTHER_MAGICS = {
    0x67676A74: "'ggjt' (versioned llama.cpp GGML container)",
    0x67676D66: "'ggmf' (versioned llama.cpp GGML container)",
    0x46554747: "GGUF",
}

# ggml tensor type ids (enum ggml_type)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q4_1 = 3
GGML_TYPE_Q4_2 = 4  # legacy only (removed from ggml in May 2023)
GGML_TYPE_Q5_0 = 6
GGML_TYPE_Q5_1 = 7
GGML_TYPE_Q8_0 = 8

QK = 32  # weights per block of every current quantized type

# ggml type -> (weights per block, bytes per block), current layout (quantization version 2)
TYPE_BLOCK: dict[int, tuple[int, int]] = {
    GGML_TYPE_F32: (1, 4),
    GGML_TYPE_F16: (1, 2),
    GGML_TYPE_Q4_0: (32, 18),  # fp16 d, 16 bytes of nibbles
    GGML_TYPE_Q4_1: (32, 20),  # fp16 d, fp16 m, 16 bytes of nibbles
    GGML_TYPE_Q5_0: (32, 22),  # fp16 d, uint32 qh, 16 bytes of nibbles
    GGML_TYPE_Q5_1: (32, 24),  # fp16 d, fp16 m, uint32 qh, 16 bytes of nibbles
    GGML_TYPE_Q8_0: (32, 34),  # fp16 d, 32 int8
}

# Pre-May-2023 layout (quantization version 0, e.g. GPT4All-J files): f32 scales, nibbles in pairs.
LEGACY_TYPE_BLOCK: dict[int, tuple[int, int]] = {
    GGML_TYPE_F32: (1, 4),
    GGML_TYPE_F16: (1, 2),
    GGML_TYPE_Q4_0: (32, 20),  # f32 d, 16 bytes (byte k = weights 2k low, 2k+1 high)
    GGML_TYPE_Q4_1: (32, 24),  # f32 d, f32 m, 16 bytes
    GGML_TYPE_Q4_2: (16, 10),  # fp16 d, 8 bytes
    GGML_TYPE_Q5_0: (32, 22),
    GGML_TYPE_Q5_1: (32, 24),
    GGML_TYPE_Q8_0: (32, 36),  # f32 d, 32 int8
}

TYPE_NAMES: dict[int, str] = {
    GGML_TYPE_F32: "f32",
    GGML_TYPE_F16: "f16",
    GGML_TYPE_Q4_0: "q4_0",
    GGML_TYPE_Q4_1: "q4_1",
    GGML_TYPE_Q4_2: "q4_2",
    GGML_TYPE_Q5_0: "q5_0",
    GGML_TYPE_Q5_1: "q5_1",
    GGML_TYPE_Q8_0: "q8_0",
}

# Base ftype codes (header ftype mod 1000) supported by this project.
FTYPE_CODES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
}
FTYPE_NAMES: dict[int, str] = {code: name for name, code in FTYPE_CODES.items()}
FTYPE_TO_GGML_TYPE: dict[int, int] = {
    0: GGML_TYPE_F32,
    1: GGML_TYPE_F16,
    2: GGML_TYPE_Q4_0,
    3: GGML_TYPE_Q4_1,
    7: GGML_TYPE_Q8_0,
    8: GGML_TYPE_Q5_0,
    9: GGML_TYPE_Q5_1,
}
NAME_TO_GGML_TYPE: dict[str, int] = {name: FTYPE_TO_GGML_TYPE[code] for name, code in FTYPE_CODES.items()}
QUANTIZED_FTYPES = frozenset({2, 3, 7, 8, 9})

# Base ftypes of the pre-May-2023 ggml (quantization version 0); 5 is q4_2.
LEGACY_FTYPE_TO_GGML_TYPE: dict[int, int] = {
    2: GGML_TYPE_Q4_0,
    3: GGML_TYPE_Q4_1,
    5: GGML_TYPE_Q4_2,
    7: GGML_TYPE_Q8_0,
    8: GGML_TYPE_Q5_0,
    9: GGML_TYPE_Q5_1,
}
LEGACY_FTYPE_NAMES: dict[int, str] = {c: TYPE_NAMES[t] for c, t in LEGACY_FTYPE_TO_GGML_TYPE.items()}
# Other ftypes ggml knows but this project does not serve.
OTHER_FTYPE_NAMES: dict[int, str] = {
    4: "q4_1_some_f16",
    10: "q2_K",
    11: "q3_K",
    12: "q4_K",
    13: "q5_K",
    14: "q6_K",
}

EOS_TOKEN = b"<|endoftext|>"
HPARAM_NAMES = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_rot", "ftype")
LAYER_TENSOR_SUFFIXES = (  # Hugging Face state-dict order within a GPT-J block
    "ln_1.weight",
    "ln_1.bias",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "attn.q_proj.weight",
    "attn.out_proj.weight",
    "mlp.fc_in.weight",
    "mlp.fc_in.bias",
    "mlp.fc_out.weight",
    "mlp.fc_out.bias",
)


def tensors_per_model(n_layer: int) -> int:
    """Number of tensor records in a GPT-J file: wte, 10 per layer, ln_f (2), lm_head (2)."""
    return 5 + len(LAYER_TENSOR_SUFFIXES) * n_layer


def gptj_tensor_shapes(n_vocab: int, n_embd: int, n_layer: int) -> dict[str, tuple[int, ...]]:
    """Expected tensors in file (HF state-dict) order, as numpy shapes (rows, row_len) / (n,)."""
    n, ff = n_embd, 4 * n_embd
    per_layer = {
        "ln_1.weight": (n,),
        "ln_1.bias": (n,),
        "attn.k_proj.weight": (n, n),
        "attn.v_proj.weight": (n, n),
        "attn.q_proj.weight": (n, n),
        "attn.out_proj.weight": (n, n),
        "mlp.fc_in.weight": (ff, n),
        "mlp.fc_in.bias": (ff,),
        "mlp.fc_out.weight": (n, ff),
        "mlp.fc_out.bias": (n,),
    }
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (n_vocab, n)}
    for i in range(n_layer):
        for suffix in LAYER_TENSOR_SUFFIXES:
            shapes[f"transformer.h.{i}.{suffix}"] = per_layer[suffix]
    shapes["transformer.ln_f.weight"] = (n,)
    shapes["transformer.ln_f.bias"] = (n,)
    shapes["lm_head.weight"] = (n_vocab, n)
    shapes["lm_head.bias"] = (n_vocab,)
    return shapes
