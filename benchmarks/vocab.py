"""The real GPT-2 vocabulary, offline: read from the openai-whisper sdist on PyPI, padded as GPT-J pads it.

The sdist carries whisper/assets/gpt2.tiktoken ("base64(token_bytes) rank" per line, ranks = GPT-2 ids).
It is downloaded once with pip (never installed) into the cache dir; only that one file is read.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tarfile
from pathlib import Path

WHISPER_SDIST = "openai-whisper==20250625"
ASSET = "whisper/assets/gpt2.tiktoken"
EOS = b"<|endoftext|>"
GPT2_EOS_ID = 50256
GPTJ_VOCAB = 50400  # GPT-J pads GPT-2's 50,257 tokens to a multiple of 64


def _sdist(cache: Path) -> Path | None:
    """The whisper sdist in the cache, downloading it with pip if needed; None if unavailable."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("openai_whisper-*.tar.gz")) or sorted(cache.glob("openai-whisper-*.tar.gz"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", WHISPER_SDIST,
           "-d", str(cache), "-q"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    found = sorted(cache.glob("openai_whisper-*.tar.gz")) or sorted(cache.glob("openai-whisper-*.tar.gz"))
    return found[-1] if found else None


def _read_asset(sdist: Path) -> bytes:
    """The gpt2.tiktoken file from inside the sdist tarball."""
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name.endswith(ASSET):
                f = tar.extractfile(member)
                if f is not None:
                    return f.read()
    raise FileNotFoundError(f"{ASSET} not found in {sdist}")


def parse_tiktoken(data: bytes) -> list[bytes]:
    """Token bytes ordered by rank from a .tiktoken file ("base64 rank" per line)."""
    ranks: dict[int, bytes] = {}
    for line in data.splitlines():
        if not line.strip():
            continue
        b64, rank = line.split()
        ranks[int(rank)] = base64.b64decode(b64)
    if sorted(ranks) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks are not contiguous from 0")
    return [ranks[i] for i in range(len(ranks))]


def gptj_vocab(gpt2: list[bytes]) -> list[bytes]:
    """GPT-2's tokens, <|endoftext|> at 50256, padded with unique filler tokens to GPT-J's 50,400."""
    if len(gpt2) != GPT2_EOS_ID:
        raise ValueError(f"expected {GPT2_EOS_ID} GPT-2 tokens, got {len(gpt2)}")
    vocab = list(gpt2) + [EOS]
    vocab += [f"<|extratoken_{i}|>".encode() for i in range(1, GPTJ_VOCAB - len(vocab) + 1)]
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocabulary has repeated tokens")
    return vocab


def load_vocab(cache: Path) -> tuple[list[bytes], str]:
    """GPT-J's 50,400-token vocabulary and its source; falls back to the writer's default_vocab offline."""
    sdist = _sdist(Path(cache))
    if sdist is not None:
        try:
            return gptj_vocab(parse_tiktoken(_read_asset(sdist))), f"gpt2 ({sdist.name}:{ASSET})"
        except (OSError, ValueError, tarfile.TarError) as exc:
            print(f"[bench] cannot read the GPT-2 vocabulary ({exc}); using default_vocab", file=sys.stderr)
    from backends.ggml.writer import default_vocab

    return default_vocab(GPTJ_VOCAB), "default_vocab (GPT-2 vocabulary unavailable)"
