"""Sequences decoded together give what they give alone; joining, cancelled and finished ones disturb nothing.

* Greedy continuations of the large-margin successor model (tests/models.py) are identical alone
  and inside a batch of 8 sequences of mixed prompt lengths that finish at different steps.
* Teacher-forced random-weight models (every logit matters, no margin): each sequence's logits at
  every step, inside a batch where one sequence is admitted mid-batch, one is cancelled and its slot
  reused by a shorter newcomer (stale cache beyond its length) and one finishes early, match the same
  sequence run alone. Allowed difference: BATCH_MAX_ABS (matmul kernels may sum in another order
  for another batch size); the printed figure is what was seen.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched import BatchedEngine, EngineConfig  # noqa: E402
from tests.models import successor_vocab, write_random, write_successor  # noqa: E402

BATCH_MAX_ABS = 1e-4
EOS = 256  # successor_vocab's <|endoftext|>


def _ids(text: str) -> list[int]:
    return list(text.encode())  # the successor vocab starts with the 256 single bytes


def _greedy(eng: BatchedEngine, slot: int, prompt: list[int], max_new: int) -> list[int]:
    out, logits = [], eng.prefill(slot, prompt)
    while len(out) < max_new:
        tok = int(np.argmax(logits))
        out.append(tok)
        if tok == EOS:
            break
        logits = eng.decode([(slot, tok)])[0]
    return out


PROMPTS = ["x", "abc", "0123", "\n", "hello wor", "The quick brown fox jumps over the lazy dog: a",
           "7", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzm"]


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
def test_greedy_alone_equals_greedy_in_batch_of_8(tmp_path, ftype):
    path = write_successor(tmp_path / f"succ-{ftype}.bin", ftype=ftype)
    _, succ = successor_vocab()
    max_new = 30
    with BatchedEngine(str(path), EngineConfig(n_slots=8, threads=1)) as eng:
        alone = [_greedy(eng, 0, _ids(p), max_new) for p in PROMPTS]
        for p, got in zip(PROMPTS, alone):  # the model does what it was built for
            want, t = [], _ids(p)[-1]
            while len(want) < max_new and (not want or want[-1] != EOS):
                t = succ[t]
                want.append(t)
            assert got == want, f"{p!r}: alone {got}, successor chain {want}"

        outs: dict[int, list[int]] = {}
        logits = {s: eng.prefill(s, _ids(p)) for s, p in enumerate(PROMPTS)}
        active = set(range(len(PROMPTS)))
        outs = {s: [] for s in active}
        while active:
            batch = []
            for s in sorted(active):
                tok = int(np.argmax(logits[s]))
                outs[s].append(tok)
                if tok == EOS or len(outs[s]) == max_new:
                    active.discard(s)  # finished: leaves the batch at once
                else:
                    batch.append((s, tok))
            if batch:
                logits = dict(zip((s for s, _ in batch), eng.decode(batch)))
    for s, p in enumerate(PROMPTS):
        assert outs[s] == alone[s], f"{p!r}: in batch {outs[s]}, alone {alone[s]}"
    assert len({len(o) for o in alone}) > 3, "sequences should finish at different steps"


def _alone(eng: BatchedEngine, prompt: list[int], forced: list[int]) -> list[np.ndarray]:
    out = [eng.prefill(0, prompt)]
    out += [eng.decode([(0, t)])[0] for t in forced]
    return out


@pytest.mark.parametrize("ftype", ["f32", "q4_0"])
def test_admitted_cancelled_finished_do_not_disturb(tmp_path, ftype):
    path = write_random(tmp_path / f"rand-{ftype}.bin", ftype=ftype, n_ctx=256, n_embd=128, n_layer=2)
    rng = np.random.default_rng(5)

    def seq(n_prompt: int, n_forced: int) -> tuple[list[int], list[int]]:
        toks = [int(t) for t in rng.integers(0, 512, n_prompt + n_forced)]
        return toks[:n_prompt], toks[n_prompt:]

    # name: (prompt, forced tokens, slot, admitted before step, cancelled before step or None)
    plan = {"A": (*seq(5, 12), 0, 0, None), "B": (*seq(70, 12), 1, 0, 5), "C": (*seq(33, 6), 2, 0, None),
            "D": (*seq(1, 12), 3, 0, None), "E": (*seq(17, 8), 4, 3, None), "F": (*seq(9, 6), 1, 6, None)}
    with BatchedEngine(str(path), EngineConfig(n_slots=5, threads=1)) as eng:
        want = {n: _alone(eng, p, f) for n, (p, f, *_rest) in plan.items()}
        got: dict[str, list[np.ndarray]] = {n: [] for n in plan}
        running: dict[str, int] = {}  # name -> tokens fed so far
        for step in range(20):
            for n, (p, f, slot, admit, cancel) in plan.items():
                if cancel == step and n in running:
                    del running[n]
                    eng.reset(slot)
                if admit == step:
                    got[n].append(eng.prefill(slot, p))
                    running[n] = 0
            batch = [(n, plan[n][2], plan[n][1][k]) for n, k in running.items() if k < len(plan[n][1])]
            for n in [n for n, k in running.items() if k >= len(plan[n][1])]:
                del running[n]  # finished
            if not batch:
                continue
            logits = eng.decode([(slot, tok) for _, slot, tok in batch])
            for (n, _, _), row in zip(batch, logits):
                got[n].append(row)
                running[n] += 1

    worst = 0.0
    for n, (p, f, _, _, cancel) in plan.items():
        n_steps = len(got[n])
        assert n_steps == (5 + 1 if cancel else len(f) + 1), f"{n}: {n_steps} logits recorded"
        for i, row in enumerate(got[n]):
            diff = float(np.max(np.abs(row - want[n][i])))
            worst = max(worst, diff)
            assert diff <= BATCH_MAX_ABS, f"{ftype} {n} step {i}: batched vs alone max|diff| {diff:.3e}"
    print(f"{ftype}: batched vs alone, worst max|diff| over all sequences and steps {worst:.3e}")


@pytest.mark.parametrize("ftype", ["f32", "q4_0"])
def test_prompt_chunk_in_the_same_step_as_decodes(tmp_path, ftype):
    """A newcomer's prompt chunks ride along with running decodes: nobody's logits change."""
    path = write_random(tmp_path / f"rand-{ftype}.bin", ftype=ftype, n_ctx=128, n_embd=128)
    rng = np.random.default_rng(9)
    prompts = [[int(t) for t in rng.integers(0, 512, n)] for n in (4, 11, 29)]
    forced = [[int(t) for t in rng.integers(0, 512, 3)] for _ in prompts]
    newcomer = [int(t) for t in rng.integers(0, 512, 40)]
    with BatchedEngine(str(path), EngineConfig(n_slots=4, threads=1)) as eng:
        want_new = eng.prefill(3, newcomer)
        want = [_alone(eng, p, f)[1:] for p, f in zip(prompts, forced)]
        for s, p in enumerate(prompts):
            eng.prefill(s, p)
        eng.reset(3)
        got, last = [[] for _ in prompts], None
        for i in range(3):  # 3 steps, each with a 16-token chunk (the last one shorter)
            dec, last = eng.step([(s, forced[s][i]) for s in range(3)], (3, newcomer[16 * i:16 * i + 16]))
            for s in range(3):
                got[s].append(dec[s])
        assert eng.length(3) == len(newcomer) and [eng.length(s) for s in range(3)] == [7, 14, 32]
        with pytest.raises(ValueError):
            eng.step([(0, 1)], (0, [1, 2]))  # one slot cannot decode and prefill in one step
    worst = max(float(np.max(np.abs(g - w))) for gs, ws in zip(got, want) for g, w in zip(gs, ws))
    worst = max(worst, float(np.max(np.abs(last - want_new))))
    print(f"{ftype}: mixed step vs separate, worst max|diff| {worst:.3e}")
    assert worst <= BATCH_MAX_ABS
