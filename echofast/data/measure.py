"""Ejection fraction measured from the pixels of a phantom-like echo clip.

:func:`measure_volumes` segments the dark left-ventricle cavity in every frame and applies the
single-plane area-length method; :func:`measure_ef` returns only the EF. It is meant for clips
that look like :mod:`echofast.data.phantom` output — including videos *generated* by models
trained on phantoms, hence the robustness to blur and noise — not for real echocardiograms.

Algorithm (numpy only; a 112×112×40 clip takes well under a second):

1. Frames → float, Gaussian blur (σ = 1.2 px) against speckle. Field of view: where the temporal
   mean exceeds 0.6× the median non-black level, holes (the cavities) filled, eroded by 1 px —
   the fan less its blurred rim, so cavities near the fan's edge do not leak into the outside.
2. Dark mask = blurred < threshold inside the field of view, opened with a 3×3 cross to cut
   one-pixel bridges; its 4-connected components (parallel union-find) touching the image
   border are dropped.
3. The LV is the component with the largest ``area · exp(−(d/D)²)`` over all frames, ``d`` the
   distance of its centroid from a prior centre (40 % of the fan's depth below its top, at its
   mean column; ``D`` = 0.3 × image size): the LV at end-diastole. In every frame the LV is then
   the component overlapping most with this reference (later passes: with the previous pass's
   mask of the nearest frame that had one); holes are filled.
4. Three segmentations: the first threshold is Otsu's over the fan's blurred pixels; then the
   threshold is half-way between the blood level (10 %-trimmed mean of the cavity eroded by
   2 px) and the wall level (90th percentile of the blurred image 1–5 px outside the cavity: the
   plateau of a thin wall, whose mean is pulled down by the blur of both its edges). Half-height
   is where a blurred edge keeps its true position.
5. Area, sub-pixel: the mask's interior (eroded by 1 px) counts whole, and each pixel of the
   2-px boundary band counts ``clip((wall − I)/(wall − blood), 0, 1)`` (blur conserves this
   sum across a straight edge). Length: the major axis ``4·√λ_max`` of the ellipse with the
   same second moments as these weights (exact for an ellipse; for the phantom's egg shape
   within ~1 % of the apex-base length, and far less noisy than an extent).
6. Volume ``V = 8·A²/(3·π·L)`` per frame. Frames whose area is below 0.2× or above 3× the
   clip's median, or departs by more than 50 % from the running median of 3 frames, are dropped
   as segmentation failures. The volume curve is smoothed by a local quadratic fit over ±2
   frames (Savitzky-Golay: keeps a parabolic extremum's depth and damps the outward bias of
   the maximum and minimum of noisy values). EDV = max, ESV = min of the smoothed curve;
   EF = (EDV − ESV)/EDV·100.

Accuracy on phantoms (tests/data/test_phantom.py: 32 clips, EF evenly spread over 10–90,
36 frames at 30 fps, seeds 1000–1031): MAE 0.77 EF points, max error 1.7, mean error +0.6 (the
remaining outward bias of the extremes of noisy values). The same clips blurred (Gaussian σ =
1.5 px) with Gaussian noise (σ = 10 grey levels) added: MAE 1.5, max 2.8; σ = 2 px and noise 20:
MAE 2.7, max 8.8. A clip with no enclosed dark cavity raises ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BLUR_SIGMA = 1.2
WALL_RING = (1, 5)
"""The wall's level is measured this many pixels (from, to) outside the cavity mask."""
WALL_QUANTILE = 0.9
LV_DEPTH = 0.4
"""Prior LV centre: this fraction of the fan's depth below its top, at the fan's mean column."""
LV_SPREAD = 0.3
"""Width of the prior (× image size)."""
OUTSIDE_LEVEL = 6.0
"""Temporal-mean grey level below which a pixel is black (outside the fan)."""
FAN_LEVEL = 0.6
"""The fan is where the temporal mean exceeds this fraction of the median non-black level."""


@dataclass
class EFMeasurement:
    """Per-frame measurements of one clip. Volumes are pixels³ (× ``pixel_cm``³ if given)."""

    ef: float
    edv: float
    esv: float
    ed_frame: int
    es_frame: int
    areas: np.ndarray
    """(T,) cavity area (pixels²), NaN where invalid."""
    lengths: np.ndarray
    """(T,) long-axis length (pixels), NaN where invalid."""
    volumes: np.ndarray
    """(T,) smoothed area-length volume, NaN where invalid."""
    valid: np.ndarray
    """(T,) bool: a cavity was found and its area is consistent with its neighbours."""
    threshold: float
    masks: np.ndarray | None = None
    """(T, H, W) bool cavity masks (only with ``return_masks=True``)."""


def _as_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim == 4:
        x = x.mean(axis=1)
    if x.ndim != 3 or x.shape[0] < 2 or min(x.shape[1:]) < 8:
        raise ValueError(
            f"frames must be (T, H, W) or (T, C, H, W) with T >= 2, got {tuple(x.shape)}"
        )
    return x


def blur_axis(x: np.ndarray, axis: int, kernel: np.ndarray) -> np.ndarray:
    """Same-size 1-D convolution along ``axis`` with edge replication."""
    r = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(kernel):
        out += np.float32(w) * np.take(padded, np.arange(i, i + n), axis=axis)
    return out


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W) over H and W, replicated borders."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return blur_axis(blur_axis(x, 1, k), 2, k)


def _dilate(m: np.ndarray, n: int = 1) -> np.ndarray:
    """Dilation of a bool (N, H, W) mask by a 3×3 cross, ``n`` times."""
    for _ in range(n):
        out = m.copy()
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
        out[:, :, 1:] |= m[:, :, :-1]
        out[:, :, :-1] |= m[:, :, 1:]
        m = out
    return m


def _erode(m: np.ndarray, n: int = 1) -> np.ndarray:
    return ~_dilate(~m, n)


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a bool (N, H, W) mask: 0 off the mask, else 1 + the
    smallest flat index (over the whole batch) of the component's pixels.

    Parallel union-find: every edge between two mask pixels hooks the larger of its two roots
    onto the smaller (``np.minimum.at``), then pointer jumping flattens the trees; repeated until
    both ends of every edge share a root (a handful of rounds)."""
    mask = np.asarray(mask, dtype=bool)
    nodes = np.flatnonzero(mask)
    node_of = np.full(mask.size, -1, dtype=np.int64)
    node_of[nodes] = np.arange(len(nodes))
    node_of = node_of.reshape(mask.shape)
    right = mask[:, :, :-1] & mask[:, :, 1:]
    down = mask[:, :-1] & mask[:, 1:]
    a = np.concatenate([node_of[:, :, :-1][right], node_of[:, :-1][down]])
    b = np.concatenate([node_of[:, :, 1:][right], node_of[:, 1:][down]])
    parent = np.arange(len(nodes), dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        if not len(a):
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    labels = np.zeros(mask.size, dtype=np.int64)
    labels[nodes] = nodes[parent] + 1
    return labels.reshape(mask.shape)


def _inner_components(mask: np.ndarray) -> np.ndarray:
    """Component labels of a bool (N, H, W) mask, those touching the image border removed."""
    labels = label_components(mask)
    edge = np.concatenate([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], axis=1)
    return np.where(np.isin(labels, np.unique(edge)), 0, labels)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a bool (N, H, W) mask: background components (4-connected) that do not
    touch the image border."""
    return mask | (_inner_components(~mask) > 0)


def _otsu(values: np.ndarray) -> float:
    hist = np.histogram(values, bins=256, range=(0.0, 256.0))[0].astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    centres = np.arange(256) + 0.5
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0) ** 2 / (w0 * (1 - w0))
    between = np.nan_to_num(between[:-1], nan=-1.0, posinf=-1.0)
    return float(centres[int(np.argmax(between))] + 0.5)


def _most_overlapping(labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per frame, the component of ``labels`` that overlaps ``reference`` most (holes filled)."""
    out = np.zeros(labels.shape, dtype=bool)
    for i in range(labels.shape[0]):
        lab = labels[i][reference[i]]
        lab = lab[lab > 0]
        if lab.size:
            values, counts = np.unique(lab, return_counts=True)
            out[i] = labels[i] == values[np.argmax(counts)]
    return fill_holes(out)


def _select_lv(labels: np.ndarray, centre: tuple[float, float], scale: float) -> np.ndarray:
    """The LV mask per frame (module docstring, step 3)."""
    t, h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w]
    best, best_score = None, 0.0
    for i in range(t):
        lab = labels[i].reshape(-1)
        values, inverse, count = np.unique(lab, return_inverse=True, return_counts=True)
        cy = np.bincount(inverse, weights=yy.reshape(-1)) / count
        cx = np.bincount(inverse, weights=xx.reshape(-1)) / count
        score = count * np.exp(-((cy - centre[0]) ** 2 + (cx - centre[1]) ** 2) / scale**2)
        score[values == 0] = 0.0
        j = int(np.argmax(score))
        if score[j] > best_score:
            best, best_score = labels[i] == values[j], float(score[j])
    if best is None:
        return np.zeros(labels.shape, dtype=bool)
    return _most_overlapping(labels, np.broadcast_to(best, labels.shape))


def _moment_length(weights: np.ndarray) -> np.ndarray:
    """(N,) major axis ``4·√λ_max`` of the ellipse with the second moments of (N, H, W) weights."""
    n, h, w = weights.shape
    wgt = weights.astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    total = np.maximum(wgt.sum((1, 2)), 1e-9)
    mx = (wgt * xx).sum((1, 2)) / total
    my = (wgt * yy).sum((1, 2)) / total
    dx, dy = xx - mx[:, None, None], yy - my[:, None, None]
    cxx = (wgt * dx * dx).sum((1, 2)) / total
    cyy = (wgt * dy * dy).sum((1, 2)) / total
    cxy = (wgt * dx * dy).sum((1, 2)) / total
    lam = 0.5 * (cxx + cyy) + np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy**2)
    return 4.0 * np.sqrt(lam)


def _running_median(x: np.ndarray, window: int) -> np.ndarray:
    r = window // 2
    padded = np.pad(x, r, mode="edge")
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        part = padded[i : i + window]
        part = part[np.isfinite(part)]
        if part.size:
            out[i] = np.median(part)
    return out


def _local_quadratic(y: np.ndarray, valid: np.ndarray, half: int = 2) -> np.ndarray:
    """Least-squares parabola over the valid frames within ``±half``, evaluated at each valid
    frame (Savitzky-Golay with gaps); too few neighbours → the raw value."""
    out = np.full(len(y), np.nan)
    t = np.arange(len(y))
    for i in np.flatnonzero(valid):
        sel = valid & (np.abs(t - i) <= half)
        if sel.sum() < 4:
            out[i] = y[i]
        else:
            out[i] = np.polyfit(t[sel] - i, y[sel], 2)[-1]
    return out


def _field_of_view(blurred: np.ndarray) -> np.ndarray:
    """(H, W) bool: the fan, less its blurred rim. Pixels whose temporal mean is above
    ``FAN_LEVEL`` × the median non-black level, holes (the cavities) filled, eroded by 1 px."""
    mean = blurred.mean(0)
    lit = mean[mean > OUTSIDE_LEVEL]
    if lit.size < 16:
        raise ValueError("no field of view: every pixel is black")
    fan = fill_holes((mean > FAN_LEVEL * np.median(lit))[None])
    return _erode(fan, 1)[0]


def _trimmed_mean(values: np.ndarray, cut: float = 0.1) -> float:
    lo, hi = np.quantile(values, [cut, 1 - cut])
    kept = values[(values >= lo) & (values <= hi)]
    return float(kept.mean() if kept.size else np.median(values))


def _segment(blurred: np.ndarray, fan: np.ndarray, thr: float, previous: np.ndarray | None):
    dark = _dilate(_erode((blurred < thr) & fan))
    labels = _inner_components(dark)
    if previous is not None:
        found = np.flatnonzero(previous.reshape(len(previous), -1).any(1))
        nearest = found[np.abs(np.arange(len(previous))[:, None] - found[None]).argmin(1)]
        return _most_overlapping(labels, previous[nearest])
    rows, cols = np.nonzero(fan[0])
    t, h, w = blurred.shape
    prior = (rows.min() + LV_DEPTH * (rows.max() - rows.min()), cols.mean())
    return _select_lv(labels, prior, LV_SPREAD * max(h, w))


def measure_volumes(
    frames: torch.Tensor | np.ndarray,
    fps: float | None = None,
    *,
    pixel_cm: float | None = None,
    return_masks: bool = False,
) -> EFMeasurement:
    """Segment the LV cavity of every frame and measure area-length volumes and the EF.

    Args:
        frames: (T, H, W) grey levels 0..255 (uint8 or float, numpy or torch), or (T, C, H, W)
            (channel mean).
        fps: frame rate. Accepted for interface stability; the method works in frames (its
            temporal filters span ±1 and ±2 frames).
        pixel_cm: pixel size for volumes in mL (default: volumes in pixels³).
        return_masks: also return the (T, H, W) cavity masks.

    Raises ValueError when no cavity is found in at least two frames.
    """
    del fps
    x = _as_frames(frames)
    blurred = gaussian_blur(x, BLUR_SIGMA)
    fan = _field_of_view(blurred)
    thr = _otsu(blurred[:, fan])
    masks = None
    for _ in range(2):
        masks = _segment(blurred, fan[None], thr, masks)
        if masks.reshape(len(masks), -1).any(1).sum() < 2:
            raise ValueError("no cavity found: the clip does not look like a phantom echo")
        inner = _erode(masks, 2)
        inner = np.where(inner.reshape(len(inner), -1).any(1)[:, None, None], inner, masks)
        ring = _dilate(masks, WALL_RING[1]) & ~_dilate(masks, WALL_RING[0]) & fan
        blood = _trimmed_mean(x[inner])
        wall = float(np.quantile(blurred[ring], WALL_QUANTILE))
        thr = 0.5 * (blood + wall)
    masks = _segment(blurred, fan[None], thr, masks)
    found = masks.reshape(len(masks), -1).any(1)
    soft = np.clip((wall - blurred) / max(wall - blood, 1e-3), 0.0, 1.0)
    core = _erode(masks, 1)
    weights = np.where(core, 1.0, np.where(_dilate(masks, 1), soft, 0.0))
    areas = np.where(found, weights.reshape(len(weights), -1).sum(1), np.nan)
    lengths = np.where(found, _moment_length(weights), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        volumes = 8.0 * areas**2 / (3.0 * math.pi * lengths)
        typical = np.nanmedian(areas)
        plausible = found & (lengths > 0) & (areas > 0.2 * typical) & (areas < 3.0 * typical)
        med = _running_median(np.where(plausible, areas, np.nan), 3)
        valid = plausible & (np.abs(areas - med) <= 0.5 * med)
    if valid.sum() < 2:
        raise ValueError("cavity found in fewer than two consistent frames")
    smooth = _local_quadratic(volumes, valid)
    if pixel_cm is not None:
        smooth = smooth * pixel_cm**3
    ed, es = int(np.nanargmax(smooth)), int(np.nanargmin(smooth))
    edv, esv = float(smooth[ed]), float(smooth[es])
    return EFMeasurement(
        ef=(edv - esv) / edv * 100.0,
        edv=edv,
        esv=esv,
        ed_frame=ed,
        es_frame=es,
        areas=np.where(valid, areas, np.nan),
        lengths=np.where(valid, lengths, np.nan),
        volumes=smooth,
        valid=valid,
        threshold=thr,
        masks=masks if return_masks else None,
    )


def measure_ef(frames: torch.Tensor | np.ndarray, fps: float | None = None) -> float:
    """EF (%) of a phantom-like clip (T, H, W): see :func:`measure_volumes`."""
    return measure_volumes(frames, fps).ef
