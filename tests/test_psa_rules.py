"""PSA's rules on hand-made cases, the expected values worked out by hand from the official formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcis_cli import psa


def test_fuse_cams_sums_passes_and_divides_by_each_class_max():
    cams = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]],
                         [[[1.0, 1.0]], [[0.0, 2.0]]]])  # 2 passes, 2 classes, 1 x 2
    fused = psa.fuse_cams(cams)
    assert torch.allclose(fused, torch.tensor([[[2 / (4 + 1e-5), 4 / (4 + 1e-5)]], [[0.0, 1 / (1 + 1e-5)]]]))


def test_background_power():
    cams = np.array([[[1.0, 0.0, 0.5]], [[0.2, 0.0, 0.25]]], np.float32)
    assert np.allclose(psa.background(cams, 4), [[0.0, 1.0, 0.5 ** 4]])
    low, mid, high = (psa.background(cams, a)[0, 2] for a in (4, 16, 32))
    assert high < mid < low
    assert np.allclose(psa.background(np.zeros((0, 1, 2), np.float32), 32), 1.0)


def test_block_average_pads_with_zeros():
    scores = np.arange(1, 11, dtype=np.float32).reshape(1, 1, 10)
    out = psa.block_average(scores, 8)
    assert out.shape == (1, 1, 2)
    # the first block: rows 1-7 are padding -> (1+..+8)/64; the second: (9+10)/64
    assert np.allclose(out, [[[36 / 64, 19 / 64]]])


def test_confident_labels_rule():
    # four cells: la fg & ha fg; la bg & ha fg; la fg & ha bg; padding (no score anywhere)
    low = np.array([[[0.1, 0.9, 0.2, 0.0]], [[0.8, 0.05, 0.7, 0.0]], [[0.1, 0.05, 0.1, 0.0]]])
    high = np.array([[[0.0, 0.1, 0.6, 0.0]], [[0.9, 0.8, 0.3, 0.0]], [[0.1, 0.1, 0.1, 0.0]]])
    assert psa.confident_labels(low, high).tolist() == [[1, 255, 0, 255]]


def test_pair_offsets():
    assert len(psa.pair_offsets(5)) == 34
    assert psa.pair_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    for dy, dx in psa.pair_offsets(5):
        assert (dy > 0 or (dy == 0 and dx > 0)) and dx * dx + dy * dy < 25


def test_pair_indices_skip_the_border_bands():
    frm, to = psa.pair_indices(5, (10, 12))
    assert len(frm) == (10 - 4) * (12 - 8)
    rows, cols = np.divmod(frm, 12)
    assert rows.max() == 5 and cols.min() == 4 and cols.max() == 7  # bottom 4 rows, 4-column bands out
    assert to.min() >= 0 and to.max() < 120
    frm, to = psa.pair_indices(2, (2, 3))  # radius 2: from = row 0, column 1 only
    assert frm.tolist() == [1] and to[:, 0].tolist() == [2, 3, 4, 5]


def test_pair_labels():
    zeros = np.zeros((6, 6), np.uint8)
    bg, fg, neg = psa.pair_labels(zeros, 2)
    assert bg.all() and not fg.any() and not neg.any()
    bg, fg, neg = psa.pair_labels(np.full((6, 6), 255, np.uint8), 2)
    assert not (bg.any() or fg.any() or neg.any())
    grid = np.array([[1, 1, 2], [1, 1, 2], [255, 0, 0]], np.uint8)
    # radius 2 on 3 x 3: from cells (0,1), (1,1); offsets (0,1), (1,-1), (1,0), (1,1)
    bg, fg, neg = psa.pair_labels(grid, 2)
    # from (0,1)=1 -> (0,2)=2 neg, (1,0)=1 fg, (1,1)=1 fg, (1,2)=2 neg
    # from (1,1)=1 -> (1,2)=2 neg, (2,0)=255 none, (2,1)=0 neg, (2,2)=0 neg
    assert fg.T.tolist() == [[False, True, True, False], [False, False, False, False]]
    assert neg.T.tolist() == [[True, False, False, True], [True, False, True, True]]
    assert not bg.any()


def test_affinity_from_features():
    f = torch.zeros(1, 2, 1, 3)
    f[0, :, 0, 2] = torch.tensor([1.0, 3.0])
    frm, to = (torch.from_numpy(a) for a in psa.pair_indices(2, (1, 3)))
    # radius 2 on 1 x 3: no row below, so no from cell at all
    assert psa.affinity(f, frm, to).shape == (1, 4, 0)
    frm, to = torch.tensor([0, 1]), torch.tensor([[1, 2]])
    aff = psa.affinity(f, frm, to)
    assert torch.allclose(aff, torch.tensor([[[1.0, math.exp(-2.0)]]]))  # mean(|1|, |3|) = 2


def test_affinity_loss_weights():
    aff = torch.tensor([[0.5, 0.5, 0.5]])
    one = torch.tensor([[True, False, False]])
    two = torch.tensor([[False, True, False]])
    three = torch.tensor([[False, False, True]])
    total, parts = psa.affinity_loss(aff, one, two, three)
    bg = -math.log(0.5 + 1e-5) / (1 + 1e-5)
    neg = -math.log(0.5 + 1e-5) / (1 + 1e-5)
    assert parts["bg"].item() == pytest.approx(bg, rel=1e-6)
    assert total.item() == pytest.approx(bg / 4 + bg / 4 + neg / 2, rel=1e-6)
    none = torch.zeros_like(one)
    total, parts = psa.affinity_loss(aff, one, none, none)
    assert parts["fg"].item() == 0 and total.item() == pytest.approx(bg / 4, rel=1e-6)


def test_dense_affinity_and_transition():
    aff = torch.tensor([[0.5, 0.25]])
    a = psa.dense_affinity(aff, torch.tensor([0, 1]), torch.tensor([[1, 2]]), 3)
    assert torch.equal(a, torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 1.0]]))
    t = psa.transition(a, 2)
    # A^2: columns [1, .25, 0], [.25, 1, .0625], [0, .0625, 1] -> divided by 1.25, 1.3125, 1.0625
    assert torch.allclose(t[:, 1], torch.tensor([0.25, 1.0, 0.0625]) / 1.3125)
    assert torch.allclose(t.sum(0), torch.ones(3))


def test_walk_identity_leaves_maps_unchanged():
    v = torch.rand(3, 5)
    assert torch.allclose(psa.walk(v, psa.transition(torch.eye(5), 8), 8), v)


def test_walk_squarings_equal_products():
    torch.manual_seed(0)
    f = torch.rand(1, 4, 6, 6)
    frm, to = (torch.from_numpy(x) for x in psa.pair_indices(3, (6, 6)))
    t = psa.transition(psa.dense_affinity(psa.affinity(f, frm, to)[0], frm, to, 36).double(), 8)
    v = torch.rand(2, 36, dtype=torch.float64)
    product = v
    for _ in range(256):
        product = product @ t
    assert torch.allclose(psa.walk(v, t, 8), product, rtol=1e-9)
    walked = psa.walk(v, t, 8)  # convex: each channel stays within its input's range
    assert (walked.min(1).values >= v.min(1).values - 1e-12).all()
    assert (walked.max(1).values <= v.max(1).values + 1e-12).all()


def test_walk_input_and_output():
    maps = np.zeros((1, 10, 12), np.float32)
    maps[0, :8, :8] = 1.0
    vectors, grid = psa.walk_input(maps, 16)
    assert grid == (2, 2) and vectors.shape == (2, 4)
    # background 0 on the 8 x 8 block, 1 elsewhere; padding 0 in both channels
    assert np.allclose(vectors[0].numpy(), [0.0, 32 / 64, 16 / 64, 8 / 64])
    assert np.allclose(vectors[1].numpy(), [1.0, 0.0, 0.0, 0.0])
    out = psa.walk_output(vectors, grid, (10, 12))
    assert out.shape == (2, 10, 12)


def test_poly_lr():
    assert psa.poly_lr(0.1, 0, 100) == 0.1
    assert psa.poly_lr(0.1, 50, 100) == pytest.approx(0.1 * 0.5 ** 0.9)


def test_sparse_walk_equals_the_dense_squarings():
    torch.manual_seed(1)
    f = torch.rand(1, 6, 9, 11)
    frm, to = (torch.from_numpy(x) for x in psa.pair_indices(4, (9, 11)))
    aff = psa.affinity(f, frm, to)[0].double()
    dense = psa.transition(psa.dense_affinity(aff, frm, to, 99), 8)
    sparse = psa.sparse_transition(aff, frm, to, 99, 8)
    assert torch.allclose(sparse.to_dense(), dense.T)
    v = torch.rand(3, 99, dtype=torch.float64)
    assert torch.allclose(psa.walk_steps(v, sparse, 256), psa.walk(v, dense, 8), rtol=1e-9, atol=1e-12)
