#!/usr/bin/env python3
"""Benchmark the kernels (iter_proj, refine_matches, Gauss–Newton rays/calib/points), CUDA extension vs PyTorch.

Sizes (default): 512×384 images; matching at B = 1 and B = 8; one Gauss–Newton iteration (per-edge blocks, assembly,
Cholesky, retraction) at 10, 50 and 200 directed-edge pairs (2E = 20, 100, 400 directed edges, n = E/2 + 1 keyframes).
Timing: median (and min) over ``--repeats`` runs after ``--warmup`` runs, with CUDA events on a GPU, ``perf_counter``
on the CPU. Inputs are random but valid (smooth ray fields, unit descriptors, keyframes observing shared points).

Usage:
    python bench/kernels.py                     # GPU if available, both implementations
    python bench/kernels.py --small             # quick CPU run (96×64, B = 1/2, 2/4 edges, PyTorch only)
    python bench/kernels.py --json out.json     # also write the results
    python bench/kernels.py --impl torch --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from mast3r_slam_ros import kernels
from mast3r_slam_ros.kernels import _ext
from mast3r_slam_ros.lie import Sim3
from timing import timer


# ------------------------------------------------------------------------------------------------------ inputs
def matching_inputs(B: int, H: int, W: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    x = (u - W / 2) / (0.9 * W)
    y = (v - H / 2) / (0.9 * W)
    rays = torch.nn.functional.normalize(torch.stack([x, y, torch.ones_like(x)], 0), dim=0)[None].expand(B, 3, H, W)
    kx = torch.tensor([[-3.0, 0, 3], [-10, 0, 10], [-3, 0, 3]]) / 32
    p = torch.nn.functional.pad(rays, (1, 1, 1, 1), mode="reflect")
    gx = torch.nn.functional.conv2d(p, kx.expand(3, 1, 3, 3).contiguous(), groups=3)
    gy = torch.nn.functional.conv2d(p, kx.T.expand(3, 1, 3, 3).contiguous(), groups=3)
    img = torch.cat([rays, gx, gy], 1).permute(0, 2, 3, 1).contiguous()
    t = torch.nn.functional.normalize(img.reshape(B, H * W, 9)[..., :3]
                                      + 0.002 * torch.randn(B, H * W, 3, generator=g), dim=-1)
    p0 = torch.stack([u, v], -1).reshape(1, H * W, 2).expand(B, H * W, 2) + torch.randn(B, H * W, 2, generator=g)
    D11 = torch.nn.functional.normalize(torch.randn(B, H, W, 24, generator=g), dim=-1).half()
    D21 = torch.nn.functional.normalize(torch.randn(B, H * W, 24, generator=g), dim=-1).half()
    p1 = torch.stack([torch.randint(0, W, (B, H * W), generator=g), torch.randint(0, H, (B, H * W), generator=g)], -1)
    return {k: v.to(device).contiguous() for k, v in
            dict(img=img, t=t, p0=p0.float(), D11=D11, D21=D21, p1=p1).items()}


def gn_inputs(E: int, H: int, W: int, device: torch.device, seed: int = 0):
    """E undirected edges (2E directed), n = E//2 + 1 keyframes (at least 2), identity matches with 10 % outliers."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = max(2, E // 2 + 1)
    HW = H * W
    xi = torch.cat([(torch.rand(n, 3, generator=g) - 0.5) * 0.6, (torch.rand(n, 3, generator=g) - 0.5) * 0.16,
                    (torch.rand(n, 1, generator=g) - 0.5) * 0.4], -1)
    T = Sim3.exp(xi)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    z = 3.0 + 0.3 * torch.sin(u / W * 4) * torch.cos(v / H * 3)
    Pc = torch.stack([(u - W / 2) / (0.9 * W) * z, (v - H / 2) / (0.9 * W) * z, z], -1).reshape(HW, 3)
    Pw = T[0].act(Pc)
    Xs = torch.stack([T[k].inv().act(Pw) for k in range(n)]) + 1e-3 * torch.randn(n, HW, 3, generator=g)
    pairs = [(k, k + 1) for k in range(n - 1)][:E]
    while len(pairs) < E:
        a, b = sorted(torch.randint(0, n, (2,), generator=g).tolist())
        if a != b:
            pairs.append((a, b))
    ii = torch.tensor([a for a, b in pairs] + [b for a, b in pairs])
    jj = torch.tensor([b for a, b in pairs] + [a for a, b in pairs])
    E2 = len(ii)
    idx = torch.arange(HW).repeat(E2, 1)
    out = torch.rand(E2, HW, generator=g) < 0.1
    idx[out] = torch.randint(0, HW, (int(out.sum()),), generator=g)
    d0 = (torch.rand(n, 7, generator=g) - 0.5) * 0.05
    d0[0] = 0
    K = torch.tensor([[0.9 * W, 0, W / 2], [0, 0.9 * W, H / 2], [0, 0, 1]])
    res = dict(Twc=T.retr(d0).data, Xs=Xs, Cs=1.0 + 2 * torch.rand(n, HW, 1, generator=g), ii=ii, jj=jj, idx=idx,
               valid=torch.rand(E2, HW, 1, generator=g) < 0.9, Q=1.0 + 2 * torch.rand(E2, HW, 1, generator=g), K=K)
    return {k: v.to(device).contiguous() for k, v in res.items()}, n


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="quick CPU run at 96x64 (PyTorch only)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available, cpu with --small)")
    ap.add_argument("--impl", default="both", choices=("both", "cuda", "torch"))
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)

    dev_name = args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    device = torch.device(dev_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.small:
        H, W, batches, edges = 64, 96, (1, 2), (2, 4)
    else:
        H, W, batches, edges = 384, 512, (1, 8), (10, 50, 200)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    impls = []
    if args.impl in ("both", "torch"):
        impls.append("torch")
    if args.impl in ("both", "cuda"):
        if device.type == "cuda" and kernels.cuda_available():
            impls.append("cuda")
        elif args.impl == "cuda":
            print(f"CUDA extension unavailable: {_ext.load_error() or 'needs --device cuda'}", file=sys.stderr)
            return 2
        else:
            print(f"# cuda implementation skipped ({_ext.load_error() or 'CPU device'})")

    rows = []

    def record(kernel: str, impl: str, size: str, times: list[float]) -> None:
        row = dict(kernel=kernel, impl=impl, size=size, median_ms=statistics.median(times), min_ms=min(times),
                   repeats=len(times))
        rows.append(row)
        print(f"{kernel:<22} {impl:<6} {size:<28} {row['median_ms']:>10.2f} {row['min_ms']:>10.2f}", flush=True)

    print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()})"
          f", torch {torch.__version__}, repeats {repeats}, warmup {warmup}")
    print(f"{'kernel':<22} {'impl':<6} {'size':<28} {'median ms':>10} {'min ms':>10}")
    for B in batches:
        m = matching_inputs(B, H, W, device)
        for impl in impls:
            kernels.set_backend(impl)
            record("iter_proj(10 it)", impl, f"B={B} {W}x{H}",
                   timer(lambda: kernels.iter_proj(m["img"], m["t"], m["p0"], 10, 1e-8, 1e-6), device, warmup,
                         repeats))
            record("refine_matches(fp16)", impl, f"B={B} {W}x{H} r=3 d=5",
                   timer(lambda: kernels.refine_matches(m["D11"], m["D21"], m["p1"], 3, 5), device, warmup, repeats))
        m = None
    for E in edges:
        P, n = gn_inputs(E, H, W, device)
        for impl in impls:
            kernels.set_backend(impl)
            size = f"E={E} (2E={2 * E}) n={n} {W}x{H}"
            e = (P["ii"], P["jj"], P["idx"], P["valid"], P["Q"])
            c = dict(C_thresh=1.0, Q_thresh=1.5, max_iter=1, delta_thresh=1e-8)
            # every timed call starts from the same poses (the solve updates Twc in place; repeated steps from the
            # previous result would walk off on this random data)
            record("gn_rays (1 iter)", impl, size, timer(
                lambda: kernels.gauss_newton_rays(P["Twc"].clone(), P["Xs"], P["Cs"], *e, sigma_ray=0.003, sigma_dist=10.0, **c),
                device, warmup, repeats))
            record("gn_calib (1 iter)", impl, size, timer(
                lambda: kernels.gauss_newton_calib(P["Twc"].clone(), P["Xs"], P["Cs"], P["K"], *e, height=H, width=W,
                                                   pixel_border=-10, z_eps=0.1, sigma_pixel=1.0, sigma_depth=10.0,
                                                   **c), device, warmup, repeats))
            record("gn_points (1 iter)", impl, size, timer(
                lambda: kernels.gauss_newton_points(P["Twc"].clone(), P["Xs"], P["Cs"], *e, sigma_point=0.05, **c), device, warmup,
                repeats))
        P = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    kernels.set_backend("auto")
    if args.json:
        meta = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                    else platform.processor(), torch=torch.__version__, repeats=repeats, warmup=warmup, H=H, W=W)
        args.json.write_text(json.dumps(dict(meta=meta, results=rows), indent=2), encoding="utf-8")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
