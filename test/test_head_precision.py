"""Reduced-precision DPT heads (``runtime.head_precision``, ``Mast3rModel.set_head_precision``).

bf16/fp16 heads are not bit-identical to float32 heads, so (spec ``mast3r_network.md`` §8.3: "check it on the task")
the tests assert the output invariants, a bounded pointmap deviation and the agreement of mutual-nearest-neighbour
descriptor matches with the float32 heads on the tiny keyed fixture (``test/data/mast3r_tiny_96x64``, real image pair).
Measured on the CPU (torch 2.13, 96x64, asym pair): relative pointmap error bf16 7.3e-2 / fp16 8.3e-3, conf 1.3e-2 /
2.0e-3, desc max abs 5.2e-3 / 6.2e-4; MNN agreement bf16 0.991 / fp16 1.000 (of 1937 float32 matches). The bounds below
keep about 2x margin on the errors and 0.95 / 0.98 on the agreement. Switching back to fp32 must restore the exact
float32 outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mast3r_slam_ros.network.graphs import GraphedPredictor, load_predictor
from mast3r_slam_ros.network.heads import cast_head_
from mast3r_slam_ros.network.keyed import keyed_model
from mast3r_slam_ros.network.model import Mast3rConfig, Mast3rModel
from mast3r_slam_ros.network.precision import check_head_precision, head_dtype

FIXTURE = Path(__file__).resolve().parent / "data" / "mast3r_tiny_96x64"
FIELDS = ("pts3d", "conf", "desc", "desc_conf")

#: (relative pointmap error, relative conf error, desc max abs error, MNN agreement) bounds per head precision
BOUNDS = {"bf16": (0.15, 0.03, 1.2e-2, 0.95), "fp16": (0.02, 5e-3, 1.5e-3, 0.98)}


def _image(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)


@pytest.fixture(scope="module")
def fixture():
    """Keyed tiny model (hash-checked) and its encoded real image pair."""
    ref = np.load(FIXTURE / "reference.npz")
    meta = json.loads((FIXTURE / "meta.json").read_text(encoding="utf-8"))
    model, digest = keyed_model(Mast3rConfig.tiny(), precision="fp32")
    assert digest == meta["weights_sha256"]
    model.eval()
    shape = torch.from_numpy(ref["true_shape"])
    f1, p1 = model.encode(_image(ref["img1_u8"]), shape)
    f2, p2 = model.encode(_image(ref["img2_u8"]), shape)
    return model, (f1, p1, f2, p2, shape)


_OUTPUTS: dict = {}


def _decode(model: Mast3rModel, inputs, head_precision: str):
    """``model.decode(*inputs)`` with the given head precision (memoised per precision: CPU fp16 convs are slow)."""
    if head_precision not in _OUTPUTS:
        model.set_head_precision(head_precision)
        try:
            _OUTPUTS[head_precision] = model.decode(*inputs)
        finally:
            model.set_head_precision("fp32")
    return _OUTPUTS[head_precision]


def _mnn(d1: torch.Tensor, d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of two descriptor maps ``[1,H,W,F]``: (index in view 2 per pixel of view 1 [HW],
    mutual mask [HW])."""
    a = d1.reshape(-1, d1.shape[-1]).double()
    b = d2.reshape(-1, d2.shape[-1]).double()
    s = a @ b.T
    j = s.argmax(1)
    i = s.argmax(0)
    return j, i[j] == torch.arange(len(a))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("hp", ["bf16", "fp16"])
def test_reduced_heads_invariants_and_task_agreement(fixture, hp):
    model, inputs = fixture
    ref = _decode(model, inputs, "fp32")
    out = _decode(model, inputs, hp)
    max_pts, max_conf, max_desc, min_agree = BOUNDS[hp]
    for r, o in zip(ref, out):
        for f in FIELDS:
            x, y = getattr(o, f), getattr(r, f)
            assert x.dtype == torch.float32 and x.shape == y.shape, f
            assert torch.isfinite(x).all(), f
        assert torch.all(o.conf >= 1) and torch.all(o.desc_conf > 0)
        torch.testing.assert_close(o.desc.norm(dim=-1), torch.ones_like(o.conf), rtol=0, atol=1e-5)
        assert _rel(o.pts3d, r.pts3d) <= max_pts
        assert _rel(o.conf, r.conf) <= max_conf
        assert float((o.desc - r.desc).abs().max()) <= max_desc
        assert _rel(o.desc_conf, r.desc_conf) <= max_conf
    j_ref, m_ref = _mnn(ref[0].desc, ref[1].desc)
    j_red, m_red = _mnn(out[0].desc, out[1].desc)
    assert int(m_ref.sum()) > 1000  # a meaningful number of matches on the 96x64 pair
    agree = float(((j_ref == j_red) & m_ref & m_red).sum() / m_ref.sum())
    assert agree >= min_agree, agree


def test_head_weights_cast_and_restored_exactly(fixture):
    model, inputs = fixture
    ref = _decode(model, inputs, "fp32")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_head_precision("bf16")
    try:
        h = model.downstream_head1
        assert h.dpt.act_postprocess[0][0].weight.dtype == torch.bfloat16
        assert h.dpt.scratch.refinenet1.resConfUnit1.conv1.weight.dtype == torch.bfloat16
        assert h.dpt.head[0].weight.dtype == torch.bfloat16
        assert h.head_local_features.fc2.weight.dtype == torch.bfloat16
        assert h.dpt.head[-1].weight.dtype == torch.float32  # final output conv stays float32
        assert model.enc_blocks[0].attn.qkv.weight.dtype == torch.float32  # trunk untouched
        with pytest.raises(RuntimeError, match="set_head_precision"):
            model.load_state_dict(sd)
        # bf16 -> fp16 re-casts from the float32 copy (no double rounding through bf16)
        model.set_head_precision("fp16")
        for k, v in model.state_dict().items():
            reduced = k.startswith("downstream_head") and ".dpt.head.4." not in k  # all Conv/Linear params
            want = sd[k].to(torch.float16) if reduced else sd[k]
            assert v.dtype == want.dtype and torch.equal(v, want), k
        n_half = sum(v.dtype == torch.float16 for v in model.state_dict().values())
        assert n_half > 0
    finally:
        model.set_head_precision("fp32")
    for k, v in model.state_dict().items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    again = model.decode(*inputs)
    for a, b in zip(ref, again):
        for f in FIELDS:
            assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_channels_last_kept_by_head_cast():
    torch.manual_seed(0)
    model = Mast3rModel.from_config("tiny").eval()
    model.downstream_head1.to(memory_format=torch.channels_last)
    model.set_head_precision("fp16")
    w = model.downstream_head1.dpt.scratch.layer1_rn.weight
    assert w.dtype == torch.float16 and w.is_contiguous(memory_format=torch.channels_last)
    assert model.downstream_head1.dpt.scratch.layer_rn[0].weight is w  # aliases still shared


def test_head_precision_validation():
    assert check_head_precision(" BF16 ") == "bf16"
    assert head_dtype("fp16") == torch.float16
    for bad in ("tf32", "fp8", ""):
        with pytest.raises(ValueError, match="head_precision"):
            check_head_precision(bad)
    with pytest.raises(TypeError):
        check_head_precision(16)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cast_head_(torch.nn.Linear(2, 2), torch.bfloat16)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = Mast3rModel.from_config("tiny").eval()
    with pytest.raises(ValueError):
        cast_head_(model.downstream_head1, torch.float64)
    with pytest.raises(ValueError, match="head_precision"):
        model.set_head_precision("int8")
    with pytest.raises(ValueError, match="head_precision"):
        load_predictor("/nonexistent/ckpt.pth", device="cpu", head_precision="tf32")  # checked before loading


def test_graphed_predictor_applies_head_precision_on_cpu():
    torch.manual_seed(0)
    model = Mast3rModel.from_config("tiny").eval()
    img = torch.rand(1, 3, 32, 48) * 2 - 1
    f, p = model.encode(img, (32, 48))
    model.set_head_precision("bf16")
    ref = model.decode(f, p, f, p, (32, 48))
    model.set_head_precision("fp32")
    gp = GraphedPredictor(model, head_precision="bf16", heads_channels_last=False)
    try:
        assert gp.head_precision == "bf16" and model.head_precision == "bf16"
        out = gp.decode(f, p, f, p, (32, 48))  # CPU: eager fallback of the same model
        for a, b in zip(ref, out):
            for fld in FIELDS:
                assert torch.equal(getattr(a, fld), getattr(b, fld)), fld
        with pytest.raises(ValueError, match="head_precision"):
            gp.set_head_precision("tf32")
    finally:
        gp.set_head_precision("fp32")
    assert model.head_precision == "fp32"
    with pytest.raises(ValueError, match="set_head_precision"):
        GraphedPredictor(_NoHeads(), head_precision="bf16")


class _NoHeads:
    """A Predictor without ``set_head_precision``."""

    def encode(self, img, true_shape=None):
        raise NotImplementedError

    def decode(self, *a, **k):
        raise NotImplementedError


def test_side_stream_needs_cuda(fixture):
    model, (f1, p1, f2, p2, _) = fixture
    with pytest.raises(ValueError, match="CUDA"):
        model.decoder_tokens(f1, p1, f2, p2, side_stream=object())


@pytest.mark.cuda
@pytest.mark.parametrize("hp", ["bf16", "fp16"])
def test_graphed_reduced_heads_vs_eager_fp32_on_cuda(hp):
    """Graphed bf16 trunk + reduced heads vs the eager fp32 model, same bounds as on the CPU (plus the bf16 trunk's
    envelope for pointmaps, spec §8.3: 9.9e-2); the graph replays and the reduced heads give the invariants."""
    ref_np = np.load(FIXTURE / "reference.npz")
    model, _ = keyed_model(Mast3rConfig.tiny(), precision="fp32")
    model = model.to("cuda").eval()
    shape = torch.from_numpy(ref_np["true_shape"])
    img1, img2 = _image(ref_np["img1_u8"]).cuda(), _image(ref_np["img2_u8"]).cuda()
    f1, p1 = model.encode(img1, shape)
    f2, p2 = model.encode(img2, shape)
    ref = model.decode(f1, p1, f2, p2, shape)
    model.set_precision("fp16" if hp == "fp16" else "bf16")
    gp = GraphedPredictor(model, head_precision=hp)
    for _ in range(2):  # capture, replay
        g1, q1 = gp.encode(img1, shape)
        g2, q2 = gp.encode(img2, shape)
        out = gp.decode(g1, q1, g2, q2, shape)
    assert gp.stats.captured == 2 and not gp.stats.failed
    max_pts = 0.25 if hp == "bf16" else 0.05
    for r, o in zip(ref, out):
        for f in FIELDS:
            assert getattr(o, f).dtype == torch.float32 and torch.isfinite(getattr(o, f)).all(), f
        assert torch.all(o.conf >= 1) and torch.all(o.desc_conf > 0)
        torch.testing.assert_close(o.desc.norm(dim=-1), torch.ones_like(o.conf), rtol=0, atol=1e-5)
        assert _rel(o.pts3d, r.pts3d) <= max_pts
    j_ref, m_ref = _mnn(ref[0].desc.cpu(), ref[1].desc.cpu())
    j_red, m_red = _mnn(out[0].desc.cpu(), out[1].desc.cpu())
    agree = float(((j_ref == j_red) & m_ref & m_red).sum() / m_ref.sum())
    assert agree >= 0.9, agree
