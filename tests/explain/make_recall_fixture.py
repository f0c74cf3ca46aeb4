"""Train the "recall" fixture: a tiny GPT that has learnt one task, for the faithfulness test.

The task: a prompt is a run of random filler words (``a`` .. ``p``, repeats allowed) in
which the marker ``X`` stands once, at any position but the first. The answer, the next
token after the prompt, is the filler that stood just before ``X``::

    "k c X f a a n"  ->  "c"

There is no query token at the end: a final token every answer depended on would make
"always the last token" a faithful-looking attribution. Here the answer depends on two
positions that move from prompt to prompt (``X`` and the word before it), and deleting
any other word leaves a prompt of the same task with the same answer.

Solving it takes two steps the model must learn (a previous-token head writes each word
into the next position, and the last position then reads what sits at ``X``), so the
answer depends on a few known prompt positions and not on the rest: the ground on which
``tests/explain/test_faithfulness.py`` checks that attributions point at the tokens the
prediction depends on (by deleting them, not by asking whether they look right).

The tokenizer is word level (``tokenizers`` WordLevel on whitespace): every word is one
token, and baobab's special tokens (``<|endoftext|>``, ``<|pad|>``, ``<|mask|>``) are ids
0-2. The model is ``build_model(GPTConfig(...), seed=0)``, trained with plain torch
(AdamW, loss on the answer only), seeded; training takes about a minute on one CPU core.

Two choices keep the model smooth along integrated gradients' path from baobab's zero-
embedding baseline, so that IG converges within its default ``max_delta`` with few
integration points (measured with one Gauss-Legendre rule over the whole path):

- learned absolute positions, not RoPE: with RoPE the baseline's residual stream is
  exactly zero, and RMSNorm's scale invariance then puts the whole change of log p within
  the first thousandth of the path (deltas of up to 3 nats at 256 steps);
- label smoothing and a strong weight decay: a model trained to near-zero loss snaps from
  one answer to another at some point on the path (a step of 2.6 nats within 2% of it),
  which needed 1024 steps; these soften it (at 128 steps the deltas stay below 0.02).

The result is written as a standard export (``save_exported``, as ``baobab export``
writes it: model.safetensors, config.json, tokenizer.json) into ``fixtures/recall/``
beside this file, which ``baobab.export.open.open_model`` loads.

Regenerate (from the repository root; replaces the fixture, prints its accuracy)::

    python tests/explain/make_recall_fixture.py
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import models, pre_tokenizers

from baobab.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from baobab.export.artifact import save_exported
from baobab.models import build_model
from baobab.models.gpt import GPTConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "recall"
FILLERS = tuple("abcdefghijklmnop")
MARKER, UNKNOWN = "X", "<unk>"
MIN_FILLERS, MAX_FILLERS = 6, 14  # a prompt holds this many fillers, plus X
TRAIN_SEED = 0  # the model's init and the training data; the held-out check uses EVAL_SEED
EVAL_SEED = 1
STEPS, BATCH, LR = 1500, 128, 3e-3
SMOOTHING, WEIGHT_DECAY = 0.1, 1.0  # see the module docstring


def make_tokenizer() -> Tokenizer:
    """The word-level tokenizer: special tokens 0-2, then <unk>, the fillers and X."""
    words = [*SPECIAL_TOKENS, UNKNOWN, *FILLERS, MARKER]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(tok)


def recall_example(rng: random.Random, n_fillers: int | None = None) -> tuple[list[str], str]:
    """One prompt as its words and its answer (the word before X)."""
    n = n_fillers if n_fillers is not None else rng.randint(MIN_FILLERS, MAX_FILLERS)
    words = [rng.choice(FILLERS) for _ in range(n)]
    at = rng.randint(1, n)  # X's index: never first, so some word stands before it
    words.insert(at, MARKER)
    return words, words[at - 1]


def make_config(vocab_size: int) -> GPTConfig:
    """The fixture's shape: 2 layers, d_model 64 (about 70k parameters, ~0.3 MB)."""
    return GPTConfig(
        vocab_size=vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=4,
        d_model=64,
        ffn_hidden=128,
        max_seq_len=32,
        position="learned",  # see the module docstring
    )


def _batch(
    rng: random.Random, tok: Tokenizer, size: int, n_fillers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (size, n_fillers + 1) and answers (size,) as ids; one length per batch, so
    no padding is needed (the model has no padding mask)."""
    examples = [recall_example(rng, n_fillers) for _ in range(size)]
    ids = tok.encode_batch([" ".join(words) for words, _ in examples])
    answers = [tok.backend.token_to_id(answer) for _, answer in examples]
    return torch.tensor(ids), torch.tensor(answers)


@torch.no_grad()
def accuracy(model: torch.nn.Module, tok: Tokenizer, seed: int, per_length: int = 200) -> float:
    """Greedy next-token accuracy on fresh prompts of every length (from ``seed``)."""
    rng, right, total = random.Random(seed), 0, 0
    model.eval()
    for n in range(MIN_FILLERS, MAX_FILLERS + 1):
        x, y = _batch(rng, tok, per_length, n)
        right += int((model(x)[:, -1].argmax(-1) == y).sum())
        total += len(y)
    return right / total


def train(tok: Tokenizer) -> torch.nn.Module:
    """Train the fixture's model on the recall task (loss on the answer position only)."""
    torch.manual_seed(TRAIN_SEED)
    rng = random.Random(TRAIN_SEED)
    model = build_model(make_config(tok.vocab_size), seed=TRAIN_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS)
    model.train()
    for step in range(STEPS):
        x, y = _batch(rng, tok, BATCH, rng.randint(MIN_FILLERS, MAX_FILLERS))
        loss = F.cross_entropy(model(x)[:, -1], y, label_smoothing=SMOOTHING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return model.eval()


def main() -> None:
    tok = make_tokenizer()
    for word in (*FILLERS, MARKER):  # every symbol is exactly one token
        assert len(tok.encode(word)) == 1, word
    model = train(tok)
    acc = accuracy(model, tok, EVAL_SEED)
    print(f"held-out accuracy {acc:.4f}")
    if acc <= 0.95:
        raise SystemExit(f"accuracy {acc:.4f} is not above 0.95; the fixture is not written")
    described = {"name": "gpt", "family": "gpt", "config": dataclasses.asdict(model.cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = tok.save(Path(tmp) / "tokenizer.json")
        save_exported(model, FIXTURE, described, "causal_lm", STEPS, tok_file, overwrite=True)
    size = sum(f.stat().st_size for f in FIXTURE.iterdir())
    print(f"wrote {FIXTURE} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
