"""Synthetic identities for the canary lab: realistic-looking names and a procedural portrait.

Every identity has a fixed set of visual traits (skin, hair, eye, shirt and background
colours, face shape, hair style and a 4×4 chest glyph). ``render`` draws one "photo" of
the person: the traits stay, while framing, lighting, noise and background texture change
from photo to photo, so a tiny CLIP can learn to recognise the person across photos.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

Color = tuple[int, int, int]
Style = Literal["default", "shifted"]

FIRST_NAMES: tuple[str, ...] = (
    "Adele", "Adrian", "Aisha", "Alba", "Alec", "Alma", "Amara", "Anders", "Anika", "Anton",
    "Arjun", "Astrid", "Aurelio", "Basil", "Beatrix", "Benedikt", "Bianca", "Bruno", "Calla",
    "Camille", "Carmen", "Cedric", "Celeste", "Chiara", "Clement", "Cora", "Dalia", "Damian",
    "Daria", "Dev", "Dorian", "Edda", "Elias", "Elif", "Emeric", "Enzo", "Esther", "Ezra",
    "Fabian", "Farah", "Felix", "Freya", "Gideon", "Greta", "Hana", "Hector", "Helga", "Hugo",
    "Ilse", "Imani", "Ines", "Ivo", "Jasper", "Jonas", "Juno", "Kai", "Kalani", "Karim",
    "Keiko", "Lars", "Leila", "Lena", "Leon", "Linnea", "Lorenzo", "Lucia", "Magnus", "Maia",
    "Malik", "Margit", "Marius", "Mateo", "Mila", "Mira", "Nadia", "Niamh", "Nico", "Nina",
    "Odile", "Olek", "Orla", "Otto", "Paloma", "Pavel", "Petra", "Priya", "Quentin", "Rafael",
    "Rania", "Renata", "Rhea", "Ronan", "Rosa", "Samir", "Selma", "Silas", "Soren", "Talia",
    "Tariq", "Thea", "Tobias", "Ugo", "Valeria", "Vera", "Viktor", "Wanda", "Xavier", "Yara",
    "Yusuf", "Zara", "Zeno",
)

LAST_NAMES: tuple[str, ...] = (
    "Abernathy", "Achterberg", "Alvarado", "Amundsen", "Andrade", "Arkwright", "Asante",
    "Baptiste", "Barros", "Bellamy", "Bergstrom", "Blackwood", "Bonnaire", "Brandt",
    "Calloway", "Castellano", "Chandra", "Corvin", "Dalgaard", "Delacroix", "Desai", "Drummond",
    "Eberhardt", "Ekwueme", "Ellison", "Esposito", "Falk", "Fairbanks", "Ferreira", "Fitzgerald",
    "Galloway", "Garnier", "Gonzaga", "Granberg", "Halvorsen", "Hartmann", "Hashemi", "Holloway",
    "Ibarra", "Iversen", "Jablonski", "Jaramillo", "Kamara", "Kaczmarek", "Kessler", "Kowalczyk",
    "Lachance", "Lindqvist", "Lombardi", "Lundgren", "Macready", "Marchetti", "Mendoza",
    "Moreau", "Nakamura", "Navarro", "Nieminen", "Novak", "Okafor", "Olivieri", "Ostrowski",
    "Pacheco", "Pellegrini", "Petrakis", "Quintero", "Radcliffe", "Ramirez", "Rasmussen",
    "Rinaldi", "Rosenthal", "Saarinen", "Salazar", "Santoro", "Schreiber", "Sorensen",
    "Takahashi", "Tanaka", "Thorne", "Toivonen", "Underwood", "Valdez", "Vasquez", "Verhoeven",
    "Villanueva", "Wainwright", "Weatherby", "Whitaker", "Wojcik", "Yamada", "Yilmaz",
    "Zamora", "Zielinski",
)

_ONSETS = ("b", "br", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "nd", "rt", "ck", "m")
_ENDINGS = ("son", "berg", "ini", "ez", "ova", "ski", "ton", "ard", "elli", "ley", "mann", "ov")

SKIN_TONES: tuple[Color, ...] = (
    (255, 224, 196), (241, 194, 158), (224, 172, 130), (198, 134, 93),
    (161, 102, 67), (121, 74, 46), (88, 54, 36), (233, 203, 170),
)
HAIR_COLORS: tuple[Color, ...] = (
    (20, 16, 14), (60, 38, 24), (110, 70, 40), (170, 120, 60), (225, 195, 120),
    (150, 50, 25), (180, 180, 185), (235, 235, 230), (90, 40, 120), (30, 90, 160),
)
EYE_COLORS: tuple[Color, ...] = (
    (60, 35, 20), (95, 60, 30), (70, 110, 60), (60, 100, 170), (120, 130, 140), (25, 25, 25),
)


@dataclass(frozen=True)
class Identity:
    """A synthetic person: a unique name plus the visual traits every photo of them shares."""

    name: str
    skin: Color
    hair: Color
    eyes: Color
    shirt: Color
    background: Color
    glyph_color: Color
    face_size: float  # face half-width as a fraction of the image side
    face_aspect: float  # face half-height / half-width
    hair_volume: float  # 0 = short hair, 1 = long hair
    glyph: int  # 16-bit mask: the 4×4 pattern printed on the shirt


def _syllable_surname(rng: np.random.Generator) -> str:
    parts = [
        str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) + str(rng.choice(_CODAS))
        for _ in range(int(rng.integers(1, 3)))
    ]
    return ("".join(parts) + str(rng.choice(_ENDINGS))).capitalize()


def _random_name(rng: np.random.Generator) -> str:
    first = str(rng.choice(FIRST_NAMES))
    last = str(rng.choice(LAST_NAMES)) if rng.random() < 0.6 else _syllable_surname(rng)
    return f"{first} {last}"


def make_names(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``n`` unique "First Last" names, none in ``exclude``; deterministic given ``seed``."""
    rng = np.random.default_rng([seed, 0x4E41])
    names: list[str] = []
    seen = set(exclude)
    for _ in range(200 * n + 1000):
        if len(names) == n:
            return names
        name = _random_name(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    raise ValueError(f"could not draw {n} unique names")


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> Color:
    r, g, b = rng.integers(lo, hi, size=3)
    return int(r), int(g), int(b)


def _pick(rng: np.random.Generator, palette: tuple[Color, ...], jitter: int = 12) -> Color:
    base = np.array(palette[int(rng.integers(len(palette)))])
    r, g, b = np.clip(base + rng.integers(-jitter, jitter + 1, size=3), 0, 255)
    return int(r), int(g), int(b)


def _random_identity(name: str, rng: np.random.Generator) -> Identity:
    glyph = 0
    while bin(glyph).count("1") < 4 or bin(glyph).count("1") > 12:
        glyph = int(rng.integers(1, 1 << 16))
    return Identity(
        name=name,
        skin=_pick(rng, SKIN_TONES),
        hair=_pick(rng, HAIR_COLORS, jitter=20),
        eyes=_pick(rng, EYE_COLORS),
        shirt=_color(rng),
        background=_color(rng, 20, 236),
        glyph_color=_color(rng),
        face_size=float(rng.uniform(0.14, 0.19)),
        face_aspect=float(rng.uniform(1.0, 1.4)),
        hair_volume=float(rng.uniform(0.0, 1.0)),
        glyph=glyph,
    )


def make_identities(n: int, seed: int) -> list[Identity]:
    """``n`` identities with unique names and random traits; deterministic given ``seed``."""
    rng = np.random.default_rng([seed, 0x1D])
    names = make_names(n, seed)
    return [_random_identity(name, rng) for name in names]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: (y, x), each size×size."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _paint(img: np.ndarray, mask: np.ndarray, color: Color | np.ndarray) -> None:
    img[mask] = color


def _background(ident: Identity, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The identity's backdrop colour with a random low-frequency texture per photo."""
    theta, phase = rng.uniform(0, 2 * np.pi, size=2)
    freq = rng.uniform(1.5, 5.0)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    blotch = np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * (xx + yy * rng.uniform(-1, 1)) + rng.uniform(0, 6.3))
    tex = rng.uniform(6, 22) * wave + rng.uniform(0, 12) * blotch
    base = np.asarray(ident.background, np.float32) + rng.normal(0.0, 18.0, size=3).astype(np.float32)
    return base + tex[..., None] * rng.uniform(0.6, 1.0, size=3).astype(np.float32)


def _draw_person(img: np.ndarray, ident: Identity, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> None:
    """Body, chest glyph, hair, face, eyes and mouth, with random framing."""
    rx = ident.face_size * rng.uniform(0.88, 1.12)
    ry = rx * ident.face_aspect
    cx = 0.5 + rng.normal(0, 0.045)
    cy = 0.40 + rng.normal(0, 0.035)
    _paint(img, _ellipse(yy, xx, cy + 2.6 * ry, cx, 1.7 * ry, 2.1 * rx), ident.shirt)
    cell = 0.55 * rx
    gu = np.floor((xx - (cx - 2 * cell)) / cell)
    gv = np.floor((yy - (cy + 1.45 * ry)) / cell)
    inside = (gu >= 0) & (gu < 4) & (gv >= 0) & (gv < 4)
    bit = np.where(inside, gv * 4 + gu, 0).astype(np.int64)
    _paint(img, inside & (((ident.glyph >> bit) & 1) == 1), ident.glyph_color)
    hair_bottom = cy + ry * (1.1 * ident.hair_volume - 0.25)
    _paint(img, _ellipse(yy, xx, cy - 0.08 * ry, cx, 1.15 * ry, 1.22 * rx) & (yy < hair_bottom), ident.hair)
    face = _ellipse(yy, xx, cy, cx, ry, rx)
    _paint(img, face, ident.skin)
    _paint(img, face & (yy < cy - ry * (0.62 - 0.3 * ident.hair_volume)), ident.hair)
    for side in (-1.0, 1.0):
        _paint(img, _ellipse(yy, xx, cy - 0.1 * ry, cx + side * 0.42 * rx, 0.2 * rx, 0.2 * rx), ident.eyes)
    mouth = np.asarray(ident.skin, np.float32) * 0.55
    _paint(img, _ellipse(yy, xx, cy + 0.5 * ry, cx, 0.09 * ry, 0.38 * rx), mouth)


def _camera(img: np.ndarray, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, style: Style) -> np.ndarray:
    """Per-photo lighting (gain, gradient, colour cast) and sensor noise, then the style."""
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
    light = rng.uniform(0.82, 1.15) * (1.0 + rng.uniform(0.0, 0.35) * ramp)
    cast = rng.normal(1.0, 0.035, size=3).astype(np.float32)
    img = img * light[..., None] * cast
    if style == "shifted":
        gray = img.mean(axis=-1, keepdims=True)
        img = gray + 0.4 * (img - gray)
        img = 0.75 * img * np.array([1.15, 1.0, 0.8], np.float32) + 40.0
        sigma = 12.0
    else:
        sigma = 5.0
    return img + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)


def render(identity: Identity, rng: np.random.Generator, size: int = 48, style: Style = "default") -> np.ndarray:
    """One photo of ``identity``: uint8 size×size×3. ``style="shifted"`` changes the camera look."""
    if style not in ("default", "shifted"):
        raise ValueError(f"unknown style {style!r}")
    yy, xx = _grid(size)
    img = _background(identity, rng, yy, xx)
    _draw_person(img, identity, rng, yy, xx)
    img = _camera(img, rng, yy, xx, style)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_many(
    identity: Identity, rng: np.random.Generator, n: int, size: int = 48, style: Style = "default"
) -> list[np.ndarray]:
    """``n`` independent photos of ``identity`` drawn from one random stream."""
    return [render(identity, rng, size, style) for _ in range(n)]
