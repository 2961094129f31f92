"""The fast GPU preset (``config/slam_fast.yaml``: bf16 trunk + bf16 DPT heads, CUDA graphs, fused RoPE) against the
full-size reference fixture of the original network (keyed weights, ``test/data/mast3r_full_512x384``).

Spec ``mast3r_network.md`` §8.3: bf16 is not compared against the fp32 bounds; its measured envelope (bf16 autocast for
encoder and decoder, fp32 heads) is tokens 2.4e-2, pts3d/conf 9.9e-2, desc 1.6e-2 (max abs), desc_conf 2.3e-2, and the
spec asks to check bf16 on the task as well. This test asserts the invariants, bounds with ~2x margin over what the
preset measured on an H100 (printed with ``-s``), and the task-level agreement of mutual-nearest-neighbour descriptor
matches with the fp32 run of the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parent / "data" / "mast3r_full_512x384"

#: bounds for the preset. Measured on an H100 (issue 8, docs/perf_logs/h100_s2_fast_preset_parity.txt): pts3d 0.104 /
#: 0.062 (views 1 / 2; the spec's bf16 envelope with fp32 heads is 0.099), conf 0.029 / 0.0088, desc 0.0138 / 0.0158
#: (envelope 0.016), desc_conf 0.0151 / 0.0149 (envelope 0.023); about 2x margin here.
BOUNDS = {"pts3d": 0.2, "conf": 0.2, "desc": 0.035, "desc_conf": 0.05}
#: measured 0.717 of the 46 fp32 mutual-NN matches (keyed random weights give few, weakly distinctive matches; random
#: descriptors would agree on ~0)
MIN_MNN_AGREEMENT = 0.6


def _mnn(da: torch.Tensor, db: torch.Tensor) -> set[tuple[int, int]]:
    """Mutual nearest neighbours of two descriptor sets ``[n,F]`` (dot product)."""
    s = da @ db.T
    ab, ba = s.argmax(1), s.argmax(0)
    keep = ba[ab] == torch.arange(len(da), device=da.device)
    return {(int(i), int(j)) for i, j in zip(torch.nonzero(keep).flatten().tolist(), ab[keep].tolist())}


@pytest.mark.cuda
@pytest.mark.slow
def test_fast_preset_against_the_full_fixture():
    from mast3r_slam_ros.network.graphs import GraphedPredictor
    from mast3r_slam_ros.network.keyed import keyed_model
    from mast3r_slam_ros.network.model import Mast3rConfig

    dev = torch.device("cuda")
    ref = np.load(DATA / "reference.npz")
    meta = json.loads((DATA / "meta.json").read_text(encoding="utf-8"))
    model, digest = keyed_model(Mast3rConfig.full(), precision="fp32")
    assert digest == meta["weights_sha256"]
    model = model.to(dev).eval()
    imgs = [torch.from_numpy(ref[k]).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5).to(dev)
            for k in ("img1_u8", "img2_u8")]
    shape = torch.from_numpy(ref["true_shape"])
    subset = torch.from_numpy(ref["pixel_subset_flat_idx"]).to(dev)

    def run(net):
        with torch.inference_mode():
            (f1, p1), (f2, p2) = net.encode(imgs[0], shape), net.encode(imgs[1], shape)
            return net.decode(f1, p1, f2, p2, shape)

    prev_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = run(model)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
    model.set_precision("bf16")
    fast = run(GraphedPredictor(model, head_precision="bf16"))

    errors = {}
    for branch, res in (("1", fast[0]), ("2", fast[1])):
        for field in ("pts3d", "conf", "desc", "desc_conf"):
            ours = getattr(res, field)[0].reshape(-1, *getattr(res, field).shape[3:])[subset].double().cpu().numpy()
            key = f"asym_res{branch}_{field}_subset"
            r = ref[key].astype(np.float64)
            err = float(np.abs(ours - r).max()) if field == "desc" else float(np.abs(ours - r).max() / np.abs(r).max())
            errors[key] = err
            assert np.isfinite(ours).all(), key
        assert torch.all(res.conf >= 1) and torch.all(res.desc_conf > 0)
        assert torch.allclose(res.desc.norm(dim=-1), torch.ones((), device=dev), atol=1e-2)
    # task: mutual-NN matches between the two views on a 4-pixel grid, fast preset vs fp32 of the same model
    step = 4
    da32 = fp32[0].desc[0, ::step, ::step].reshape(-1, 24).float()
    db32 = fp32[1].desc[0, ::step, ::step].reshape(-1, 24).float()
    dab = fast[0].desc[0, ::step, ::step].reshape(-1, 24).float()
    dbb = fast[1].desc[0, ::step, ::step].reshape(-1, 24).float()
    m32, mfast = _mnn(da32, db32), _mnn(dab, dbb)
    agreement = len(m32 & mfast) / max(1, len(m32))
    print("fast preset vs fixture:", {k: f"{v:.3g}" for k, v in errors.items()},
          f"MNN agreement {agreement:.3f} of {len(m32)} fp32 matches")
    for key, err in errors.items():
        field = key.split("_res")[1][2:].replace("_subset", "")
        assert err <= BOUNDS[field], f"{key}: {err:.3g} > {BOUNDS[field]}"
    assert len(m32) >= 30 and agreement >= MIN_MNN_AGREEMENT
