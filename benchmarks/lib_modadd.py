"""LIB vs PCA node ablation on a modular-addition MLP trained in-process.

``python -m benchmarks.lib_modadd [--p 59] [--hidden 128] [--seeds 3] [--steps 2000]``

The network is a pyvene ``MLPForClassification``: input ``onehot(a) ⊕ onehot(b)`` (zero-padded to the
hidden width), two ReLU blocks, and ``p`` logits for ``(a + b) mod p``. It is trained full-batch with
AdamW (weight decay 1, as in the LIB paper's modular-addition runs) on a random ``frac_train`` of the
``p²`` pairs and generalises (groks) to the rest within the step budget.

At three node layers — the one-hot input (``block_input`` of layer 0, the "embedding"), the first
and the second hidden layer (``block_output`` of layers 0 and 1) — four bases are built on the
*training* states and evaluated on the *held-out* pairs:

* ``pca``: centred PCA (:func:`pyvene_plot.methods.bases.pca_basis`);
* ``lib``: faithful layer-recursive LIB (``lib_basis(method="lib")``: Jacobian to the next layer's
  LIB features, raw logits at the output);
* ``lib_lite``: LIB with the Jacobian of the output logits (``method="output_jacobian"``); equal to
  ``lib`` at the last hidden layer;
* ``lib_qr``: the ``lib`` encoder rows orthonormalised in importance order (what the scheduler's
  ``lib`` stage hands to PLOT's engine); ablation is then an orthogonal projection;
* ``lib_qr_rows``: the ``lib`` decoder rows ``C⁺`` orthonormalised instead (the alternative the
  scheduler does not use).

Node ablation keeps the top-``n`` directions and replaces every other feature by its mean
(:meth:`Basis.reconstruct`); the rest of the network runs on the ablated activations. Reported: the
smallest ``n`` whose held-out accuracy is ≥ 0.99, and the accuracy at a few small ``n``. The mean is
always kept, so the LIB paper's counts (which include the constant direction) are ``n + 1``.

Writes ``benchmarks/results/lib_modadd.json`` atomically and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification

import pyvene_plot as pp
from pyvene_plot._utils import atomic_write_json, package_versions, seed_everything

LAYERS = {
    "input (embedding)": pp.Site(0, "block_input"),
    "hidden 1": pp.Site(0, "block_output"),
    "hidden 2": pp.Site(1, "block_output"),
}
METHODS = ("pca", "lib", "lib_lite", "lib_qr", "lib_qr_rows")
SMALL_N = (2, 4, 6, 8, 10, 12, 16)


def modadd_data(p: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``p²`` inputs ``(p², 1, width)`` (one-hot a, one-hot b, zero padding) and labels ``(a+b) mod p``."""
    if 2 * p > width:
        raise ValueError(f"the one-hot input needs width >= 2p = {2 * p}, got {width}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.zeros(p * p, 1, width)
    x[torch.arange(p * p), 0, a] = 1.0
    x[torch.arange(p * p), 0, p + b] = 1.0
    return x, (a + b) % p


def train_modadd(p: int = 59, hidden: int = 128, frac_train: float = 0.5, steps: int = 2000, lr: float = 5e-3,
                 weight_decay: float = 1.0, seed: int = 0) -> dict:
    """Train the modular-addition MLP; returns model, data, split and accuracies."""
    seed_everything(seed)
    x, y = modadd_data(p, hidden)
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(frac_train * p * p)
    train, test = perm[:n_train], perm[n_train:]
    model = MLPForClassification(MLPConfig(h_dim=hidden, n_layer=2, num_classes=p, activation_function="relu",
                                           pdrop=0.0))
    for mod in model.modules():  # PyTorch's default init (pyvene's post_init uses std 0.02)
        if isinstance(mod, torch.nn.Linear):
            mod.reset_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(inputs_embeds=x[train])[0], y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    with torch.no_grad():
        pred = model(inputs_embeds=x)[0].argmax(-1)
    return {"model": model, "x": x, "y": y, "train": train, "test": test, "train_s": time.perf_counter() - t0,
            "train_acc": float((pred[train] == y[train]).float().mean()),
            "test_acc": float((pred[test] == y[test]).float().mean())}


def build_bases(model: torch.nn.Module, site: pp.Site, states: torch.Tensor) -> dict[str, pp.Basis]:
    """The four bases of the benchmark at one site, built on ``states`` (model inputs)."""
    lib = pp.lib_basis(model, site, states, method="lib")
    out = {
        "pca": pp.pca_basis(model, site, states),
        "lib": lib,
        "lib_lite": pp.lib_basis(model, site, states, method="output_jacobian"),
    }
    for name, side in (("lib_qr", "encoder"), ("lib_qr_rows", "rows")):
        Q = lib.orthonormal_rows(side)
        out[name] = pp.Basis(Q, Q, lib.importances, lib.mean, "lib", dict(lib.info, orthonormalised=side))
    return out


def ablation_curve(model: torch.nn.Module, site: pp.Site, basis: pp.Basis, x: torch.Tensor,
                   y: torch.Tensor) -> list[float]:
    """Accuracy on ``(x, y)`` keeping the top ``n = 0..rank`` directions of ``basis`` at ``site``."""
    acts = pp.bases.site_activations(model, site, x).double()
    chain = pp.bases.mlp_chain(model, site)

    def run(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        for f in chain:
            h = f(h)
        return h

    with torch.no_grad():
        clean = run(acts).argmax(-1)
        ref = model(inputs_embeds=x)[0].argmax(-1)
        if not torch.equal(clean, ref):
            raise RuntimeError(f"the module chain at {site.label} does not reproduce the model's predictions")
        return [float((run(basis.reconstruct(acts, keep=n)).argmax(-1) == y).float().mean())
                for n in range(basis.rank + 1)]


def first_at_least(curve: list[float], level: float) -> int | None:
    """Smallest ``n`` with ``curve[n] >= level`` (None if never)."""
    return next((n for n, a in enumerate(curve) if a >= level), None)


def run(p: int = 59, hidden: int = 128, seeds: int = 3, steps: int = 2000, frac_train: float = 0.5,
        level: float = 0.99, out: str | Path = "benchmarks/results/lib_modadd.json") -> dict:
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    per_seed = []
    for seed in range(seeds):
        tr = train_modadd(p, hidden, frac_train, steps, seed=seed)
        model, x, y = tr["model"], tr["x"], tr["y"]
        xs_train, xs_test, y_test = x[tr["train"]], x[tr["test"]], y[tr["test"]]
        layers = {}
        for name, site in LAYERS.items():
            t0 = time.perf_counter()
            bases = build_bases(model, site, xs_train)
            t_bases = time.perf_counter() - t0
            res = {}
            for m, b in bases.items():
                curve = ablation_curve(model, site, b, xs_test, y_test)
                res[m] = {"rank": b.rank, "n_at_level": first_at_least(curve, level), "curve": curve,
                          "importances_top": b.importances[:16].tolist()}
            layers[name] = {"site": site.label, "width": hidden, "bases_s": t_bases, "methods": res}
        per_seed.append({"seed": seed, "train_acc": tr["train_acc"], "test_acc": tr["test_acc"],
                         "train_s": tr["train_s"], "layers": layers})
        print(f"seed {seed}: train acc {tr['train_acc']:.4f}, held-out acc {tr['test_acc']:.4f} "
              f"(trained in {tr['train_s']:.0f}s)", flush=True)
    summary = []
    for name in LAYERS:
        for m in METHODS:
            ns = [s["layers"][name]["methods"][m]["n_at_level"] for s in per_seed]
            curves = [s["layers"][name]["methods"][m]["curve"] for s in per_seed]
            row = {"layer": name, "method": m, "n_at_level": ns,
                   "n_at_level_mean": float(np.mean([n for n in ns if n is not None])) if any(n is not None for n in ns) else None,
                   "rank": [s["layers"][name]["methods"][m]["rank"] for s in per_seed]}
            for n in SMALL_N:
                row[f"acc@{n}"] = float(np.mean([c[min(n, len(c) - 1)] for c in curves]))
            summary.append(row)
    payload = {
        "benchmark": "lib_modadd",
        "config": {"p": p, "hidden": hidden, "n_layer": 2, "seeds": seeds, "steps": steps, "frac_train": frac_train,
                   "optimizer": "AdamW lr 5e-3 wd 1.0 betas (0.9, 0.98), full batch", "level": level,
                   "bases_built_on": "training pairs", "accuracy_on": "held-out pairs",
                   "ablation": "keep top-n directions, other features set to their mean (mean always kept)"},
        "summary": summary,
        "per_seed": per_seed,
        "wall_s": time.perf_counter() - t_all,
        "versions": package_versions(),
    }
    atomic_write_json(out, payload)
    return payload


def markdown(payload: dict) -> str:
    level = payload["config"]["level"]
    head = ["layer", "basis", f"n (acc ≥ {level}) per seed", "mean"] + [f"acc@{n}" for n in SMALL_N]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in payload["summary"]:
        ns = "/".join("–" if n is None else str(n) for n in r["n_at_level"])
        mean = "–" if r["n_at_level_mean"] is None else f"{r['n_at_level_mean']:.1f}"
        lines.append("| " + " | ".join([r["layer"], r["method"], ns, mean] + [f"{r[f'acc@{n}']:.3f}" for n in SMALL_N]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lib_modadd", description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=59)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--frac-train", type=float, default=0.5)
    ap.add_argument("--level", type=float, default=0.99)
    ap.add_argument("--out", default="benchmarks/results/lib_modadd.json")
    a = ap.parse_args()
    payload = run(a.p, a.hidden, a.seeds, a.steps, a.frac_train, a.level, a.out)
    print(markdown(payload))
    print(f"wall {payload['wall_s']:.0f}s; JSON: {a.out}")


if __name__ == "__main__":
    main()
