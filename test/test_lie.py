"""Sim(3) tests against independent references: 4x4 matrix algebra, scipy.linalg.expm, scipy Rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.transform import Rotation

from mast3r_slam_ros.lie import Sim3, act_jacobian, skew

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_xi(n: int, seed: int = 0, dtype=F64, max_angle: float = 3.0) -> torch.Tensor:
    """Random tangent vectors with |ω| uniform in [0, max_angle], σ in [-1, 1], τ ~ N(0, 1)."""
    g = _gen(seed)
    tau = torch.randn(n, 3, generator=g, dtype=F64)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=F64), dim=-1)
    angle = torch.rand(n, 1, generator=g, dtype=F64) * max_angle
    sigma = torch.rand(n, 1, generator=g, dtype=F64) * 2 - 1
    return torch.cat((tau, axis * angle, sigma), dim=-1).to(dtype)


def random_sim3(n: int, seed: int = 0, dtype=F64) -> Sim3:
    """Random Sim(3) built without Sim3.exp: scipy-random rotation, random translation and positive scale."""
    rng = np.random.default_rng(seed)
    q = Rotation.random(n, random_state=rng).as_quat()  # x, y, z, w
    t = rng.normal(size=(n, 3)) * 2
    s = np.exp(rng.uniform(-1, 1, size=(n, 1)))
    return Sim3(torch.tensor(np.concatenate((t, q, s), axis=1), dtype=dtype))


def ref_matrix(T: Sim3) -> np.ndarray:
    """Independent 4x4 of T from scipy's quaternion -> matrix."""
    d = T.data.detach().double().reshape(-1, 8).numpy()
    out = np.zeros((d.shape[0], 4, 4))
    out[:, :3, :3] = d[:, 7, None, None] * Rotation.from_quat(d[:, 3:7]).as_matrix()
    out[:, :3, 3] = d[:, :3]
    out[:, 3, 3] = 1.0
    return out.reshape(*T.shape, 4, 4)


def ref_hat(xi: np.ndarray) -> np.ndarray:
    tau, w, s = xi[:3], xi[3:6], xi[6]
    W = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    M = np.zeros((4, 4))
    M[:3, :3] = W + s * np.eye(3)
    M[:3, 3] = tau
    return M


def ref_exp(xi: torch.Tensor) -> np.ndarray:
    """Matrix exponential of hat(xi) with scipy.linalg.expm (independent of the closed forms)."""
    x = xi.detach().double().reshape(-1, 7).numpy()
    return np.stack([scipy.linalg.expm(ref_hat(v)) for v in x]).reshape(*xi.shape[:-1], 4, 4)


def special_xi(dtype=F64) -> torch.Tensor:
    """Branch-covering tangents: |ω| in {0, 1e-9, 1e-7, 1e-5, 1e-3, 0.2, 1, π-1e-6}, σ in {0, ±1e-8, 1e-3, 0.5, -1.5}."""
    g = _gen(7)
    rows = []
    for th in (0.0, 1e-9, 1e-7, 5e-7, 1e-5, 1e-3, 0.2, 0.3, 1.0, 2.5, math.pi - 1e-3, math.pi - 1e-6):
        for sg in (0.0, 1e-8, -1e-8, 1e-3, 0.2, 0.5, -1.5):
            axis = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=F64), dim=0)
            tau = torch.randn(3, generator=g, dtype=F64)
            rows.append(torch.cat((tau, axis * th, torch.tensor([sg], dtype=F64))))
    return torch.stack(rows).to(dtype)


# --------------------------------------------------------------------------------------------------- round trips
def test_inverse_round_trip():
    T = random_sim3(64, seed=1)
    eye = Sim3.identity(64, dtype=F64).data
    assert torch.allclose((T.inv() * T).data, eye, atol=1e-12)
    assert torch.allclose((T * T.inv()).data, eye, atol=1e-12)
    np.testing.assert_allclose(T.inv().matrix().numpy(), np.linalg.inv(ref_matrix(T)), atol=1e-12)


def test_exp_log_round_trip_random_elements():
    T = random_sim3(128, seed=2)
    T2 = Sim3.exp(T.log())
    np.testing.assert_allclose(T2.matrix().numpy(), ref_matrix(T), atol=1e-11)
    # the quaternion of exp(log(T)) is T's up to sign
    q1, q2 = T.rotation(), T2.rotation()
    assert torch.allclose(q1 * torch.sign((q1 * q2).sum(-1, keepdim=True)), q2, atol=1e-12)


@pytest.mark.parametrize("which", ["random", "special"])
def test_log_exp_round_trip(which):
    xi = random_xi(256, seed=3) if which == "random" else special_xi()
    back = Sim3.exp(xi).log()
    assert torch.allclose(back, xi, atol=1e-10, rtol=0), (back - xi).abs().max()


def test_log_exp_small_angle_and_zero_sigma_is_exact():
    g = _gen(4)
    xi = torch.randn(50, 7, generator=g, dtype=F64)
    xi[:, 3:6] *= torch.logspace(-12, -6.5, 50, dtype=F64)[:, None]  # |ω| < 1e-6
    xi[::2, 6] = 0.0  # σ = 0
    back = Sim3.exp(xi).log()
    assert torch.allclose(back, xi, atol=1e-14, rtol=1e-10)


def test_log_near_pi_and_negative_w():
    g = _gen(5)
    axis = torch.nn.functional.normalize(torch.randn(20, 3, generator=g, dtype=F64), dim=-1)
    angle = math.pi - torch.logspace(-9, -2, 20, dtype=F64)
    xi = torch.cat((torch.randn(20, 3, generator=g, dtype=F64), axis * angle[:, None],
                    torch.randn(20, 1, generator=g, dtype=F64) * 0.3), dim=-1)
    T = Sim3.exp(xi)
    assert torch.allclose(T.log(), xi, atol=1e-8)
    # store -q (w < 0): same element; log must return the |ω| <= π representative
    neg = T.data.clone()
    neg[:, 3:7] *= -1
    xi_neg = Sim3(neg).log()
    assert torch.all(xi_neg[:, 3:6].norm(dim=-1) <= math.pi + 1e-12)
    np.testing.assert_allclose(Sim3.exp(xi_neg).matrix().numpy(), ref_matrix(T), atol=1e-9)
    # rotation by more than π expressed via exp: log returns the equivalent 2π - θ rotation
    big = torch.cat((torch.zeros(1, 3, dtype=F64), torch.tensor([[0.0, 0.0, 4.0]], dtype=F64),
                     torch.zeros(1, 1, dtype=F64)), dim=-1)
    w = Sim3.exp(big).log()[0, 3:6]
    assert torch.allclose(w, torch.tensor([0.0, 0.0, 4.0 - 2 * math.pi], dtype=F64), atol=1e-12)


# ------------------------------------------------------------------------------------------ against references
@pytest.mark.parametrize("which", ["random", "special"])
def test_exp_matches_matrix_exponential(which):
    xi = random_xi(64, seed=6) if which == "random" else special_xi()
    np.testing.assert_allclose(Sim3.exp(xi).matrix().numpy(), ref_exp(xi), atol=1e-12, rtol=1e-12)


def test_act_equals_homogeneous_matrix_product():
    T = random_sim3(16, seed=8)
    X = torch.randn(16, 100, 3, generator=_gen(8), dtype=F64)
    M = ref_matrix(T)
    Xh = np.concatenate((X.numpy(), np.ones((16, 100, 1))), axis=-1)
    ref = np.einsum("bij,bnj->bni", M, Xh)[..., :3]
    np.testing.assert_allclose(T[:, None].act(X).numpy(), ref, atol=1e-12)


def test_composition_equals_matrix_product():
    A, B = random_sim3(32, seed=9), random_sim3(32, seed=10)
    np.testing.assert_allclose((A * B).matrix().numpy(), ref_matrix(A) @ ref_matrix(B), atol=1e-12)
    C = random_sim3(32, seed=11)
    assert torch.allclose(((A * B) * C).data, (A * (B * C)).data, atol=1e-12)


def test_matrix_and_rotation_agree_with_scipy():
    xi = random_xi(64, seed=12)
    T = Sim3.exp(xi)
    R_ref = Rotation.from_rotvec(xi[:, 3:6].numpy())
    np.testing.assert_allclose(T.rotation_matrix().numpy(), R_ref.as_matrix(), atol=1e-12)
    q_ref = torch.tensor(R_ref.as_quat())  # scipy: (x, y, z, w)
    q = T.rotation()
    assert torch.allclose(q * torch.sign((q * q_ref).sum(-1, keepdim=True)), q_ref, atol=1e-12)
    # and the other way: log's ω is scipy's rotation vector (|ω| <= π)
    T2 = random_sim3(64, seed=13)
    rv = Rotation.from_quat(T2.data[:, 3:7].numpy()).as_rotvec()
    np.testing.assert_allclose(T2.log()[:, 3:6].numpy(), rv, atol=1e-10)
    np.testing.assert_allclose(T2.scale().numpy(), T2.data[:, 7:8].numpy())
    np.testing.assert_allclose(T2.translation().numpy(), T2.data[:, :3].numpy())


def test_adjoint_identity():
    T = random_sim3(32, seed=14)
    xi = random_xi(32, seed=15, max_angle=2.0) * 0.5
    lhs = Sim3.exp((T.adjoint() @ xi.unsqueeze(-1)).squeeze(-1)).matrix().numpy()
    M = ref_matrix(T)
    rhs = M @ ref_exp(xi) @ np.linalg.inv(M)
    np.testing.assert_allclose(lhs, rhs, atol=1e-10)
    # infinitesimal version: T hat(ξ) T⁻¹ = hat(Ad ξ)
    hat_ad = np.stack([ref_hat(v) for v in T.adj(xi).numpy()])
    hat_x = np.stack([ref_hat(v) for v in xi.numpy()])
    np.testing.assert_allclose(hat_ad, M @ hat_x @ np.linalg.inv(M), atol=1e-11)
    assert torch.allclose(T.adjT(xi), (T.adjoint().transpose(-1, -2) @ xi[..., None])[..., 0])


def test_retr_is_left_multiplication():
    T = random_sim3(32, seed=16)
    xi = random_xi(32, seed=17) * 0.3
    np.testing.assert_allclose(T.retr(xi).matrix().numpy(), ref_exp(xi) @ ref_matrix(T), atol=1e-11)
    assert torch.allclose(T.retr(xi).data, (Sim3.exp(xi) * T).data, atol=1e-14)


def test_act_jacobian_finite_difference():
    T = random_sim3(4, seed=18)
    p = torch.randn(4, 3, generator=_gen(18), dtype=F64)
    J = act_jacobian(T.act(p))
    eps = 1e-6
    for k in range(7):
        d = torch.zeros(4, 7, dtype=F64)
        d[:, k] = eps
        num = (T.retr(d).act(p) - T.retr(-d).act(p)) / (2 * eps)
        assert torch.allclose(J[..., k], num, atol=1e-8)


def test_autograd_at_identity_is_finite_and_matches_act_jacobian():
    T = random_sim3(1, seed=30)[0]
    p = torch.randn(3, generator=_gen(30), dtype=F64)
    J = torch.autograd.functional.jacobian(lambda xi: T.retr(xi).act(p), torch.zeros(7, dtype=F64))
    assert torch.isfinite(J).all()
    assert torch.allclose(J, act_jacobian(T.act(p)), atol=1e-12)
    xi = torch.zeros(4, 7, dtype=F64, requires_grad=True)
    Sim3.exp(xi).log().sum().backward()
    assert torch.isfinite(xi.grad).all()


def test_skew_is_cross_product():
    a, b = torch.randn(2, 10, 3, generator=_gen(19), dtype=F64)
    np.testing.assert_allclose((skew(a) @ b[..., None])[..., 0].numpy(), np.cross(a.numpy(), b.numpy()), atol=1e-14)
    with pytest.raises(ValueError):
        skew(torch.zeros(4))


# ------------------------------------------------------------------------------------------ batching / plumbing
def test_broadcasting():
    B, N = 3, 50
    T = random_sim3(B, seed=20)
    X = torch.randn(B, N, 3, generator=_gen(20), dtype=F64)
    out = T[:, None].act(X)
    assert out.shape == (B, N, 3)
    for b in range(B):
        assert torch.allclose(out[b], T[b].act(X[b]), atol=1e-14)
    # Sim3 [1] on [N,3], Sim3 [] on [N,3]
    assert torch.allclose(T[0:1].act(X[0]), T[0].act(X[0]))
    # composition [B,1] * [1,N] -> [B,N]
    U = random_sim3(4, seed=21)
    C = T[:, None] * U[None, :]
    assert C.shape == (B, 4)
    assert torch.allclose(C[1, 2].matrix(), T[1].matrix() @ U[2].matrix(), atol=1e-12)
    # exp / log / adjoint / matrix keep arbitrary leading dims
    xi = random_xi(24, seed=22).reshape(2, 3, 4, 7)
    E = Sim3.exp(xi)
    assert E.shape == (2, 3, 4) and E.log().shape == (2, 3, 4, 7)
    assert E.adjoint().shape == (2, 3, 4, 7, 7) and E.matrix().shape == (2, 3, 4, 4, 4)
    assert torch.allclose(E.log(), xi, atol=1e-10)


def test_float32_error_bounds():
    xi64 = torch.cat((random_xi(256, seed=23), special_xi()))
    xi32 = xi64.float()
    T32 = Sim3.exp(xi32)
    ref = ref_exp(xi64)
    scale = np.abs(ref).max(axis=(-1, -2), keepdims=True)
    assert np.max(np.abs(T32.matrix().double().numpy() - ref) / scale) < 2e-6
    assert T32.data.dtype == torch.float32
    # log(exp(ξ)) in float32 (away from π, where the representative is ill-defined at float32 resolution)
    keep = xi64[:, 3:6].norm(dim=-1) < 3.0
    err = (T32[keep].log().double() - xi64[keep]).abs().max().item()
    assert err < 5e-5, err
    # act / compose / inverse
    A64, B64 = random_sim3(64, seed=24), random_sim3(64, seed=25)
    A32, B32 = A64.float(), B64.float()
    X = torch.randn(64, 3, generator=_gen(24), dtype=F64)
    assert (A32.act(X.float()).double() - A64.act(X)).abs().max() < 1e-5 * (1 + A64.act(X).abs().max())
    assert ((A32 * B32).data.double() - (A64 * B64).data).abs().max() < 1e-4
    assert ((A32.inv() * A32).data - Sim3.identity(64).data).abs().max() < 1e-5
    assert not torch.isnan(Sim3.exp(torch.zeros(5, 7)).log()).any()


def test_quaternion_renormalised_after_composition_and_retr():
    T = Sim3.identity(1)
    g = _gen(26)
    for _ in range(500):
        T = T.retr(torch.randn(1, 7, generator=g) * 0.1) * Sim3.exp(torch.randn(1, 7, generator=g) * 0.1)
    assert abs(T.data[0, 3:7].norm().item() - 1.0) < 1e-6
    # a non-unit stored quaternion is read as its normalised version
    d = random_sim3(5, seed=27).data.clone()
    d2 = d.clone()
    d2[:, 3:7] *= 3.0
    assert torch.allclose(Sim3(d2).matrix(), Sim3(d).matrix(), atol=1e-12)
    assert torch.allclose((Sim3(d2) * Sim3(d2)).data[:, 3:7].norm(dim=-1), torch.ones(5, dtype=F64))


def test_identity_indexing_stack_cat_to_clone():
    I = Sim3.identity(2, 3, dtype=F64)
    assert I.shape == (2, 3) and I.dtype == F64
    assert torch.equal(I.matrix(), torch.eye(4, dtype=F64).expand(2, 3, 4, 4))
    assert Sim3.identity().shape == ()
    T = random_sim3(6, seed=28)
    assert T[2].shape == () and T[1:4].shape == (3,) and T[..., 0].shape == ()
    assert torch.equal(T[2].data, T.data[2])
    assert torch.equal(T[1:4].data, T.data[1:4])
    assert torch.equal(T[torch.tensor([0, 5])].data, T.data[[0, 5]])
    S = Sim3.stack([T[0], T[1]])
    assert S.shape == (2,) and torch.equal(S.data, T.data[:2])
    assert Sim3.stack([T, T], dim=1).shape == (6, 2)
    assert Sim3.stack([T, T], dim=-1).shape == (6, 2)
    C = Sim3.cat([T[:2], T[2:]], dim=0)
    assert torch.equal(C.data, T.data)
    assert len(T) == 6
    c = T.clone()
    c.data[0, 0] += 1
    assert not torch.equal(c.data, T.data)
    assert T.to(torch.float32).dtype == torch.float32
    T2 = T.clone()
    T2[0] = T[1]
    assert torch.equal(T2.data[0], T.data[1])


def test_bad_input_errors():
    with pytest.raises(ValueError):
        Sim3(torch.zeros(3, 7))
    with pytest.raises(TypeError):
        Sim3(torch.zeros(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError):
        Sim3.exp(torch.zeros(3, 6))
    with pytest.raises(ValueError):
        Sim3.identity(2).act(torch.zeros(2, 4))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    xi = random_xi(64, seed=29, dtype=torch.float32)
    T = Sim3.exp(xi.cuda())
    X = torch.randn(64, 10, 3)
    assert torch.allclose(T[:, None].act(X.cuda()).cpu(), Sim3.exp(xi)[:, None].act(X), atol=1e-5)
    assert torch.allclose(T.log().cpu(), Sim3.exp(xi).log(), atol=1e-5)


@pytest.mark.parametrize("scale", [1e-9, 1e-4, 0.1, 0.3, 1.0, 3.0])
def test_retr_host_equals_batched_retr(scale):
    from mast3r_slam_ros.lie import retr_host

    g = torch.Generator().manual_seed(int(scale * 1e9) % 1000 + 7)
    T = Sim3.exp(torch.randn(16, 7, generator=g, dtype=torch.float64))
    xi = torch.randn(16, 7, generator=g, dtype=torch.float64) * scale
    xi[0, 3:6] = 0.0  # pure translation + scale
    xi[1, 6] = 0.0  # no scale change
    ref = T.retr(xi).data
    got = torch.tensor([retr_host(T.data[i].tolist(), xi[i].tolist()) for i in range(16)], dtype=torch.float64)
    # q and -q are the same rotation: compare on the matrices and the translation/scale
    assert torch.allclose(got[:, :3], ref[:, :3], atol=1e-12, rtol=1e-12)
    assert torch.allclose(got[:, 7], ref[:, 7], rtol=1e-13)
    assert torch.allclose(Sim3(got).matrix(), Sim3(ref).matrix(), atol=1e-12)
    with pytest.raises(ValueError):
        retr_host([0.0] * 7, [0.0] * 7)
