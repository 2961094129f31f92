"""network/graphs.py: the graphed predictor must give the eager model's outputs (CPU fallback everywhere, CUDA graphs
on a GPU), the bf16 trunk cast must equal autocast with float32 weights and be undone exactly, and the tracker's graphed
Gauss-Newton loop must match its eager loop."""

from __future__ import annotations

import pytest
import torch

from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.network.graphs import GraphedPredictor, cast_trunk_, graphed_function
from mast3r_slam_ros.network.model import Mast3rModel
from mast3r_slam_ros.slam import tracker as tracker_mod

H, W = 32, 48


def _model(device: str = "cpu") -> Mast3rModel:
    torch.manual_seed(0)
    return Mast3rModel.from_config("tiny", device=device).eval()


def _inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    img1 = (torch.rand(1, 3, H, W, generator=g) * 2 - 1).to(device)
    img2 = torch.roll(img1, 5, dims=-1)
    return img1, img2, torch.tensor([[H, W]], dtype=torch.int32)


def _assert_same(a, b, atol=0.0):
    for name in ("pts3d", "conf", "desc", "desc_conf"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0.0, atol=atol, msg=name)


def test_cpu_fallback_equals_model_and_delegates():
    model = _model()
    gp = GraphedPredictor(model)
    img1, img2, shape = _inputs()
    f1, p1 = model.encode(img1, shape)
    f2, p2 = model.encode(img2, shape)
    g1, q1 = gp.encode(img1, shape)
    assert torch.equal(f1, g1) and torch.equal(p1, q1)
    r1, r2 = model.decode(f1, p1, f2, p2, shape)
    s1, s2 = gp.decode(f1, p1, f2, p2, shape)
    _assert_same(r1, s1)
    _assert_same(r2, s2)
    m1, m2 = gp.decode(f1, p1, f1, p1, shape, need_res2=False, need_desc=False)
    assert m2 is None and m1.desc is None
    assert gp.stats.captured == 0 and gp.stats.eager >= 3  # no CUDA graphs on the CPU
    assert gp.config is model.config  # attribute delegation


def test_bf16_trunk_cast_equals_autocast_and_is_undone():
    model = _model()
    img1, img2, shape = _inputs()
    ref_params = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_precision("bf16")
    ref_feat, _ = model.encode(img1, shape)  # autocast with float32 weights
    gp = GraphedPredictor(model)  # model precision bf16 -> trunk Linear/Conv weights stored in bf16
    assert model.enc_blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.enc_blocks[0].norm1.weight.dtype == torch.float32  # LayerNorms stay float32
    assert model.downstream_head1.dpt.head[0].weight.dtype == torch.float32  # heads stay float32
    feat, _ = gp.encode(img1, shape)
    assert torch.equal(feat, ref_feat)  # autocast casts the weights to the same bf16 values
    gp.set_precision("fp32")
    for k, v in model.state_dict().items():
        assert v.dtype == ref_params[k].dtype and torch.equal(v, ref_params[k]), k


def test_cast_trunk_rejects_non_mast3r():
    with pytest.raises(ValueError, match="trunk module"):
        cast_trunk_(torch.nn.Linear(2, 2), torch.bfloat16)


def test_graphed_function_unavailable_on_cpu():
    assert graphed_function(("x",), lambda a: a * 2, [torch.ones(3)]) is None


def _tracking_problem(device: str):
    g = torch.Generator().manual_seed(3)
    n = 4096
    Xf = torch.randn(n, 3, generator=g) * 0.5 + torch.tensor([0.0, 0.0, 3.0])
    T_true = Sim3.exp(torch.tensor([[0.05, -0.02, 0.03, 0.01, -0.02, 0.015, 0.02]]))
    Xk = T_true.act(Xf) * (1 + 0.001 * torch.randn(n, 1, generator=g))
    Q = torch.rand(n, 1, generator=g) * 5 + 1
    valid = torch.rand(n, 1, generator=g) > 0.1
    return [t.to(device) for t in (Xf, Xk, Q, valid)], T_true


@pytest.mark.cuda
def test_graphed_predictor_matches_eager_on_cuda():
    model = _model("cuda")
    img1, img2, shape = _inputs("cuda")
    model.set_precision("tf32")
    f1, p1 = model.encode(img1, shape)
    f2, p2 = model.encode(img2, shape)
    r1, r2 = model.decode(f1, p1, f2, p2, shape)
    gp = GraphedPredictor(model, heads_channels_last=False, parallel_heads=True)
    for _ in range(2):  # capture, then replay
        g1, _ = gp.encode(img1, shape)
        s1, s2 = gp.decode(f1, p1, f2, p2, shape)
    assert gp.stats.captured == 2 and gp.stats.replays >= 2 and not gp.stats.failed
    torch.testing.assert_close(g1, f1, rtol=0, atol=0)
    _assert_same(r1, s1)
    _assert_same(r2, s2)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_decoder_streams_graph_bit_identical_on_cuda(precision):
    """Decoder branch 2 on a side stream (joined per layer) inside the graph == the sequential decoder graph == the
    eager model, bit for bit (same kernels), with and without parallel heads and for the mono (need_res2=False)
    decode."""
    model = _model("cuda")
    img1, img2, shape = _inputs("cuda")
    model.set_precision(precision)
    outs = {}
    for ds in (False, True):
        for ph in (False, True):
            gp = GraphedPredictor(model, decoder_streams=ds, parallel_heads=ph)
            f1, p1 = gp.encode(img1, shape)
            f2, p2 = gp.encode(img2, shape)
            for _ in range(2):  # capture, then replay
                pair = gp.decode(f1, p1, f2, p2, shape)
                mono = gp.decode(f1, p1, f1, p1, shape, need_res2=False, need_desc=False)
            assert gp.stats.captured == 3 and not gp.stats.failed
            outs[(ds, ph)] = (pair, mono)
            gp.set_precision("fp32")  # undo the trunk cast before the next wrapper
            model.set_precision(precision)
    eager = model.decode(f1, p1, f2, p2, shape)
    for key, (pair, mono) in outs.items():
        ref_pair, ref_mono = outs[(False, False)]
        for a, b in zip(pair, ref_pair):
            _assert_same(a, b)
        _assert_same(mono[0], ref_mono[0])
        assert mono[1] is None
        if precision == "tf32":  # bf16: the eager model autocasts float32 weights (same values, checked elsewhere)
            for a, b in zip(pair, eager):
                _assert_same(a, b)


@pytest.mark.cuda
def test_tracker_graphed_gn_matches_eager_on_cuda():
    (Xf, Xk, Q, valid), T_true = _tracking_problem("cuda")
    T0 = Sim3.identity(1, device="cuda")
    fast = tracker_mod.opt_pose_ray_dist_sim3(Xf, Xk, T0, Q, valid)
    orig = tracker_mod._graphed_gn_loop
    tracker_mod._graphed_gn_loop = lambda *a, **k: None
    try:
        slow = tracker_mod.opt_pose_ray_dist_sim3(Xf, Xk, T0, Q, valid)
    finally:
        tracker_mod._graphed_gn_loop = orig
    assert fast.iterations == slow.iterations and fast.converged == slow.converged and fast.n_valid == slow.n_valid
    torch.testing.assert_close(fast.T.data, slow.T.data, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.T.data.cpu(), T_true.data, rtol=0, atol=5e-3)


def test_symmetric_batch_splits_decodes_into_the_predictors_graphed_batch():
    """Backend decodes are split into ``max_decode_batch`` pairs (graph replays instead of one eager batch of 2B) and
    give the same stacked outputs as one batch."""
    from mast3r_slam_ros.network.heads import HeadOutput
    from mast3r_slam_ros.network.inference import symmetric_batch

    class Fake:
        supports_batched_decode = True

        def __init__(self, max_decode_batch):
            self.max_decode_batch = max_decode_batch
            self.batches = []

        def decode(self, f1, p1, f2, p2, shape, **kw):
            self.batches.append(f1.shape[0])
            H, W = 2, 3
            v1 = (f1.sum((1, 2)) * 10 + f2.sum((1, 2)))[:, None, None]
            v2 = (f2.sum((1, 2)) * 10 + f1.sum((1, 2)))[:, None, None]
            out = []
            for v in (v1, v2):
                base = v.expand(-1, H, W)
                out.append(HeadOutput(base[..., None].expand(-1, H, W, 3).clone(), 1 + base.abs(),
                                      torch.nn.functional.normalize(base[..., None].expand(-1, H, W, 24) + 1, dim=-1),
                                      1 + base.abs()))
            return out[0], out[1]

    g = torch.Generator().manual_seed(0)
    fi, fj = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    pi = pj = torch.zeros(3, 4, 2, dtype=torch.long)
    shape = torch.tensor([[2, 3]])
    split, whole = Fake(2), Fake(None)
    a = symmetric_batch(split, fi, pi, fj, pj, shape)
    b = symmetric_batch(whole, fi, pi, fj, pj, shape)
    assert split.batches == [2, 2, 2] and whole.batches == [6]
    for name in ("X", "C", "D", "Q"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert GraphedPredictor.max_decode_batch.fget is not None
