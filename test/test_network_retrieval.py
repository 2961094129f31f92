"""Retrieval whitening / token selection (spec mast3r_network.md §6) against a numpy reference, safe codebook loading."""

from __future__ import annotations

import argparse
import os
import pickle
from math import erf, sqrt

import numpy as np
import pytest
import torch

from mast3r_slam_ros.network.loader import CheckpointError
from mast3r_slam_ros.network.model import Mast3rModel
from mast3r_slam_ros.network.retrieval import (
    attach_retrieval,
    codebook_path_for,
    load_codebook,
    load_retrieval,
)

D = 32


def _write_ckpt(path, sd, **args):
    torch.save({"model": sd, "args": argparse.Namespace(**args)}, path)


def _np_reference(feat, m, p, nfeat, proj=None, post=None):
    """Independent float64 numpy version of prewhiten -> projector -> attention -> postwhiten -> top-nfeat."""
    z = (feat.astype(np.float64) - m) @ p
    z = z.astype(np.float32).astype(np.float64)  # the whitener returns the input dtype (float32)
    h = z
    if proj is not None:
        w1, b1, g, beta, w2, b2 = proj
        a = h @ w1.T + b1
        mu = a.mean(-1, keepdims=True)
        var = a.var(-1, keepdims=True)
        a = (a - mu) / np.sqrt(var + 1e-5) * g + beta
        a = 0.5 * a * (1 + np.vectorize(erf)(a / sqrt(2)))
        h = a @ w2.T + b2
    attn = np.linalg.norm(h, axis=-1)
    if post is not None:
        h = (h - post[0]) @ post[1]
    order = np.argsort(-attn, kind="stable")[:nfeat]
    return h[order], attn[order]


def test_prewhiten_only_checkpoint(tmp_path):
    """The probable 'trainingfree' layout: prewhiten.{m,p} float64 only, hdims '' (spec §6.1)."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(1, D))
    p = rng.normal(size=(D, D)) / np.sqrt(D)
    sd = {"prewhiten.m": torch.from_numpy(m), "prewhiten.p": torch.from_numpy(p)}
    path = tmp_path / "X_retrieval_trainingfree.pth"
    _write_ckpt(path, sd, prewhiten=0, hdims="", residual=False, postwhiten=None, featweights="l2norm", nfeat=10,
                nclusters=64, freeze_backbone=1)
    head = load_retrieval(path, dim=D)
    assert head.prewhiten.m.dtype == torch.float64
    feat = rng.normal(size=(1, 50, D)).astype(np.float32)
    out = head.select(torch.from_numpy(feat))
    ref, _ = _np_reference(feat[0], m, p, 10)
    assert out.shape == (1, 10, D) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-6, atol=1e-6)
    # 2-D input and fewer tokens than nfeat
    out2 = head.select(torch.from_numpy(feat[0, :7]))
    assert out2.shape == (7, D)


def test_projector_postwhiten_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    m, p = rng.normal(size=(1, D)), rng.normal(size=(D, D)) / np.sqrt(D)
    w1, b1 = rng.normal(size=(16, D)) / 4, rng.normal(size=16) * 0.1
    g, beta = 1 + 0.1 * rng.normal(size=16), 0.1 * rng.normal(size=16)
    w2, b2 = rng.normal(size=(8, 16)) / 4, rng.normal(size=8) * 0.1
    pm, pp = rng.normal(size=(1, 8)), rng.normal(size=(8, 8))
    t32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    sd = {"prewhiten.m": torch.from_numpy(m), "prewhiten.p": torch.from_numpy(p),
          "projector.0.weight": t32(w1), "projector.0.bias": t32(b1), "projector.1.weight": t32(g),
          "projector.1.bias": t32(beta), "projector.3.weight": t32(w2), "projector.3.bias": t32(b2),
          "postwhiten.m": torch.from_numpy(pm), "postwhiten.p": torch.from_numpy(pp),
          "backbone.enc_norm.weight": torch.ones(D)}  # a backbone copy is ignored
    path = tmp_path / "r.pth"
    _write_ckpt(path, sd, prewhiten=0, hdims="16_8", residual=False, postwhiten=0, featweights="l2norm", nfeat=5)
    head = load_retrieval(path, dim=D)
    feat = rng.normal(size=(1, 40, D)).astype(np.float32)
    out = head.select(torch.from_numpy(feat))
    f32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731
    ref, _ = _np_reference(feat[0], m, p, 5, proj=(f32(w1), f32(b1), f32(g), f32(beta), f32(w2), f32(b2)),
                           post=(pm, pp))
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=2e-4, atol=2e-4)


def test_bad_retrieval_checkpoints(tmp_path):
    path = tmp_path / "bad.pth"
    _write_ckpt(path, {"prewhiten.m": torch.zeros(1, D, dtype=torch.float64)}, prewhiten=0, hdims="",
                postwhiten=None, featweights="l2norm", nfeat=10)
    with pytest.raises(CheckpointError, match="do not match"):
        load_retrieval(path, dim=D)
    _write_ckpt(path, {}, prewhiten=None, hdims="", postwhiten=None, featweights="gem", nfeat=10)
    with pytest.raises(CheckpointError, match="featweights"):
        load_retrieval(path, dim=D)
    with pytest.raises(FileNotFoundError):
        load_retrieval(tmp_path / "missing.pth")


def test_codebook_pickle_safe_loading(tmp_path):
    rng = np.random.default_rng(2)
    cents = rng.normal(size=(64, D)).astype(np.float32)
    good = tmp_path / "X_retrieval_codebook.pkl"
    with good.open("wb") as fh:
        pickle.dump({"type": "Codebook", "params": {"size": 64}, "state": {"centroids": cents}}, fh)
    out = load_codebook(good, expected_size=64)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(cents))
    with pytest.raises(ValueError, match="expects"):
        load_codebook(good, expected_size=65)
    # protocol 2 (bytes via _codecs.encode) still loads
    with good.open("wb") as fh:
        pickle.dump({"type": "Codebook", "params": {"size": 64}, "state": {"centroids": cents}}, fh, protocol=2)
    assert torch.equal(load_codebook(good), torch.from_numpy(cents))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned.txt"),))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"state": {"centroids": Evil()}}))
    with pytest.raises(ValueError, match="not allowed"):
        load_codebook(evil)
    assert not (tmp_path / "pwned.txt").exists()


def test_codebook_name_and_attach(tmp_path):
    ck = tmp_path / "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric_retrieval_trainingfree.pth"
    assert codebook_path_for(ck).name == "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric_retrieval_codebook.pkl"
    model = Mast3rModel.from_config("tiny")
    dim = model.config.enc_embed_dim
    rng = np.random.default_rng(3)
    m, p = rng.normal(size=(1, dim)), np.eye(dim)
    _write_ckpt(ck, {"prewhiten.m": torch.from_numpy(m), "prewhiten.p": torch.from_numpy(p)}, prewhiten=0,
                hdims="", residual=False, postwhiten=None, featweights="l2norm", nfeat=4)
    with codebook_path_for(ck).open("wb") as fh:
        pickle.dump({"type": "Codebook", "params": {"size": 8}, "state": {"centroids": np.ones((8, dim), np.float32)}}, fh)
    n_keys = len(model.state_dict())
    attach_retrieval(model, ck)
    assert len(model.state_dict()) == n_keys  # retrieval adds no keys to the MASt3R state dict
    feat, _ = model.encode(torch.zeros(1, 3, 32, 48), torch.tensor([[32, 48]]))
    sel = model.retrieval_features(feat)
    ref, _ = _np_reference(feat[0].numpy(), m, p, 4)
    np.testing.assert_allclose(sel[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    assert model.retrieval_codebook.endswith("_codebook.pkl")
