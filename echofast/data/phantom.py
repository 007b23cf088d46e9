"""Procedural echo-like phantom clips with exact ground truth, and ``echofast phantom``.

A phantom clip is an apical-four-chamber-like cartoon: a black-outside sector (fan) field of view
with depth and lateral gain fall-off, speckle (the Rayleigh amplitude of a spatially smoothed,
temporally AR(1) complex Gaussian field, raised to :data:`SPECKLE_CONTRAST`, multiplying the
image), a bright myocardial wall around a dark left-ventricle (LV) cavity, and a right ventricle
and two atria as further dark chambers. Display-domain grey levels of the structures are mixed
linearly by their anti-aliased coverage, so every displayed edge lies where the drawn boundary
is. The LV cavity is an "egg": two half-ellipses sharing the short semi-axis ``b`` and the long
axis (apex half ``a_ap``, base half ``a_b``, long-axis length ``L = a_ap + a_b``). Its area is
``A = π·b·L/2`` and the single-plane area-length volume is

    V = 8·A² / (3·π·L) = (2/3)·π·b²·L          (pixels³; × PIXEL_CM³ for mL)

(exact for this shape: it is the prolate spheroid's volume). Over the cardiac cycle a contraction
level ``c`` (0 at end-diastole, 1 at end-systole) follows a raised-cosine systole and relaxation,
then a diastasis plateau at 0. The volume is interpolated linearly in ``c``:
``V(c) = EDV − c·(EDV − ESV)``; the long axis shortens by ``L(c) = L_d·(1 − k·c·EF/100)`` and
``b(c)`` is solved from ``V(c)``, so ``ESV = EDV·(1 − EF/100)`` exactly: the ground-truth EF is the
requested one (to float precision). The cycle phase is placed so that one frame is exactly at
end-systole (``c = 1``) and at least one frame is in diastasis (``c = 0``): the clip's minimum and
maximum area-length volumes are ESV and EDV, and EF = (EDV − ESV)/EDV·100.

The drawn cavity is anti-aliased (per-pixel coverage from a first-order signed distance): the sum
of its coverage equals the analytic area within 0.3 %, and the area-length EF of the drawn cavity
(coverage sums, long-axis lengths) is within 0.07 EF points of the recorded EF (17 clips, EF
10–90; tests/data/test_phantom.py checks 0.3).

Everything is drawn from one ``numpy.random.Generator`` per clip (``make_phantom(seed=...)``);
dataset clip ``i`` of a job with seed ``S`` uses ``sample_seed(S, i, "phantom")``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EchofastError
from ..fsutil import atomic_write_text
from ..rng import sample_seed
from .echonet import (
    SPLITS,
    TRACINGS_COLUMNS,
    split_counts,
    split_of,
    splits_argument,
    write_filelist,
)
from .measure import blur_axis

PIXEL_CM = 0.18
"""Stated pixel size of a 112-pixel phantom (cm): volumes in mL are pixel³ × PIXEL_CM³
(scaled by 112/size for other sizes), giving EDVs of roughly 45–155 mL."""

N_CHORDS = 20
"""Short-axis chords per traced frame in VolumeTracings.csv (echonet's tracings have 20)."""

MANIFEST = "phantom.json"

SPECKLE_CONTRAST = 0.35
"""Exponent applied to the Rayleigh speckle amplitude (relative spread ≈ 0.18, about what the
log compression of a scanner's display leaves of fully developed speckle)."""

_SPECKLE_KERNEL = np.exp(-0.5 * (np.arange(-2, 3) / 0.8) ** 2)
_SPECKLE_KERNEL /= _SPECKLE_KERNEL.sum()


class PhantomConflict(EchofastError, RuntimeError):
    """The output folder holds something that ``echofast phantom`` must not overwrite."""


class PhantomArgumentError(EchofastError, ValueError):
    """Phantom dataset arguments that cannot make the requested clips."""


@dataclass
class PhantomClip:
    """One phantom clip and its ground truth.

    Coordinates are pixels, ``x`` = column and ``y`` = row of the pixel centre (echonet's
    VolumeTracings convention). Volumes are in mL (see :data:`PIXEL_CM`).
    """

    frames: np.ndarray
    """(T, H, W) uint8."""
    fps: float
    ef: float
    """Ground-truth EF (%): (EDV − ESV)/EDV·100 of the area-length volumes; equals the request."""
    edv: float
    esv: float
    ed_frame: int
    es_frame: int
    heart_rate: float
    """Beats per minute."""
    areas: np.ndarray
    """(T,) analytic LV cavity area per frame (pixels²)."""
    lengths: np.ndarray
    """(T,) LV long-axis length per frame (pixels)."""
    volumes: np.ndarray
    """(T,) area-length volume per frame (mL)."""
    cavity: np.ndarray
    """(T, H, W) float32 drawn LV cavity coverage in [0, 1] (sums to ``areas`` within ~0.1 %)."""
    long_axis: dict[str, np.ndarray]
    """``{"ed", "es"}`` → (4,) ``x1, y1, x2, y2``: base midpoint, then apex."""
    chords: dict[str, np.ndarray]
    """``{"ed", "es"}`` → (N_CHORDS, 4) short-axis chords ``x1, y1, x2, y2`` perpendicular to the
    long axis, ordered base → apex, centred on N_CHORDS equal segments of it; (x1, y1) on the
    free-wall side, (x2, y2) on the septal side."""
    pixel_cm: float
    params: dict = field(default_factory=dict)
    """The drawn jitter parameters (for inspection)."""

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def tracing_rows(self, file_name: str) -> list[dict[str, object]]:
        """VolumeTracings.csv rows: ES frame first, ED frame last (echonet's loader takes the last
        listed frame as the large/diastolic one), each as the long axis then the chords."""
        name = file_name if file_name.endswith(".avi") else f"{file_name}.avi"
        rows = []
        for key, frame in (("es", self.es_frame), ("ed", self.ed_frame)):
            for x1, y1, x2, y2 in [self.long_axis[key], *self.chords[key]]:
                rows.append(
                    {
                        "FileName": name,
                        "X1": f"{x1:.4f}",
                        "Y1": f"{y1:.4f}",
                        "X2": f"{x2:.4f}",
                        "Y2": f"{y2:.4f}",
                        "Frame": frame,
                    }
                )
        return rows


def area_length_volume(area: np.ndarray | float, length: np.ndarray | float) -> np.ndarray:
    """Single-plane area-length volume ``8·A²/(3·π·L)`` (units: those of ``length``³)."""
    area = np.asarray(area, dtype=np.float64)
    return 8.0 * area**2 / (3.0 * math.pi * np.asarray(length, dtype=np.float64))


def contraction(phase: np.ndarray, systole: float, relaxation: float) -> np.ndarray:
    """Contraction level in [0, 1] at cycle phase in [0, 1): raised-cosine rise over
    ``[0, systole)`` to exactly 1 at ``phase == systole``, raised-cosine fall over the next
    ``relaxation``, then exactly 0 (diastasis)."""
    phase = np.asarray(phase, dtype=np.float64)
    c = np.zeros_like(phase)
    rise = phase < systole
    c[rise] = 0.5 * (1.0 - np.cos(np.pi * phase[rise] / systole))
    fall = ~rise & (phase < systole + relaxation)
    c[fall] = 0.5 * (1.0 + np.cos(np.pi * (phase[fall] - systole) / relaxation))
    return c


def _egg_coverage(x, y, ox, oy, ux, uy, a_ap, a_b, b) -> np.ndarray:
    """Anti-aliased coverage of an egg (half-ellipses ``a_ap`` towards ``u`` and ``a_b`` away,
    common semi-axis ``b``) centred at ``o``: clip(0.5 − signed distance, 0, 1), the distance
    to first order ``(f − 1)/|∇f|`` of the normalised radius ``f``. Broadcasts over frames."""
    dx, dy = x - ox, y - oy
    u = dx * ux + dy * uy
    v = dx * uy - dy * ux
    a = np.where(u >= 0, a_ap, a_b)
    p, q = u / a, v / b
    f = np.sqrt(p * p + q * q)
    g = np.sqrt((p / a) ** 2 + (q / b) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(g > 0, f / np.maximum(g, 1e-12), np.minimum(a, b))
    return np.clip(0.5 - (f - 1.0) * ratio, 0.0, 1.0).astype(np.float32)


def _speckle(rng: np.random.Generator, t: int, h: int, w: int, rho: float) -> np.ndarray:
    """(T, H, W) float32 speckle amplitude with mean ≈ 1: |smoothed complex Gaussian|, the
    field an AR(1) process in time with coefficient ``rho``."""
    noise = rng.standard_normal((2, t, h, w), dtype=np.float32)
    for i in range(1, t):
        noise[:, i] = rho * noise[:, i - 1] + math.sqrt(1 - rho * rho) * noise[:, i]
    noise = blur_axis(blur_axis(noise, 2, _SPECKLE_KERNEL), 3, _SPECKLE_KERNEL)
    kappa = float((_SPECKLE_KERNEL**2).sum()) ** 2
    amp = np.sqrt(noise[0] ** 2 + noise[1] ** 2)
    return amp / np.float32(math.sqrt(kappa) * math.sqrt(math.pi / 2))


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def make_phantom(
    seed: int | None = None,
    *,
    rng: np.random.Generator | None = None,
    ef: float | None = None,
    frames: int = 64,
    fps: float = 32.0,
    heart_rate: float | None = None,
    size: int = 112,
    ef_range: tuple[float, float] = (10.0, 90.0),
    hr_range: tuple[float, float] = (50.0, 110.0),
    pixel_cm: float | None = None,
) -> PhantomClip:
    """Draw one phantom clip.

    Args:
        seed / rng: the clip's randomness (a ``numpy.random.Generator`` is made from ``seed``).
        ef: requested EF in %; default uniform in ``ef_range`` rounded to 0.01.
        frames, fps: clip length and frame rate.
        heart_rate: beats per minute; default uniform in ``hr_range``, its lower end raised so
            that one whole cycle fits in the clip (ED and ES are then both inside).
        size: frame height and width (geometry scales with it).
        pixel_cm: pixel size in cm for mL volumes (default ``PIXEL_CM * 112 / size``).

    Raises ValueError when the clip is too short to contain an end-systole and a diastasis frame.
    """
    if rng is None:
        rng = np.random.default_rng(seed)
    if frames < 2 or fps <= 0 or size < 16:
        raise ValueError(f"need frames >= 2, fps > 0, size >= 16; got {frames}, {fps}, {size}")
    s = size / 112.0
    pixel_cm = PIXEL_CM / s if pixel_cm is None else float(pixel_cm)
    if ef is None:
        ef = round(_uniform(rng, *ef_range), 2)
    ef = float(ef)
    if not 0 < ef < 100:
        raise ValueError(f"EF must be in (0, 100), got {ef}")
    e = ef / 100.0
    if heart_rate is None:
        lo = max(hr_range[0], 60.0 * fps / max(frames - 2, 1))
        if lo > hr_range[1]:
            raise ValueError(
                f"a {frames}-frame clip at {fps:g} fps cannot hold a whole cycle at <= "
                f"{hr_range[1]:g} bpm; use more frames or a lower fps"
            )
        heart_rate = _uniform(rng, lo, hr_range[1])
    hr = float(heart_rate)

    # Cycle timing: one frame exactly at end-systole, some frame in diastasis.
    systole, relax = _uniform(rng, 0.28, 0.34), _uniform(rng, 0.2, 0.26)
    per_frame = hr / 60.0 / fps
    k = np.arange(frames)
    ok = []
    for k_es in range(frames):
        c = contraction(np.mod(systole + (k - k_es) * per_frame, 1.0), systole, relax)
        if np.any(c == 0.0):
            ok.append(k_es)
    if not ok:
        raise ValueError(
            f"a {frames}-frame clip at {fps:g} fps and {hr:g} bpm holds no end-systole with a "
            "diastasis frame; use more frames, a lower fps or a higher heart rate"
        )
    k_es = int(ok[int(rng.integers(len(ok)))])
    c = contraction(np.mod(systole + (k - k_es) * per_frame, 1.0), systole, relax)
    c[k_es] = 1.0
    rest = np.flatnonzero(c == 0.0)
    before = rest[rest < k_es]
    k_ed = int(before[-1] if len(before) else rest[rest > k_es][0])

    # LV geometry (pixels) at end-diastole and its contraction.
    length_d = _uniform(rng, 40.0, 52.0) * s
    b_d = length_d * _uniform(rng, 0.24, 0.30)
    f_ap = _uniform(rng, 0.6, 0.68)
    shorten = _uniform(rng, 0.08, 0.18)
    tilt = math.radians(_uniform(rng, -12.0, 12.0))
    wall_d = _uniform(rng, 6.0, 8.0) * s
    sx = size / 2 + _uniform(rng, -2.0, 2.0) * s
    sy = _uniform(rng, 0.0, 3.0) * s
    half_angle = math.radians(_uniform(rng, 38.0, 45.0))
    radius = _uniform(rng, 0.92, 0.98) * size
    apex_x = sx + _uniform(rng, 3.0, 10.0) * s
    apex_y = sy + _uniform(rng, 17.0, 24.0) * s
    echo_blood = _uniform(rng, 0.02, 0.06)
    echo_tissue = _uniform(rng, 0.45, 0.6)
    echo_wall = _uniform(rng, 0.8, 1.0)
    e_rv = _uniform(rng, 0.3, 0.5)
    rho = _uniform(rng, 0.6, 0.85)

    ux, uy = math.sin(tilt), -math.cos(tilt)  # base → apex (up the image)
    vx, vy = -uy, ux  # towards the LV free wall (image right)
    vol_d = (2.0 / 3.0) * math.pi * b_d**2 * length_d
    length = length_d * (1.0 - shorten * e * c)
    vol = vol_d * (1.0 - e * c)
    b = np.sqrt(vol / ((2.0 / 3.0) * math.pi * length))
    a_ap, a_b = f_ap * length, (1.0 - f_ap) * length
    ox, oy = apex_x - a_ap * ux, apex_y - a_ap * uy
    wall = wall_d * (1.0 + 0.6 * e * c)

    # Other chambers, placed from the ED geometry (never overlapping the LV wall).
    a_ap_d, a_b_d = f_ap * length_d, (1.0 - f_ap) * length_d
    ox_d, oy_d = apex_x - a_ap_d * ux, apex_y - a_ap_d * uy
    rv_b = 0.55 * b_d
    rv_off = b_d + wall_d + 2.5 * s + rv_b
    rv_x = ox_d - rv_off * vx + 4.0 * s * ux
    rv_y = oy_d - rv_off * vy + 4.0 * s * uy
    rv_bt = rv_b * np.sqrt(1.0 - e_rv * c)
    base_x, base_y = ox_d - a_b_d * ux, oy_d - a_b_d * uy
    la_ap, la_b, la_w = 0.2 * length_d, 0.26 * length_d, 0.8 * b_d
    la_gap = 0.6 * wall_d + 3.0 * s + la_ap
    la_x, la_y = base_x - la_gap * ux, base_y - la_gap * uy
    ra_w = 0.75 * rv_b
    ra_x, ra_y = la_x - (la_w + ra_w + 5.0 * s) * vx, la_y - (la_w + ra_w + 5.0 * s) * vy

    # Draw all frames at once: (T, 1, 1) parameters against the (H, W) grid.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    col = (slice(None), None, None)
    lv = _egg_coverage(xx, yy, ox[col], oy[col], ux, uy, a_ap[col], a_b[col], b[col])
    lv_wall = _egg_coverage(
        xx,
        yy,
        ox[col],
        oy[col],
        ux,
        uy,
        (a_ap + 0.8 * wall)[col],
        (a_b + 0.6 * wall)[col],
        (b + wall)[col],
    )
    rv = _egg_coverage(xx, yy, rv_x, rv_y, ux, uy, 0.5 * length_d, 0.3 * length_d, rv_bt[col])
    rv_wall = _egg_coverage(
        xx, yy, rv_x, rv_y, ux, uy, 0.5 * length_d + 3 * s, 0.3 * length_d, rv_bt[col] + 3 * s
    )
    la_wt = la_w * (1.0 + 0.15 * c)
    la = _egg_coverage(xx, yy, la_x, la_y, ux, uy, la_ap, la_b, la_wt[col])
    ra = _egg_coverage(xx, yy, ra_x, ra_y, ux, uy, la_ap, la_b, (ra_w * (1 + 0.15 * c))[col])

    # Composite the display-domain (log-compressed, power 0.6) echogenicities linearly by
    # coverage, so the displayed edge of every structure is where its drawn boundary is.
    gamma = 0.6
    blood, tissue, myo = (np.float32(v**gamma) for v in (echo_blood, echo_tissue, echo_wall))
    echo = np.full(lv.shape, tissue, dtype=np.float32)
    echo += (myo - tissue) * np.maximum(lv_wall, 0.85 * rv_wall)
    for cavity in (rv, la, ra, lv):
        echo += (blood - echo) * cavity

    dx, dy = xx - sx, yy - sy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dx, dy)
    sector = np.clip(radius - r + 0.5, 0, 1) * np.clip((half_angle - np.abs(theta)) * r + 0.5, 0, 1)
    gain = np.clip((1.0 - 0.3 * r / radius) * (1.0 - 0.25 * (theta / half_angle) ** 2), 0.05, 1)
    echo += 0.5 * np.clip(1.0 - r / (14.0 * s), 0, 1)  # near-field clutter
    speckle = _speckle(rng, frames, size, size, rho) ** SPECKLE_CONTRAST * (gain**gamma / 1.1)
    shown = np.clip(echo * speckle, 0.0, 1.0) * sector
    video = np.rint(255.0 * shown).astype(np.uint8)

    areas = 0.5 * math.pi * b * length
    vol_cm = pixel_cm**3
    edv, esv = vol_d * vol_cm, vol_d * (1.0 - e) * vol_cm

    def axis_and_chords(i: int) -> tuple[np.ndarray, np.ndarray]:
        base = (ox[i] - a_b[i] * ux, oy[i] - a_b[i] * uy)
        apex = (ox[i] + a_ap[i] * ux, oy[i] + a_ap[i] * uy)
        pos = -a_b[i] + (np.arange(N_CHORDS) + 0.5) * length[i] / N_CHORDS
        semi = np.where(pos >= 0, a_ap[i], a_b[i])
        half = b[i] * np.sqrt(np.clip(1.0 - (pos / semi) ** 2, 0.0, None))
        cx, cy = ox[i] + pos * ux, oy[i] + pos * uy
        chords = np.stack([cx + half * vx, cy + half * vy, cx - half * vx, cy - half * vy], 1)
        return np.array([*base, *apex]), chords

    axes = {"ed": axis_and_chords(k_ed), "es": axis_and_chords(k_es)}
    return PhantomClip(
        frames=video,
        fps=float(fps),
        ef=ef,
        edv=float(edv),
        esv=float(esv),
        ed_frame=k_ed,
        es_frame=k_es,
        heart_rate=hr,
        areas=areas,
        lengths=length,
        volumes=vol * vol_cm,
        cavity=lv,
        long_axis={key: v[0] for key, v in axes.items()},
        chords={key: v[1] for key, v in axes.items()},
        pixel_cm=pixel_cm,
        params={
            "length_ed": length_d,
            "b_ed": b_d,
            "apex_fraction": f_ap,
            "long_axis_shortening": shorten,
            "tilt_deg": math.degrees(tilt),
            "apex_xy": (apex_x, apex_y),
            "sector_apex_xy": (sx, sy),
            "sector_half_angle_deg": math.degrees(half_angle),
            "sector_radius": radius,
            "systole_fraction": systole,
            "relaxation_fraction": relax,
            "speckle_rho": rho,
        },
    )


# --------------------------------------------------------------------------------------------
# Datasets: ``echofast phantom``
# --------------------------------------------------------------------------------------------


def _parse_range(text: str | float | int | Sequence, kind: type) -> tuple:
    """``"50"`` → (50, 50); ``"30:60"`` → (30, 60); a number or a pair as is. Raises
    ValueError for anything else or LO > HI."""
    if isinstance(text, (int, float)):
        return kind(text), kind(text)
    if isinstance(text, (tuple, list)):
        lo, hi = (kind(v) for v in text)
    else:
        parts = str(text).split(":")
        if len(parts) not in (1, 2):
            raise ValueError(f"expected a number or LO:HI, got {text!r}")
        lo, hi = kind(parts[0]), kind(parts[-1])
    if lo > hi:
        raise ValueError(f"range {text!r} has LO > HI")
    return lo, hi


def _int_range(text: str) -> tuple[int, int]:
    """argparse type of ``--frames`` / ``--fps``: an integer, or LO:HI integers with LO <= HI."""
    try:
        return _parse_range(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or LO:HI integers with LO <= HI, got {text!r}"
        ) from None


@dataclass
class PhantomDatasetConfig:
    """Arguments of a phantom dataset. Everything but ``out``, ``progress`` and ``overwrite``
    defines the dataset (a resumed run must use the same values)."""

    out: str
    num_videos: int
    seed: int = 0
    frames: tuple[int, int] = (128, 128)
    """Frames per clip: each clip draws a uniform integer in [lo, hi]."""
    fps: tuple[int, int] = (50, 50)
    """Frame rate per clip: a uniform integer in [lo, hi] (EchoNet-Dynamic is mostly 50)."""
    splits: tuple[int, int, int] | None = None
    ef_range: tuple[float, float] = (10.0, 90.0)
    hr_range: tuple[float, float] = (50.0, 110.0)
    size: int = 112
    name_prefix: str = "phantom_"
    progress: bool = True
    overwrite: bool = False

    NON_IDENTITY = ("out", "progress", "overwrite")

    def identity(self) -> dict:
        ident = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in self.NON_IDENTITY:
            ident.pop(k)
        ident["splits"] = list(split_counts(self.num_videos, self.splits, "dynamic"))
        for k in ("frames", "fps", "ef_range", "hr_range"):
            ident[k] = list(ident[k])
        return ident

    def check(self) -> None:
        """Raise :class:`PhantomArgumentError` for arguments that :func:`make_phantom` would
        reject for some clip (checked before the output folder is touched)."""
        if self.num_videos < 1:
            raise PhantomArgumentError(f"--num-videos must be >= 1, got {self.num_videos}")
        bad = sorted({c for c in self.name_prefix if c in "/\\" or not c.isprintable()})
        if bad:
            raise PhantomArgumentError(
                f"--name-prefix {self.name_prefix!r} holds {bad}: file names of videos take no "
                "path separators or control characters"
            )
        for name, (lo, hi) in (("--frames", self.frames), ("--fps", self.fps)):
            if lo > hi:
                raise PhantomArgumentError(f"{name} range {lo}:{hi} has LO > HI")
        if self.frames[0] < 4 or self.fps[0] < 1 or self.size < 16 or self.size % 2:
            raise PhantomArgumentError("need frames >= 4, fps >= 1 and an even size >= 16")
        lo, hi = self.ef_range
        if lo > hi:
            raise PhantomArgumentError(f"--ef-range LO {lo:g} is above HI {hi:g}")
        if not (0 < round(lo, 2) and round(hi, 2) < 100):
            raise PhantomArgumentError(
                f"--ef-range must lie in (0, 100) (EFs are drawn to 0.01), got {lo:g} {hi:g}"
            )
        lo, hi = self.hr_range
        if lo > hi:
            raise PhantomArgumentError(f"--hr-range LO {lo:g} is above HI {hi:g}")
        if not lo > 0:
            raise PhantomArgumentError(f"--hr-range must be positive (bpm), got {lo:g} {hi:g}")
        need = 60.0 * self.fps[1] / (self.frames[0] - 2)
        if need > hi:
            raise PhantomArgumentError(
                f"{self.frames[0]} frames at {self.fps[1]} fps cannot hold a whole cardiac cycle "
                f"at <= {hi:g} bpm (needs {need:.0f} bpm): use more frames, a lower fps or a "
                "higher --hr-range"
            )


def phantom_clip(cfg: PhantomDatasetConfig, index: int) -> PhantomClip:
    """Clip ``index`` of a dataset: its own generator, seeded with
    ``sample_seed(cfg.seed, index, "phantom")``, draws frames, fps, then the clip."""
    rng = np.random.default_rng(sample_seed(cfg.seed, index, "phantom"))
    frames = int(rng.integers(cfg.frames[0], cfg.frames[1] + 1))
    fps = int(rng.integers(cfg.fps[0], cfg.fps[1] + 1))
    return make_phantom(
        rng=rng,
        frames=frames,
        fps=float(fps),
        size=cfg.size,
        ef_range=cfg.ef_range,
        hr_range=cfg.hr_range,
    )


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _prepare_folder(folder: Path, manifest: dict, overwrite: bool) -> None:
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise PhantomConflict(f"{folder} exists and is not a folder; refusing to replace it")
    if folder.exists() and any(folder.iterdir()):
        if not path.is_file():
            raise PhantomConflict(
                f"{folder} exists, is not empty and is not a phantom dataset (no {MANIFEST}); "
                "refusing to write into it"
            )
        try:
            old = json.loads(path.read_text())["arguments"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise PhantomConflict(f"{path}: unreadable manifest ({err})") from None
        if old != manifest["arguments"]:
            if not overwrite:
                keys = sorted(
                    k
                    for k in set(old) | set(manifest["arguments"])
                    if old.get(k) != manifest["arguments"].get(k)
                )
                raise PhantomConflict(
                    f"{folder} holds a phantom dataset made with other arguments (differs in "
                    f"{keys}); use --overwrite to replace it or another --out"
                )
            for video in (folder / "Videos").glob("*.avi"):
                video.unlink()
            for name in ("FileList.csv", "VolumeTracings.csv", MANIFEST):
                (folder / name).unlink(missing_ok=True)
    (folder / "Videos").mkdir(parents=True, exist_ok=True)
    for tmp in (folder / "Videos").glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _discard(folder: Path, existed: bool) -> None:
    """Remove what a run wrote into ``folder``, which was absent (``existed`` False) or empty."""
    if not existed:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for item in folder.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def write_phantom_dataset(cfg: PhantomDatasetConfig) -> dict:
    """Write (or complete) a phantom dataset in the EchoNet-Dynamic layout::

        Videos/<prefix><index:06d>.avi   MJPEG AVI (``write_video``) at the clip's fps
        FileList.csv                     FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,
                                         NumberOfFrames,Split  (ground truth, mL)
        VolumeTracings.csv               FileName(.avi),X1,Y1,X2,Y2,Frame: per video the ES then
                                         the ED frame, each its long axis then 20 chords
        phantom.json                     arguments, seed rule, units

    Clips are deterministic (``phantom_clip``): re-running the same command skips videos
    already written (files appear atomically) and rewrites the CSVs. A non-empty folder that is
    not a phantom dataset is refused; one made with other arguments is refused unless
    ``cfg.overwrite``. Arguments are checked before the folder is touched; a clip that the
    arguments cannot make (:class:`PhantomArgumentError`) in a folder that was absent or empty
    removes what the run wrote, so a corrected run starts clean. Returns a summary dict.
    """
    from tqdm.auto import tqdm

    from ..io import write_video

    cfg.check()
    folder = Path(cfg.out)
    counts = split_counts(cfg.num_videos, cfg.splits, "dynamic")
    manifest = {
        "kind": "echofast phantom dataset",
        "arguments": cfg.identity(),
        "seed_rule": "clip i draws from numpy.random.default_rng(echofast.rng.sample_seed(seed, i, "
        "'phantom')): frames, then fps, then make_phantom's draws",
        "pixel_cm": PIXEL_CM * 112 / cfg.size,
        "volumes": "single-plane area-length 8*A^2/(3*pi*L) of the LV cavity, mL",
        "file_names": f"{cfg.name_prefix}<index, 6 digits>",
    }
    existed = folder.exists()
    fresh = not existed or (folder.is_dir() and not any(folder.iterdir()))
    _prepare_folder(folder, manifest, cfg.overwrite)
    rows, tracings, written = [], [], 0
    start = time.perf_counter()
    for i in tqdm(range(cfg.num_videos), unit="video", desc="phantom", disable=not cfg.progress):
        try:
            clip = phantom_clip(cfg, i)
        except ValueError as err:
            if fresh:
                _discard(folder, existed)
            raise PhantomArgumentError(
                f"{folder}: clip {i}: {err}" + ("; removed what this run wrote" if fresh else "")
            ) from None
        name = f"{cfg.name_prefix}{i:06d}"
        path = folder / "Videos" / f"{name}.avi"
        if not path.is_file():
            write_video(path, clip.frames, clip.fps)
            written += 1
        rows.append(
            {
                "FileName": name,
                "EF": f"{clip.ef:.2f}",
                "ESV": f"{clip.esv:.2f}",
                "EDV": f"{clip.edv:.2f}",
                "FrameHeight": cfg.size,
                "FrameWidth": cfg.size,
                "FPS": f"{clip.fps:g}",
                "NumberOfFrames": clip.num_frames,
                "Split": split_of(i, counts),
            }
        )
        tracings.extend(clip.tracing_rows(name))
    write_filelist(folder, rows)
    _write_csv(folder / "VolumeTracings.csv", TRACINGS_COLUMNS, tracings)
    return {
        "folder": str(folder),
        "written": written,
        "already_done": cfg.num_videos - written,
        "videos": cfg.num_videos,
        "splits": dict(zip(SPLITS, counts)),
        "seconds": time.perf_counter() - start,
    }


def main_phantom(argv: Sequence[str] | None = None) -> int:
    """``echofast phantom``: write a phantom dataset (EchoNet-Dynamic layout, ground truth)."""
    p = argparse.ArgumentParser(
        prog="echofast phantom",
        description="Write procedural echo-like phantom videos with ground-truth EF/ESV/EDV and "
        "VolumeTracings in the EchoNet-Dynamic layout (re-running completes an interrupted run).",
    )
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--num-videos", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--frames",
        type=_int_range,
        default=(128, 128),
        metavar="T|LO:HI",
        help="frames per video: an integer T, or integers LO:HI drawn per video (128)",
    )
    p.add_argument(
        "--fps",
        type=_int_range,
        default=(50, 50),
        metavar="F|LO:HI",
        help="frame rate: an integer F, or integers LO:HI drawn per video (50)",
    )
    p.add_argument(
        "--splits",
        type=splits_argument,
        metavar="TRAIN,VAL,TEST",
        help="TRAIN,VAL,TEST counts (default: EchoNet-Dynamic's proportions)",
    )
    p.add_argument("--ef-range", type=float, nargs=2, default=(10.0, 90.0), metavar=("LO", "HI"))
    p.add_argument("--hr-range", type=float, nargs=2, default=(50.0, 110.0), metavar=("LO", "HI"))
    p.add_argument("--size", type=int, default=112, help="frame height and width (112)")
    p.add_argument("--name-prefix", default="phantom_")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a phantom dataset made differently"
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(list(argv) if argv is not None else None)
    cfg = PhantomDatasetConfig(
        out=a.out,
        num_videos=a.num_videos,
        seed=a.seed,
        frames=a.frames,
        fps=a.fps,
        splits=a.splits,
        ef_range=tuple(a.ef_range),
        hr_range=tuple(a.hr_range),
        size=a.size,
        name_prefix=a.name_prefix,
        progress=not a.no_progress,
        overwrite=a.overwrite,
    )
    summary = write_phantom_dataset(cfg)
    print(
        f"{summary['folder']}: {summary['videos']} phantom videos "
        f"({', '.join(f'{k} {v}' for k, v in summary['splits'].items())}); wrote "
        f"{summary['written']} in {summary['seconds']:.1f} s, {summary['already_done']} were "
        "already there",
    )
    return 0
