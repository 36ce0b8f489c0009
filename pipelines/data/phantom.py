"""The digital phantom: one synthetic T1-like axial brain slice, drawn with vectorised numpy from a generator
(anatomy, bias field, blur and Rician noise), and the lesion kinds a multi-class set draws into it (location, shape
and texture of glioma, meningioma and pituitary tumours). :mod:`pipelines.data.synthetic` writes the data set."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# T1-like tissue intensities on a 0..1 scale before global scaling and noise.
_SCALP = 0.88
_CSF = 0.12
_GREY_MATTER = 0.42
_WHITE_MATTER = 0.62

# The brain ends at this fraction of the head ellipse's normalised radius; the rest is skull and CSF.
_BRAIN_EXTENT = 0.86


def _gaussian_blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth a 2-D array with numpy only, by multiplying its spectrum.

    The array is reflect-padded first so that the FFT's implicit periodic wrap does not bleed one
    edge into the opposite one.
    """
    size = field.shape[0]
    pad = min(int(math.ceil(3.0 * sigma)) + 1, size - 1)
    padded = np.pad(field, pad, mode="reflect")
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    # Fourier transform of a unit-area Gaussian with standard deviation sigma (in pixels).
    transfer = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fx**2 + fy**2))
    smoothed = np.fft.irfft2(np.fft.rfft2(padded) * transfer, s=padded.shape)
    return smoothed[pad:-pad, pad:-pad]


def _smooth_noise(rng: np.random.Generator, size: int, sigmas: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random fields, one per correlation length in ``sigmas`` (pixels).

    Returns shape ``(len(sigmas), size, size)``. White noise is stationary, so the FFT's periodic
    wrap is harmless and needs no padding here; that, and one batched transform for all fields,
    keeps this hot spot of the generator cheap.
    """
    white = rng.standard_normal((len(sigmas), size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    widths = np.asarray(sigmas, dtype=np.float64)[:, None, None]
    transfer = np.exp(-2.0 * (math.pi * widths) ** 2 * (fx**2 + fy**2))
    fields = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(size, size))
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    return fields / (fields.std(axis=(1, 2), keepdims=True) + 1e-12)


def _smoothstep(edge: np.ndarray | float, x: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``x < edge`` over a transition ``width``: anti-aliased shape boundaries."""
    # Capping the exponent avoids overflow warnings far from the edge, where the result is 0 anyway.
    return 1.0 / (1.0 + np.exp(np.minimum((x - edge) / width, 60.0)))


def draw_slice(rng: np.random.Generator, size: int, kind: LesionKind | None) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """Draw one slice, with a lesion of ``kind`` or none; return it as uint8 and the lesion's (cx, cy, radius) in pixels."""
    scale = size / 128.0  # every length below is tuned at 128 px and scaled with the image
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    wobble, folds, sulcal_field, fine, coarse, bias_field = _smooth_noise(
        rng, size, [10.0 * scale, 3.0 * scale, 2.5 * scale, 1.2 * scale, 6.0 * scale, size / 4.0]
    )

    # Head: an ellipse longer front-to-back than side-to-side, jittered, resized and rotated.
    cx = size / 2 + rng.uniform(-0.04, 0.04) * size
    cy = size / 2 + rng.uniform(-0.04, 0.04) * size
    semi_u = rng.uniform(0.31, 0.37) * size
    semi_v = min(semi_u * rng.uniform(1.12, 1.25), 0.45 * size)  # keep a dark margin inside the frame
    theta = rng.uniform(-0.25, 0.25)
    # (u, v): head-aligned coordinates normalised to the ellipse; u left-right, v front (-) to back (+).
    du, dv = xs - cx, ys - cy
    u = (math.cos(theta) * du + math.sin(theta) * dv) / semi_u
    v = (-math.sin(theta) * du + math.cos(theta) * dv) / semi_v
    radius = np.hypot(u, v)
    edge = 1.0 / min(semi_u, semi_v)  # one pixel in normalised units, for anti-aliasing

    # Scalp and skull: a bright ring, then dark CSF between it and the brain surface, whose
    # outline wobbles a little so it is not a perfect ellipse.
    head = _smoothstep(1.0, radius, edge)
    # At least ~1.5 px thick, so the ring survives the blur in small images.
    skull_inner = 1.0 - max(rng.uniform(0.06, 0.09), 1.5 / semi_u)
    image = (_CSF + (_SCALP - _CSF) * (1.0 - _smoothstep(skull_inner, radius, edge))) * head
    brain = _smoothstep(_BRAIN_EXTENT + 0.015 * wobble, radius, edge)

    # Cortex vs white matter: a wavy interface (gyri) well inside the brain surface, and sulci as
    # dark thin curves along the zero lines of a smooth random field in the cortical band.
    white = _smoothstep(rng.uniform(0.64, 0.72) + 0.07 * folds, radius, 1.5 * edge)
    tissue = _GREY_MATTER + (_WHITE_MATTER - _GREY_MATTER) * white
    sulci = np.exp(-((sulcal_field / 0.25) ** 2)) * (1.0 - white) * np.clip((radius - 0.55) / 0.2, 0.0, 1.0)
    tissue -= (tissue - _CSF) * 0.8 * sulci
    # Interhemispheric fissure: a dark midline, interrupted in the centre by the corpus callosum.
    fissure = np.exp(-((u * semi_u / (0.9 * scale)) ** 2)) * np.clip((np.abs(v) - 0.35) / 0.15, 0.0, 1.0)
    tissue -= (tissue - _CSF) * 0.85 * fissure
    tissue += 0.025 * fine + 0.03 * coarse

    # Lateral ventricles: two mirrored crescents ")(" bowing towards the midline, each a band along
    # a circular arc whose thickness tapers to rounded ends and is largest at the frontal horn.
    gap = rng.uniform(0.05, 0.09)  # half-distance between the ventricles at their closest
    arc = rng.uniform(0.3, 0.5)  # arc radius: smaller = more curved
    half_length = rng.uniform(0.22, 0.32)
    thickness = rng.uniform(0.03, 0.05)
    centre_v = rng.uniform(-0.12, 0.0)
    along = np.clip((v - centre_v) / half_length, -1.0, 1.0)
    half_width = thickness * np.sqrt(1.0 - along**2) * (1.0 + 0.8 * np.clip(-along, 0.0, 1.0))
    # Outside the horns' span the width is zero; zero it explicitly there, since a soft edge
    # alone would still darken the whole circle by half.
    in_span = half_width > 0.0
    ventricles = np.zeros_like(radius)
    for side in (-1.0, 1.0):
        lateral = side * u - gap - arc  # negative on the medial half of the arc's circle
        from_arc = np.abs(np.hypot(lateral, (v - centre_v) * semi_v / semi_u) - arc)
        band = _smoothstep(half_width, from_arc, 0.6 * edge) * (in_span & (lateral < 0.0))
        ventricles = np.maximum(ventricles, band)
    tissue = tissue * (1.0 - ventricles) + _CSF * ventricles

    lesion_info: tuple[float, float, float] | None = None
    if kind is not None:
        tissue, lesion_info = _add_lesion(rng, tissue, xs, ys, semi_u, semi_v, theta, cx, cy, kind)

    image = image * (1.0 - brain) + tissue * brain

    # Scanner effects: a smooth multiplicative bias field, global gain, slight blur, Rician noise
    # (magnitude of a complex signal with Gaussian noise in both channels, so the background is
    # Rayleigh-distributed rather than exactly zero).
    bias = 1.0 + 0.08 * bias_field + rng.uniform(-0.08, 0.08) * (xs - cx) / size
    image = image * bias * rng.uniform(0.8, 1.1)
    image = _gaussian_blur(image, rng.uniform(0.4, 0.9) * scale)
    noise_sigma = rng.uniform(0.012, 0.035)
    real = image + noise_sigma * rng.standard_normal(image.shape)
    imag = noise_sigma * rng.standard_normal(image.shape)
    image = np.hypot(real, imag)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8), lesion_info


def _reach(radius: float) -> float:
    """How far from the head's centre a lesion of normalised ``radius`` may sit so that the whole lesion (its
    halo may extend further) stays inside the brain, clear of the skull."""
    return max(_BRAIN_EXTENT - 0.03 - 1.3 * radius, 0.0)


def _anywhere(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """Uniform over the brain (sqrt: not crowded at its centre)."""
    reach = _reach(radius)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dist = reach * math.sqrt(rng.uniform(0.0, 1.0))
    return dist * math.cos(angle), dist * math.sin(angle)


def _hemisphere(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """In one hemisphere: within 54 degrees of the left-right axis, away from the midline. An infiltrating
    mass may reach the brain's surface, where the brain outline cuts it off."""
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    angle = rng.uniform(-0.3, 0.3) * math.pi
    dist = max(_reach(radius), 0.45) * math.sqrt(rng.uniform(0.4, 1.0))
    return side * dist * math.cos(angle), dist * math.sin(angle)


def _brain_surface(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """Against the brain's surface (the dura), any direction: the brain outline cuts the mass flat there."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dist = _BRAIN_EXTENT - rng.uniform(0.4, 0.7) * radius
    return dist * math.cos(angle), dist * math.sin(angle)


def _midline(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """On the midline just in front of the centre, where the sella turcica lies in a low axial slice."""
    return rng.uniform(-0.03, 0.03), rng.uniform(-0.3, -0.15)


@dataclass(frozen=True)
class LesionKind:
    """How one lesion type looks: size, place, outline, margin, texture, oedema. Lengths are fractions of the image size."""

    radius: tuple[float, float]  # nominal radius range
    place: Callable[[np.random.Generator, float], tuple[float, float]]  # centre in normalised head coordinates, given the normalised radius
    irregularity: float  # largest amplitude of each of the outline's low harmonics (2 to 5 lobes)
    lobulation: float  # amplitude of small random lobules on the outline
    margin: float  # width of the core's edge in lesion radii: sharp (small) or infiltrating (large)
    halo: tuple[float, float]  # outer edge of the oedema halo, in lesion radii
    oedema: tuple[float, float]  # darkening of the halo
    contrast: tuple[float, float, float]  # brightness above white matter: low + span * uniform ** power
    heterogeneity: float  # amplitude of the interior texture, relative to the contrast
    necrosis: float  # chance of a darker necrotic centre (ring enhancement)


# The binary set's lesion: any size from small to large, anywhere, moderately irregular, subtle to clear.
TUMOR = LesionKind((0.04, 0.15), _anywhere, 0.075, 0.08, 0.06, (1.5, 2.1), (0.03, 0.16), (0.03, 0.32, 1.5), 0.3, 0.35)
LESION_KINDS = {
    # Large, ill-defined, heterogeneous, often necrotic, with wide oedema: infiltrating a hemisphere.
    "glioma": LesionKind((0.08, 0.14), _hemisphere, 0.14, 0.2, 0.25, (1.8, 2.6), (0.08, 0.2), (0.04, 0.22, 1.0), 0.7, 0.5),
    # Round, sharp, homogeneous and bright, little oedema: an extra-axial mass on the dura.
    "meningioma": LesionKind((0.07, 0.12), _brain_surface, 0.02, 0.02, 0.03, (1.15, 1.35), (0.0, 0.05), (0.22, 0.18, 1.0), 0.1, 0.0),
    # Small, round, fairly homogeneous, on the midline.
    "pituitary": LesionKind((0.03, 0.05), _midline, 0.03, 0.03, 0.05, (1.1, 1.3), (0.0, 0.03), (0.15, 0.2, 1.0), 0.15, 0.0),
}


def _add_lesion(
    rng: np.random.Generator,
    tissue: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    semi_u: float,
    semi_v: float,
    theta: float,
    cx: float,
    cy: float,
    kind: LesionKind,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Paint a lesion of ``kind`` with a darker oedema halo; return the tissue and (cx, cy, radius)."""
    size = tissue.shape[0]
    radius_px = rng.uniform(*kind.radius) * size
    # In normalised head coordinates the lesion spans at most radius_px / semi_u.
    pu, pv = kind.place(rng, radius_px / semi_u)
    lu, lv = pu * semi_u, pv * semi_v
    lesion_x = cx + math.cos(theta) * lu - math.sin(theta) * lv
    lesion_y = cy + math.sin(theta) * lu + math.cos(theta) * lv

    # Irregular outline: the radius varies with angle by a few random low harmonics,
    # and a smooth random field adds small lobulations on top.
    texture, lobules = _smooth_noise(rng, size, [max(1.0, 0.25 * radius_px), max(1.0, 0.35 * radius_px)])
    dx, dy = xs - lesion_x, ys - lesion_y
    polar = np.arctan2(dy, dx)
    outline = np.ones_like(polar)
    for harmonic in range(2, 6):
        outline += rng.uniform(0.0, kind.irregularity) * np.cos(harmonic * polar + rng.uniform(0.0, 2.0 * math.pi))
    rel = np.hypot(dx, dy) / (radius_px * outline) + kind.lobulation * lobules
    core = _smoothstep(1.0, rel, kind.margin)
    halo = _smoothstep(rng.uniform(*kind.halo), rel, 0.15) * (1.0 - core)

    # The lesion replaces the tissue under it (a mass displaces ventricles and sulci rather than
    # showing them through). Its level is above white matter by a contrast drawn from the kind's
    # range; the interior is heterogeneous, and some kinds often have a darker necrotic centre
    # (ring enhancement) as many high-grade tumours do.
    low, span, power = kind.contrast
    contrast = low + span * rng.uniform() ** power
    lesion = _WHITE_MATTER + contrast * (1.0 + kind.heterogeneity * texture)
    if rng.uniform() < kind.necrosis:
        lesion -= 0.6 * contrast * _smoothstep(rng.uniform(0.3, 0.5), rel, 0.08)
    oedema = -rng.uniform(*kind.oedema) * halo
    return tissue * (1.0 - core) + lesion * core + oedema, (lesion_x, lesion_y, radius_px)
