"""PSA's rules (Ahn & Kwak, CVPR 2018) as the official code jiwoon-ahn/psa applies them, each a
pure function on arrays, so that a test can check it on a hand-made case (docs/method.md, "PSA
and the random walk", cites each line of the official code).

The network side (the VGG16 variant, its CAM and its affinity head) is in `models/psa.py`; the
stages `psa_classify`, `psa_cam`, `affinity` and `refine` apply these rules to whole images.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255
EPS = 1e-5  # the official code's floor in the CAM division, the loss and the padding test
STRIDE = 8  # the output stride of PSA's VGG16 variant: the affinity grid's cell


# ---- CAMs and confident labels (infer_cls.py) ------------------------------------------------
def fuse_cams(cams: torch.Tensor) -> torch.Tensor:
    """(P, n, H, W) CAMs of P passes (scales and flips, at image size) -> (n, H, W): their sum,
    each class divided by its own max + 1e-5 (infer_cls.py:74-75)."""
    total = cams.sum(0)
    return total / (total.amax(dim=(-2, -1), keepdim=True) + EPS)


def background(cams: np.ndarray, alpha: float) -> np.ndarray:
    """The background score (1 - max over the image's classes) ** alpha (infer_cls.py:92); an image
    without classes is all background."""
    top = cams.max(0) if len(cams) else np.zeros(cams.shape[1:], np.float32)
    return ((1 - top) ** alpha).astype(np.float32)


def block_average(scores: np.ndarray, k: int = STRIDE) -> np.ndarray:
    """(C, H, W) -> (C, ceil(H/k), ceil(W/k)): the mean of each k x k block, the last blocks padded
    with zeros, as skimage's block_reduce (imutils.py:123-131)."""
    c, h, w = scores.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    padded = np.zeros((c, hp, wp), np.float32)
    padded[:, :h, :w] = scores
    return padded.reshape(c, hp // k, k, wp // k, k).mean((2, 4))


def confident_labels(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The affinity labels of a grid from the CRF scores (C, h, w) at the low and the high alpha,
    channel 0 the background (data.py:222-229): the low-alpha argmax; its background becomes 255
    (not confident), the high-alpha background 0 (confident, and it wins); a cell with no score
    in any channel (crop padding) 255. Values are channel positions, not class ids."""
    la, ha = low.argmax(0), high.argmax(0)
    labels = la.astype(np.uint8)
    labels[la == 0] = IGNORE
    labels[ha == 0] = 0
    labels[np.maximum(low.max(0), high.max(0)) < EPS] = IGNORE
    return labels


# ---- pairs within a radius (pyutils.py:125-159) ----------------------------------------------
def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) half-disc: (0, 1..r-1), then every dy in 1..r-1, dx in -(r-1)..r-1 with
    dx^2 + dy^2 < r^2 (34 offsets for radius 5)."""
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    return offsets


def pair_indices(radius: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices on an (h, w) grid: `from` (N,) the cells in rows [0, h-r+1) and columns
    [r-1, w-r+1), and `to` (offsets, N) each shifted by an offset. The bottom r-1 rows and the
    left and right r-1 columns are never a `from` cell, as in the official code."""
    h, w = size
    edge = radius - 1
    full = np.arange(h * w).reshape(h, w)
    rows, cols = h - edge, w - 2 * edge
    if rows <= 0 or cols <= 0:
        return np.zeros(0, np.int64), np.zeros((len(pair_offsets(radius)), 0), np.int64)
    frm = full[:rows, edge : edge + cols].reshape(-1)
    to = np.stack([full[dy : dy + rows, edge + dx : edge + dx + cols].reshape(-1)
                   for dy, dx in pair_offsets(radius)])
    return frm, to


def pair_labels(labels: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bg_pos, fg_pos, neg) boolean (offsets, N) from a label grid (data.py:144-173): both 0;
    equal, not 0, neither 255; different, neither 255. A pair touching 255 is in no set."""
    frm, to = pair_indices(radius, labels.shape)
    flat = labels.reshape(-1)
    a, b = flat[frm][None], flat[to]
    valid = (a < IGNORE) & (b < IGNORE)
    equal = (a == b) & valid
    return equal & (a == 0), equal & (a != 0), ~(a == b) & valid


# ---- AffinityNet (vgg16_aff.py, train_aff.py) ------------------------------------------------
def affinity(features: torch.Tensor, frm: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features -> (B, offsets, N) affinities exp(-mean over channels |f_i - f_j|)
    (vgg16_aff.py:55-63: the channel mean, where the paper writes an L1 norm)."""
    flat = features.flatten(2)
    f_from = flat[:, :, frm].unsqueeze(2)
    f_to = flat[:, :, to.reshape(-1)].view(flat.shape[0], flat.shape[1], *to.shape)
    return torch.exp(-(f_to - f_from).abs().mean(1))


def affinity_loss(aff: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor,
                  neg: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """bg/4 + fg/4 + neg/2, each term the mean over its set's pairs of the batch, count + 1e-5
    (train_aff.py:105-113); returns the total and its terms."""
    def mean(term: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.float()
        return (term * mask).sum() / (mask.sum() + EPS)

    parts = {"bg": mean(-torch.log(aff + EPS), bg), "fg": mean(-torch.log(aff + EPS), fg),
             "neg": mean(-torch.log(1 + EPS - aff), neg)}
    return parts["bg"] / 4 + parts["fg"] / 4 + parts["neg"] / 2, parts


def dense_affinity(aff: torch.Tensor, frm: torch.Tensor, to: torch.Tensor, cells: int) -> torch.Tensor:
    """(offsets, N) affinities of one image -> the (cells, cells) matrix A: a_ij at (i, j) and
    (j, i), 1 on the diagonal, 0 elsewhere (vgg16_aff.py:65-77)."""
    a = torch.eye(cells, dtype=aff.dtype, device=aff.device)
    rows = frm.expand(to.shape[0], -1).reshape(-1)
    a[rows, to.reshape(-1)] = aff.reshape(-1)
    a[to.reshape(-1), rows] = aff.reshape(-1)
    return a


# ---- the random walk (infer_aff.py) ----------------------------------------------------------
def transition(a: torch.Tensor, beta: float) -> torch.Tensor:
    """T = A^beta (elementwise) divided by its column sums: each column sums to 1 (infer_aff.py:103-105)."""
    a = a ** beta
    return a / a.sum(0, keepdim=True)


def walk(vectors: torch.Tensor, t: torch.Tensor, logt: int) -> torch.Tensor:
    """(C, N) score vectors times T^(2^logt), T squared logt times (infer_aff.py:106-114)."""
    for _ in range(logt):
        t = t @ t
    return vectors @ t


def sparse_transition(aff: torch.Tensor, frm: torch.Tensor, to: torch.Tensor, cells: int,
                      beta: float) -> torch.Tensor:
    """The transpose of `transition(dense_affinity(...), beta)` as a sparse CSR matrix, built from
    the pairs alone: the same entries, without the cells x cells array (CSR: its products with a
    dense matrix run about 3x faster than COO's on a CPU, benchmarks/bench_walk.py)."""
    rows = frm.expand(to.shape[0], -1).reshape(-1)
    cols = to.reshape(-1)
    ids = torch.arange(cells, device=aff.device)
    i = torch.cat([rows, cols, ids])  # A's row, col of every nonzero: pairs both ways, then the diagonal
    j = torch.cat([cols, rows, ids])
    a = torch.cat([aff.reshape(-1), aff.reshape(-1), torch.ones(cells, dtype=aff.dtype, device=aff.device)]) ** beta
    column = torch.zeros(cells, dtype=a.dtype, device=a.device).index_add_(0, j, a)
    # T = A / column sums; T^T has T's (i, j) entry at (j, i)
    coo = torch.sparse_coo_tensor(torch.stack([j, i]), a / column[j], (cells, cells), check_invariants=True)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


def walk_steps(vectors: torch.Tensor, transposed: torch.Tensor, steps: int) -> torch.Tensor:
    """(C, N) vectors times T^steps, one product a step with T^T sparse (`sparse_transition`):
    the same maps as `walk` with steps = 2^logt, in C x nonzeros x steps operations instead of
    logt x N^3."""
    out = vectors.T
    for _ in range(steps):
        out = transposed @ out
    return out.T


def walk_input(maps: np.ndarray, alpha: float, k: int = STRIDE) -> tuple[torch.Tensor, tuple[int, int]]:
    """The walk's vectors from class maps (n, H, W) in [0, 1] at image size: background
    (1 - max)^alpha as channel 0, zero-padded to a multiple of k and k x k averaged
    (infer_aff.py:94-100); returns ((1 + n, h*w), (h, w))."""
    planes = np.concatenate([background(maps, alpha)[None], maps.astype(np.float32)])
    pooled = block_average(planes, k)
    return torch.from_numpy(pooled.reshape(len(planes), -1)), pooled.shape[1:]


def walk_output(walked: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                k: int = STRIDE) -> np.ndarray:
    """(C, h*w) walked scores -> (C, H, W): bilinear upsampling to the padded size, cropped to the
    image (infer_aff.py:115-122)."""
    h, w = grid
    up = F.interpolate(walked.view(1, -1, h, w).float(), size=(h * k, w * k), mode="bilinear",
                       align_corners=False)[0]
    return up[:, : size[0], : size[1]].cpu().numpy()


def poly_lr(lr: float, step: int, max_step: int, power: float = 0.9) -> float:
    """PolyOptimizer's rate: lr (1 - step / max_step) ** power (torchutils.py:24-28)."""
    return lr * (1 - step / max_step) ** power
