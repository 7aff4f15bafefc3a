"""``gpt2_lookup``: a tiny GPT-2 that sums two looked-up values (two pointers, two variables).

Task
----
A sequence of ``T = N + 2`` tokens (``N = 5`` slots, ``K = 5`` values)::

    x0 x1 x2 x3 x4 @p1 @p2   ->   answer token  s{x[p1] + x[p2]}

``x_i`` are value tokens ``v0..v4``, ``@p1`` / ``@p2`` pointer tokens ``@0..@4`` naming a slot.
The model predicts the answer token ``s0..s8`` (the sum) at the last position. High-level
(pyvene ``CausalModel``) variables::

    inputs   X0..X4 in {0..4},  P1, P2 in {0..4}
    V1 = X[P1]     (parents X0..X4, P1)   -- the value the first pointer points at
    V2 = X[P2]     (parents X0..X4, P2)   -- the value the second pointer points at
    O  = V1 + V2   (parents V1, V2)       -- output, 9 classes; label i = answer token s{i}

Interchanging ``V1`` (``V2``) changes the output whenever the source's looked-up value differs
from the base's, i.e. on about 80% of random pairs (the bank builder reserves a share anyway).

Model and training
------------------
``GPT2LMHeadModel`` from a config: 2 layers, d=64, 4 heads, MLP 256, learned positions, eager
attention, no dropout, vocabulary of 19 tokens. Trained in-process with AdamW (lr 3e-3, one-cycle)
for 400 steps of 128 sequences, cross-entropy on the next-token prediction of the answer at the
last position only. A fixed 20% of the 78,125 possible inputs is held out and never trained on.
Seeds 0, 1, 2: held-out accuracy 1.000; 4-7 s of training on an idle 2-thread CPU (it slows
down several-fold when the two cores are shared with other jobs).

Where the variables live (verification, not computed at load time)
------------------------------------------------------------------
Measured with a standalone script (``block_output`` = residual stream after each block; the
1000-pair test bank; positions 0..6 = x0..x4, @p1, @p2). Full-vector interchange IIA, seed 0::

    V1            pos: 0     1     2     3     4     5     6
        layer 0      .131  .131  .131  .131  .131 1.000  .180
        layer 1      .131  .131  .131  .131  .131  .131  .128
    V2            pos: 0     1     2     3     4     5     6
        layer 0      .128  .128  .128  .128  .128  .180 1.000
        layer 1      .128  .128  .128  .128  .128  .128  .131

The floor (.13) is the share of pairs whose counterfactual label equals the base label (the
interchange at that site has no effect on the answer); seeds 1 and 2 give the same picture
(floors .11-.14, 1.000 at the same sites). The first layer's attention does the lookup at each
pointer's own position (the same layer-0 heads attend, with weight ~0.9-1.0, from each pointer to
the slot it names); the second layer attends from the last position to position 5 (copying
``V1``) and its MLP adds, so the last layer's block output carries only the sum. ``V1`` lives at ``L0@5`` and ``V2`` at ``L0@6``. DAS (``LowRankRotatedSpaceIntervention``,
rank 4, 5 epochs on the fit bank, Adam lr 1e-2, batch 50) at every one of the 14 sites, test IIA
at the best site (best other site in brackets)::

    seed 0:  V1 L0@5 1.000 (0.159)   V2 L0@6 1.000 (0.169)
    seed 1:  V1 L0@5 1.000 (0.185)   V2 L0@6 1.000 (0.145)
    seed 2:  V1 L0@5 1.000 (0.168)   V2 L0@6 1.000 (0.185)

Note for progressive schedules: ``V1`` never sits at the last token as a separate variable, so a
``layer`` stage restricted to the last token cannot see it; it is found by the ``position`` stage
inside layer 0.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch

from ..data import PairBank
from ..models import Readout, layer_sites
from ..progressive import Stage
from . import Task, register

logger = logging.getLogger(__name__)

__all__ = [
    "build",
    "build_causal_model",
    "to_model_inputs",
    "make_model",
    "K",
    "N_SLOTS",
    "SEQ_LEN",
    "VOCAB",
    "ANSWER_TOKENS",
]

K = 5  # values per slot
N_SLOTS = 5  # slots a pointer can point at
SEQ_LEN = N_SLOTS + 2
VALUE_TOKENS = tuple(range(0, K))  # "v0".."v4"
POINTER_TOKENS = tuple(range(K, K + N_SLOTS))  # "@0".."@4"
ANSWER_TOKENS = tuple(range(K + N_SLOTS, K + N_SLOTS + 2 * K - 1))  # "s0".."s8"
VOCAB = (
    [f"v{i}" for i in range(K)] + [f"@{i}" for i in range(N_SLOTS)] + [f"s{i}" for i in range(2 * K - 1)]
)
SLOT_VARS = [f"X{i}" for i in range(N_SLOTS)]


# ----------------------------------------------------------------------------- causal model
def build_causal_model():
    """The high-level model (a fresh ``CausalModel``; its constructor mutates its arguments)."""
    from pyvene.data_generators.causal_model import CausalModel

    variables = SLOT_VARS + ["P1", "P2", "V1", "V2", "O"]
    values = {v: list(range(K)) for v in SLOT_VARS}
    values.update({"P1": list(range(N_SLOTS)), "P2": list(range(N_SLOTS)),
                   "V1": list(range(K)), "V2": list(range(K)), "O": list(range(2 * K - 1))})
    parents = {v: [] for v in SLOT_VARS + ["P1", "P2"]}
    parents.update({"V1": SLOT_VARS + ["P1"], "V2": SLOT_VARS + ["P2"], "O": ["V1", "V2"]})

    def lookup(*args: int) -> int:
        *xs, p = args
        return xs[p]

    functions = {v: (lambda: 0) for v in SLOT_VARS + ["P1", "P2"]}
    functions.update({"V1": lookup, "V2": lookup, "O": lambda a, b: a + b})
    return CausalModel(list(variables), dict(values), dict(parents), dict(functions), pos={})


def setting_to_ids(setting: dict) -> list[int]:
    return [VALUE_TOKENS[setting[v]] for v in SLOT_VARS] + [
        POINTER_TOKENS[setting["P1"]], POINTER_TOKENS[setting["P2"]]
    ]


def to_model_inputs(setting: dict) -> dict[str, torch.Tensor]:
    """One input setting -> ``{"input_ids": LongTensor[T], "attention_mask": ones}``."""
    ids = torch.tensor(setting_to_ids(setting), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def uniform_sampler(rng) -> dict:
    """Each slot value and pointer uniform; either variable changes the output on ~80% of pairs."""
    s = {v: rng.randrange(K) for v in SLOT_VARS}
    s["P1"] = rng.randrange(N_SLOTS)
    s["P2"] = rng.randrange(N_SLOTS)
    return s


# ----------------------------------------------------------------------------- model
def make_model(n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
    """A random-init GPT-2 LM sized for the task (eager attention, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(VOCAB), n_positions=SEQ_LEN, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=4 * n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def _all_inputs() -> torch.Tensor:
    """Every input sequence (K^N * N^2 = 78,125 rows)."""
    xs = torch.tensor(list(itertools.product(range(K), repeat=N_SLOTS)), dtype=torch.long)
    ps = torch.tensor(list(itertools.product(range(N_SLOTS), repeat=2)), dtype=torch.long)
    x = xs.repeat_interleave(len(ps), 0)
    p = ps.repeat(len(xs), 1)
    return torch.cat([x + VALUE_TOKENS[0], p + POINTER_TOKENS[0]], 1)


def _answers(ids: torch.Tensor) -> torch.Tensor:
    """Class index (the sum) of each row of token ids."""
    x = ids[:, :N_SLOTS] - VALUE_TOKENS[0]
    p = ids[:, N_SLOTS:] - POINTER_TOKENS[0]
    return x.gather(1, p[:, :1])[:, 0] + x.gather(1, p[:, 1:])[:, 0]


@torch.no_grad()
def accuracy(model: torch.nn.Module, ids: torch.Tensor, batch: int = 8192) -> float:
    """Share of rows whose answer-restricted argmax at the last token is right."""
    readout = Readout(position="last", label_tokens=ANSWER_TOKENS)
    y = _answers(ids)
    hits = 0
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        inp = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        hits += int((readout(model(**inp), inp).argmax(-1) == y[i:i + batch]).sum())
    return hits / len(ids)


def train_model(seed: int = 0, steps: int = 400, batch_size: int = 128, lr: float = 3e-3,
                heldout_fraction: float = 0.2, **model_kw: Any):
    """Train in-process; returns ``(model, info)``. Global RNG state is left untouched.

    The input space is split once (fixed permutation, independent of ``seed``) into a training
    pool and a held-out pool that is never trained on; batches are drawn from the training pool.
    Loss: cross-entropy of the next-token prediction at the last position only, over the whole
    vocabulary (target = the answer token).
    """
    all_ids = _all_inputs()
    perm = torch.randperm(len(all_ids), generator=torch.Generator().manual_seed(12345))
    n_held = int(round(heldout_fraction * len(all_ids)))
    held, pool = all_ids[perm[:n_held]], all_ids[perm[n_held:]]
    pool_y = _answers(pool) + ANSWER_TOKENS[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = make_model(**model_kw)
        gen = torch.Generator().manual_seed(10_000 + int(seed))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        model.train()
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(pool), (batch_size,), generator=gen)
            ids = pool[idx]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, pool_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        train_s = time.perf_counter() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {
        "train_seconds": round(train_s, 2),
        "train_threads": torch.get_num_threads(),
        "train_steps": steps,
        "batch_size": batch_size,
        "final_train_loss": round(float(loss.detach()), 5),
        "heldout_accuracy": accuracy(model, held),
        "n_heldout": int(n_held),
    }
    return model, info


# ----------------------------------------------------------------------------- task
def build(seed: int = 0, n_fit: int = 1000, n_calibration: int = 500, n_test: int = 1000,
          steps: int = 400) -> Task:
    """Train the model and build the banks (deterministic given ``seed``)."""
    model, info = train_model(seed=seed, steps=steps)
    cm = build_causal_model()
    total = n_fit + n_calibration + n_test
    bank = PairBank.from_causal_model(
        cm, to_model_inputs, n=total, variables=["V1", "V2"], seed=1000 + int(seed),
        sampler=uniform_sampler, output_var="O", balance=True, name="gpt2_lookup",
    )
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(2000 + int(seed)))
    bases, sources = bank.settings  # type: ignore[attr-defined]
    parts = []
    lo = 0
    for name, size in (("fit", n_fit), ("calibration", n_calibration), ("test", n_test)):
        idx = perm[lo:lo + size]
        lo += size
        part = bank.subset(idx, name=name)
        part.settings = ([bases[i] for i in idx.tolist()], [sources[i] for i in idx.tolist()])  # type: ignore[attr-defined]
        parts.append(part)
    fit, cal, test = parts
    info.update({
        "vocab": list(VOCAB),
        "answer_tokens": list(ANSWER_TOKENS),
        "seq_len": SEQ_LEN,
        "positions": ["x0", "x1", "x2", "x3", "x4", "@p1", "@p2"],
        "model_config": {"n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                         "n_head": model.config.n_head},
        "seed": int(seed),
    })
    return Task(
        name="gpt2_lookup",
        model=model,
        variables=["V1", "V2"],
        fit=fit,
        calibration=cal,
        test=test,
        sites=layer_sites(model, component="block_output", positions=list(range(SEQ_LEN))),
        # V1 lives at the first pointer token, not at the last token: the layer stage scores every
        # (layer, position) site and keeps the layer of the best one; the position stage then
        # searches every position inside that layer.
        default_stages=[
            Stage("layer", positions=tuple(range(SEQ_LEN))),
            Stage("position"),
            Stage("coordinates", group_sizes=(16, 4)),
        ],
        readout=Readout(position="last", label_tokens=ANSWER_TOKENS),
        causal_model=cm,
        info=info,
    )


register("gpt2_lookup", build)
