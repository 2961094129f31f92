"""Tests of the ASMK retrieval database (mast3r_slam_ros.slam.retrieval), spec/upstream_algorithm.md §7.3.

References: (1) a brute-force, loop-based numpy implementation of the §7.3 formulas written here independently;
(2) the PyPI ``asmk`` package's own kernel and inverted file when it is importable (it is installed in the development
environment); (3) retrieval problems with a known answer (noisy re-observations of stored images).
"""

from __future__ import annotations

import importlib.util
import math
import pickle

import numpy as np
import pytest
import torch

from mast3r_slam_ros.slam import retrieval as R


def _ref_scores(q: np.ndarray, dbs: list[np.ndarray], cent: np.ndarray, qa: int = 5, da: int = 1,
                alpha: float = 3.0) -> np.ndarray:
    """Independent brute-force ASMK score of query q against each database image (spec §7.3)."""
    d_pad = 32 * math.ceil(cent.shape[1] / 32)

    def agg(x, m):
        d2 = ((x[:, None, :].astype(np.float64) - cent[None].astype(np.float64)) ** 2).sum(-1)
        w = np.argsort(d2, axis=1, kind="stable")[:, :m]
        out = {}
        for word in sorted(set(w.ravel().tolist())):
            r = np.zeros(cent.shape[1])
            for n in range(x.shape[0]):
                if word in w[n]:
                    r += x[n] - cent[word]
            out[word] = r > 0
        return out

    aq = agg(q, qa)
    scores = []
    for x in dbs:
        am = agg(x, da)
        s = 0.0
        for word, bq in aq.items():
            if word in am:
                ham = np.count_nonzero(bq != am[word])
                sim = 1 - 2 * ham / d_pad
                if sim >= 0:
                    s += sim ** alpha / math.sqrt(len(am))
        scores.append(s / math.sqrt(len(aq)))
    return np.array(scores)


def _data(seed=0, n_img=5, n=40, d=24, k=16):
    g = np.random.default_rng(seed)
    cent = g.normal(size=(k, d)).astype(np.float32)
    dbs = [(cent[g.integers(0, k, n)] + 0.6 * g.normal(size=(n, d))).astype(np.float32) for _ in range(n_img)]
    q = (dbs[2] + 0.3 * g.normal(size=dbs[2].shape)).astype(np.float32)
    return q, dbs, cent


def _db_with(dbs, cent, **kw):
    db = R.RetrievalDatabase(feature_fn=lambda f: f[0], codebook=torch.from_numpy(cent), k=len(dbs), min_thresh=-1,
                             **kw)
    for i, x in enumerate(dbs):
        db.add(torch.from_numpy(x)[None], 10 + i)
    return db


@pytest.mark.parametrize("d", [24, 40])  # 40: not a multiple of 32 (padded bits, asmk normalization)
def test_scores_match_bruteforce_reference(d):
    q, dbs, cent = _data(d=d)
    db = _db_with(dbs, cent)
    res = db.query(torch.from_numpy(q)[None], k=len(dbs), min_thresh=-1.0)
    got = dict(zip(res.kf_ids, res.scores))
    ref = _ref_scores(q, dbs, cent)
    for i in range(len(dbs)):
        assert got.get(10 + i, 0.0) == pytest.approx(ref[i], rel=1e-5, abs=1e-9)
    assert res.kf_ids[0] == 12  # the image q was derived from


def test_scores_match_asmk_package_when_installed():
    """Cross-check against asmk's own aggregate_image + IVF.search (same params as MASt3R-SLAM)."""
    q, dbs, cent = _data(seed=3, d=40)
    db = _db_with(dbs, cent)
    res = db.query(torch.from_numpy(q)[None], k=len(dbs), min_thresh=-1.0)
    got = np.zeros(len(dbs))
    for i, s in zip(res.kf_ids, res.scores):
        got[i - 10] = s
    if importlib.util.find_spec("asmk") is None:
        # Without the optional package, compare with the in-file reference instead (never skipped).
        np.testing.assert_allclose(got, _ref_scores(q, dbs, cent), rtol=1e-5)
        return
    from asmk import codebook as acb
    from asmk import inverted_file as aivf
    from asmk import kernel as akern

    class _CB:  # minimal codebook object: the kernel only reads .centroids
        centroids = cent

    kern = akern.ASMKKernel(_CB(), binary=True)
    ivf = aivf.IVF.initialize_empty(codebook_size=cent.shape[0], use_idf=False)
    for i, x in enumerate(dbs):
        w = R.quantize(torch.from_numpy(x), torch.from_numpy(cent), 1).numpy()
        ades, ids = kern.aggregate_image(x, w)
        ivf.add(ades, ids, np.full(ids.shape[0], i))
    wq = R.quantize(torch.from_numpy(q), torch.from_numpy(cent), 5).numpy()
    qdes, qids = kern.aggregate_image(q, wq)
    ranks, scores = ivf.search(qdes, qids, similarity_func=lambda *a: kern.similarity(
        *a, alpha=3.0, similarity_threshold=0.0), topk=None)
    ref = np.zeros(len(dbs))
    ref[ranks] = scores
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-9)
    del acb


def test_known_answer_revisit_and_threshold():
    """Images of distinct 'places' (distinct token sets); a noisy re-observation retrieves its place first."""
    g = torch.Generator().manual_seed(1)
    places = [torch.randn(1, 80, 32, generator=g) for _ in range(12)]
    db = R.RetrievalDatabase(k=3, min_thresh=5e-3, nfeat=60, n_clusters=64, codebook_train_images=4)
    for i, p in enumerate(places):
        db.add(p, i)
    assert db.ready
    for i in (0, 5, 11):
        noisy = places[i] + 0.15 * torch.randn(places[i].shape, generator=g)
        res = db.query(noisy)
        assert res.kf_ids and res.kf_ids[0] == i
        assert res.scores == sorted(res.scores, reverse=True)
        assert all(s > 5e-3 for s in res.scores)
    # an unrelated image: whatever is returned must clear the threshold, and a huge threshold returns nothing
    other = torch.randn(1, 80, 32, generator=g)
    assert db.query(other, min_thresh=10.0).kf_ids == []
    # exclusion
    res = db.query(places[3], exclude={3})
    assert 3 not in res.kf_ids


def test_update_add_after_query_and_ids():
    g = torch.Generator().manual_seed(2)
    db = R.RetrievalDatabase(k=2, min_thresh=0.0, codebook=torch.randn(16, 8, generator=g))
    f0 = torch.randn(1, 30, 8, generator=g)
    assert db.update(f0, 7, add_after_query=True) == []  # empty database: no query result
    assert db.update(f0, 9, add_after_query=False) == [7]  # identical image scores 1.0
    assert db.kf_ids() == [7]
    with pytest.raises(ValueError):
        db.add(f0, 7)


def test_self_score_is_one_with_single_assignment():
    """ASMK self-similarity with the same assignment is exactly 1 (every word sim = 1, normalizations cancel)."""
    g = torch.Generator().manual_seed(4)
    db = R.RetrievalDatabase(codebook=torch.randn(32, 16, generator=g), query_assign=1, min_thresh=0)
    f = torch.randn(1, 50, 16, generator=g)
    db.add(f, 0)
    assert db.query(f).scores[0] == pytest.approx(1.0, abs=1e-9)


def test_codebook_training_schedule_and_reset():
    g = torch.Generator().manual_seed(5)
    db = R.RetrievalDatabase(nfeat=80, codebook_train_images=2, codebook_freeze_images=4, n_clusters=64)
    feats = [torch.randn(1, 80, 32, generator=g) for _ in range(6)]
    db.add(feats[0], 0)
    assert not db.ready and db.query(feats[0]).kf_ids == []  # no codebook yet: no candidates
    db.add(feats[1], 1)
    assert db.ready
    c2 = db.centroids.clone()
    for i in (2, 3):
        db.add(feats[i], i)
    assert not torch.equal(c2, db.centroids)  # retrained at 4 images
    c4 = db.centroids.clone()
    db.add(feats[4], 4)
    assert torch.equal(c4, db.centroids)  # frozen
    assert all(e.raw is None for e in db._entries)
    assert db.query(feats[4]).kf_ids[0] == 4
    db.reset()
    assert len(db) == 0 and not db.ready


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(6)
    centers = torch.randn(5, 3, generator=g) * 10
    x = torch.cat([c + 0.05 * torch.randn(50, 3, generator=g) for c in centers])
    c = R.kmeans(x, 5, seed=0)
    d = torch.cdist(centers, c)
    assert float(d.min(dim=1).values.max()) < 0.1


def test_load_codebook_asmk_pickle(tmp_path):
    cent = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    p = tmp_path / "x_codebook.pkl"
    with p.open("wb") as fh:
        pickle.dump({"type": "Codebook", "params": {"size": 8}, "state": {"centroids": cent}}, fh)
    np.testing.assert_array_equal(R.load_codebook(p).numpy(), cent)
    with pytest.raises(FileNotFoundError):
        R.load_codebook(tmp_path / "missing.pkl")


def test_bad_input():
    db = R.RetrievalDatabase(codebook=torch.randn(4, 8))
    with pytest.raises(ValueError):
        db.query(torch.randn(2, 5, 8))
    with pytest.raises(ValueError):
        db.query(torch.randn(1, 5, 7))
    with pytest.raises(TypeError):
        R.select_by_norm(np.zeros((1, 5, 8)))


def test_self_trained_codebook_on_one_image_keeps_residuals_informative():
    """Regression: a codebook trained on the indexed image itself must not zero its ASMK residuals.

    Reference: with one assignment per descriptor an image queried against itself scores exactly 1; a noisy copy of it
    scores far above an unrelated image."""
    g = torch.Generator().manual_seed(8)
    img = torch.tanh(torch.randn(1, 150, 64, generator=g) * 2)
    db = R.RetrievalDatabase(nfeat=150, min_thresh=-1.0)
    db.add(img, 0)
    assert db.ready and db.effective_query_assign() == 1
    assert db.query(img).scores[0] == pytest.approx(1.0, abs=1e-9)
    noisy = db.query(img + 0.1 * torch.randn(img.shape, generator=g)).scores[0]
    other = db.query(torch.tanh(torch.randn(1, 150, 64, generator=g) * 2)).scores[0]
    assert noisy > 0.2 and other < 0.5 * noisy
