"""Latency and peak memory of the MASt3R network per stage and precision (spec ``mast3r_network.md`` §7).

Measures, for each precision (fp32 / tf32 / bf16 / fp16):

* ``encoder``: ``model.encode`` of one image;
* ``decoder``: both decoder branches of one pair (``decoder_tokens`` under the precision's autocast);
* ``head``: one ``catmlp+dpt`` head (DPT + local-feature MLP + post-processing, fp32);
* ``decode``: the public ``model.decode`` (decoder + 2 heads);
* ``track_step`` = encoder + decode (one tracking step of SLAM);
* ``sym_edge``: both directions of one edge in one batched decode (B = 2);
* ``peak_mem``: peak CUDA memory of the precision's runs (``torch.cuda.max_memory_allocated``);
* ``rel_err_X``: deviation of the pair decode from eager fp32 with fp32 heads (max over both views of
  ``max |dpts3d| / max |pts3d|``) and ``err_desc`` (max |ddesc|).

A precision may carry a head suffix: ``bf16+bh`` / ``bf16+fh`` = bf16 trunk with bf16 / fp16 DPT heads
(``Mast3rModel.set_head_precision``). ``--variants`` additionally times CUDA-graphed predictors by the variant names of
``bench/pipeline.py`` (``graph-<prec>[+cl][+ph][+ds][+bh|+fh]``): ``encode``, ``decode`` (decoder + 2 heads), their sum
and the same deviation (stage split not available inside a graph).

Timing: CUDA events around each call (after a synchronize), median over ``--repeats`` after ``--warmup`` runs; on the
CPU ``time.perf_counter``. Weights are random (latency does not depend on values); ``--checkpoint`` loads real ones.

Reference (spec §7, upstream code, H100, TF32, cuRoPE): encoder 8.0 ms, decoder 13.8 ms, head 3.4 ms, tracking step
28.8 ms; the ratio to it is printed for the tf32 row.

Usage::

    python bench/network.py                                  # full model, 512x384, all precisions, auto device
    python bench/network.py --device cpu --config tiny --size 96x64 --repeats 3 --precisions fp32
    python bench/network.py --json out.json
    python bench/network.py --precisions fp32,bf16,bf16+bh,bf16+fh --variants graph-bf16+cl+ph,graph-bf16+cl+ph+bh+ds
    python bench/network.py --compile max-autotune-no-cudagraphs --warmup 3   # opt-in torch.compile of the stages
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from mast3r_slam_ros.network.model import Mast3rModel
from mast3r_slam_ros.network.precision import PRECISIONS, precision_context
from timing import timer

#: upstream H100 TF32 numbers of spec §7 (ms)
REFERENCE_TF32_H100 = {"encoder": 8.0, "decoder": 13.8, "head": 3.4, "track_step": 28.8, "sym_edge": 40.7}


def _timer(device: torch.device, fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median time of ``fn`` in milliseconds (:func:`timing.timer`)."""
    return statistics.median(timer(fn, device, warmup, repeats))


HEAD_SUFFIX = {"": "fp32", "bh": "bf16", "fh": "fp16"}


def _pair(dev: torch.device, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = hw
    g = torch.Generator(device="cpu").manual_seed(0)
    img = (torch.rand(1, 3, h, w, generator=g) * 2 - 1).to(dev)
    return img, torch.roll(img, w // 21, dims=-1), torch.tensor([[h, w]], dtype=torch.int32)


def _outputs(net, img, img2, shape) -> list[torch.Tensor]:
    """pts3d (view 1, view 2) and desc (view 1, view 2) of one pair decode."""
    with torch.inference_mode():
        f1, p1 = net.encode(img, shape)
        f2, p2 = net.encode(img2, shape)
        a, b = net.decode(f1, p1, f2, p2, shape)
    return [t.float().clone() for t in (a.pts3d, b.pts3d, a.desc, b.desc)]


def _deviation(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    return {"rel_err_pts3d": max(float((o - q).abs().max() / q.abs().max()) for o, q in zip(outs[:2], ref[:2])),
            "max_err_desc": max(float((o - q).abs().max()) for o, q in zip(outs[2:], ref[2:]))}


def reference_outputs(model: Mast3rModel, hw: tuple[int, int]) -> list[torch.Tensor]:
    """Eager fp32 (TF32 off) outputs with fp32 heads: the reference of every deviation column."""
    prec, hp = model.precision, model.head_precision
    model.set_precision("fp32")
    model.set_head_precision("fp32")
    try:
        return _outputs(model, *_pair(model.device, hw))
    finally:
        model.set_precision(prec)
        model.set_head_precision(hp)


def split_precision(name: str) -> tuple[str, str]:
    """``"bf16+bh"`` -> ``("bf16", "bf16")`` (trunk precision, head precision); raises ValueError on a bad suffix."""
    prec, _, suffix = name.partition("+")
    if suffix not in HEAD_SUFFIX:
        raise ValueError(f"unknown head suffix {suffix!r} in {name!r}; use +bh (bf16 heads) or +fh (fp16 heads)")
    return prec, HEAD_SUFFIX[suffix]


def bench_precision(model: Mast3rModel, precision: str, hw: tuple[int, int], warmup: int, repeats: int,
                    ref: list[torch.Tensor] | None = None) -> dict:
    """All stage timings (ms), the peak memory (GiB, CUDA only) and the deviation from ``ref`` for one precision
    (``<prec>[+bh|+fh]``)."""
    dev = model.device
    h, w = hw
    precision, head_precision = split_precision(precision)
    model.set_precision(precision)
    model.set_head_precision(head_precision)
    img, img2, shape = _pair(dev, hw)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        f1, p1 = model.encode(img, shape)
        f2, p2 = model.encode(img2, shape)

        def run_decoder():
            with precision_context(precision, dev.type, "trunk"):
                return model.decoder_tokens(f1, p1, f2, p2)

        dec1, _ = run_decoder()
        dec1 = [t.float() for t in dec1]

        def run_head():
            with precision_context(precision, dev.type, "head"):
                return model.downstream_head1(dec1, (h, w))

        fb, pb = torch.cat([f1, f2]), torch.cat([p1, p2])
        fo, po = torch.cat([f2, f1]), torch.cat([p2, p1])
        out = {
            "encoder": _timer(dev, lambda: model.encode(img, shape), warmup, repeats),
            "decoder": _timer(dev, run_decoder, warmup, repeats),
            "head": _timer(dev, run_head, warmup, repeats),
            "decode": _timer(dev, lambda: model.decode(f1, p1, f2, p2, shape), warmup, repeats),
            "sym_edge": _timer(dev, lambda: model.decode(fb, pb, fo, po, shape.expand(2, 2)), warmup, repeats),
        }
    out["track_step"] = out["encoder"] + out["decode"]
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    if ref is not None:
        out.update(_deviation(_outputs(model, img, img2, shape), ref))
    model.set_head_precision("fp32")
    return out


def bench_graph_variant(model: Mast3rModel, variant: str, hw: tuple[int, int], warmup: int, repeats: int,
                        ref: list[torch.Tensor] | None = None) -> dict:
    """``encode`` / ``decode`` (ms) of a CUDA-graphed variant (``bench/pipeline.py`` names), peak memory, deviation."""
    from pipeline import build_network, release_network

    dev = model.device
    img, img2, shape = _pair(dev, hw)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    net = build_network(variant, model)
    try:
        with torch.inference_mode():
            f1, p1 = net.encode(img, shape)
            f2, p2 = net.encode(img2, shape)
            out = {"encoder": _timer(dev, lambda: net.encode(img, shape), warmup, repeats),
                   "decode": _timer(dev, lambda: net.decode(f1, p1, f2, p2, shape), warmup, repeats)}
        out["track_step"] = out["encoder"] + out["decode"]
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        if ref is not None:
            out.update(_deviation(_outputs(net, img, img2, shape), ref))
        if hasattr(net, "stats"):
            out["graphs_captured"], out["graphs_failed"] = net.stats.captured, list(net.stats.failed)
    finally:
        release_network(net)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    ap.add_argument("--config", default="full", choices=("full", "tiny"))
    ap.add_argument("--checkpoint", default=None, help="load real weights with load_model (optional)")
    ap.add_argument("--size", default="512x384", help="W x H of the network image (multiples of 16)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS),
                    help="comma list of fp32/tf32/bf16/fp16, each optionally with +bh or +fh (bf16 / fp16 heads)")
    ap.add_argument("--variants", default="",
                    help="comma list of CUDA-graphed variants as in bench/pipeline.py, e.g. graph-bf16+cl+ph+bh+ds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="torch.compile the stages first (MODE: default, max-autotune-no-cudagraphs, ...)")
    args = ap.parse_args(argv)

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    w, h = (int(v) for v in args.size.lower().split("x"))
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for p in precisions:
        split_precision(p)  # fail fast on a bad suffix
    if args.checkpoint:
        from mast3r_slam_ros.network.loader import load_model

        model = load_model(args.checkpoint, device=dev)
    else:
        model = Mast3rModel.from_config(args.config, device=dev)
    model.eval()
    if args.compile:
        model.compile_stages(**({} if args.compile == "default" else {"mode": args.compile}))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    ref = reference_outputs(model, (h, w))
    results = {}
    for p in precisions:
        if dev.type == "cpu" and ("fp16" in split_precision(p)):
            print(f"skipping {p} on CPU (no fast fp16 CPU kernels)", file=sys.stderr)
            continue
        results[p] = bench_precision(model, p, (h, w), args.warmup, args.repeats, ref)
    graph_results = {v: bench_graph_variant(model, v, (h, w), args.warmup, args.repeats, ref) for v in variants}

    cols = ["encoder", "decoder", "head", "decode", "track_step", "sym_edge"]
    label = Path(args.checkpoint).name if args.checkpoint else args.config
    if args.compile:
        label += f" (torch.compile {args.compile})"
    print(f"MASt3R {label} on {name} ({dev.type}), {w}x{h}, median of {args.repeats} (ms)")
    print(f"{'precision':<10}" + "".join(f"{c:>12}" for c in cols) + f"{'peak GiB':>10}{'rel err X':>11}"
          f"{'err desc':>10}")
    for p, r in results.items():
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{p:<10}" + "".join(f"{r[c]:>12.2f}" for c in cols) + f"{mem:>10}{r['rel_err_pts3d']:>11.2e}"
              f"{r['max_err_desc']:>10.2e}")
    if graph_results:
        print(f"\n{'graph variant':<28}{'encoder':>10}{'decode':>10}{'step':>10}{'peak GiB':>10}{'rel err X':>11}"
              f"{'err desc':>10}  failed")
        for v, r in graph_results.items():
            mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{v:<28}{r['encoder']:>10.2f}{r['decode']:>10.2f}{r['track_step']:>10.2f}{mem:>10}"
                  f"{r['rel_err_pts3d']:>11.2e}{r['max_err_desc']:>10.2e}  {r.get('graphs_failed', [])}")
    ref_row = {}
    is_full = model.config.enc_depth == 24 and model.config.enc_embed_dim == 1024
    if "tf32" in results and dev.type == "cuda" and is_full and (w, h) == (512, 384):
        ref_row = {k: results["tf32"][k] / v for k, v in REFERENCE_TF32_H100.items()}
        print("tf32 / upstream H100 TF32 reference: " + ", ".join(f"{k} {v:.2f}x" for k, v in ref_row.items()))
    if args.json:
        payload = {"device": name, "device_type": dev.type, "config": label, "size": [w, h],
                   "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
                   "results_ms": results, "graph_variants_ms": graph_results,
                   "reference_tf32_h100_ms": REFERENCE_TF32_H100,
                   "ratio_tf32_to_reference": ref_row}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
