"""The synthetic marketplace catalogue: deterministic look-alike items in a SQLite warehouse."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from meshserve import warehouse
from meshserve.errors import InvalidInput, NotFound
from meshserve.inference.vocabulary import CATEGORY_NAMES, SHIPPING_SIZES, VIOLATIONS

DEFAULT_SEED = 1234
DEFAULT_ITEMS = 2000
LISTING_EPOCH = 1767225600  # 2026-01-01T00:00:00Z: the first listing of the synthetic marketplace
LISTING_INTERVAL_S = 1200  # one new listing about every 20 minutes, so 2,000 items span ~4 weeks

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (235, 205, 50),
    "green": (50, 150, 60),
    "olive": (120, 125, 50),
    "teal": (30, 140, 140),
    "blue": (40, 80, 200),
    "navy": (25, 35, 95),
    "purple": (120, 50, 160),
    "pink": (235, 130, 175),
    "brown": (120, 75, 40),
    "beige": (215, 195, 155),
    "white": (240, 240, 236),
    "grey": (135, 135, 140),
    "black": (30, 30, 32),
}

# Shape family, a house palette of body colours shared by the whole category (that is what
# makes items look alike), and typical physical size (w, h, d cm), weight kg and price.
CATEGORIES: dict[str, dict] = {
    "mug": dict(body=("white", "black", "red", "navy"), size=(9, 10, 9), kg=0.35, price=12),
    "bottle": dict(body=("teal", "grey", "blue", "green"), size=(8, 25, 8), kg=0.4, price=18),
    "sneaker": dict(body=("white", "black", "grey", "red"), size=(30, 12, 11), kg=0.8, price=70),
    "backpack": dict(body=("navy", "black", "olive", "red"), size=(30, 45, 18), kg=1.1, price=55),
    "lamp": dict(body=("beige", "white", "black", "yellow"), size=(25, 45, 25), kg=2.0, price=40),
    "chair": dict(body=("brown", "black", "white", "grey"), size=(45, 85, 50), kg=6.0, price=90),
    "watch": dict(body=("black", "brown", "grey", "navy"), size=(4, 24, 1), kg=0.1, price=120),
    "headphones": dict(body=("black", "white", "grey", "blue"), size=(18, 20, 8), kg=0.3, price=80),
    "handbag": dict(body=("brown", "black", "beige", "red"), size=(32, 24, 12), kg=0.9, price=95),
    "teapot": dict(body=("white", "teal", "red", "beige"), size=(22, 16, 15), kg=0.9, price=30),
    "vase": dict(body=("blue", "white", "teal", "yellow"), size=(14, 30, 14), kg=1.2, price=35),
    "phone": dict(body=("black", "white", "blue", "pink"), size=(7, 15, 1), kg=0.2, price=250),
    "book": dict(body=("red", "navy", "green", "yellow"), size=(15, 23, 3), kg=0.5, price=15),
    "tshirt": dict(body=("white", "black", "grey", "navy"), size=(50, 70, 2), kg=0.2, price=20),
    "umbrella": dict(body=("black", "navy", "red", "yellow"), size=(90, 80, 90), kg=0.6, price=25),
    "guitar": dict(body=("brown", "black", "red", "beige"), size=(38, 100, 10), kg=3.5, price=300),
}
assert tuple(CATEGORIES) == CATEGORY_NAMES, "one description per category, in the models' order"

ACCENT_COLORS = ("black", "white", "grey", "brown", "beige", "navy")
DETAIL_COLORS = ("red", "orange", "yellow", "green", "blue", "pink", "purple", "teal", "white",
                 "black")
PATTERNS = ("plain", "hstripes", "vstripes", "diagonal", "dots", "checks", "band")
LOGOS = ("none", "circle", "square", "triangle", "star", "cross", "diamond", "ring")

_ADJECTIVES = ("classic", "modern", "vintage", "compact", "sturdy", "elegant", "lightweight",
               "handmade", "minimal", "retro", "premium", "everyday")
_CONDITIONS = ("brand new", "like new", "gently used", "used, good condition", "well loved")
_BRANDS = ("Norda", "Kestrel", "Alvo", "Brindle", "Osso", "Tamrin", "Vell", "Quarry", "Lumen",
           "Pike & Co")
_FILLER = ("Smoke-free home.", "Ships within two days.", "Pick-up also possible.",
           "Price is firm.", "Open to offers.", "Comes with original box.", "Barely used.",
           "Great gift idea.", "Selling because I am moving.", "Clean and ready to use.")
# Violation cues: strong words almost every violating listing carries, weak words that are
# merely more common among violators (and show up in clean listings too). The noise keeps
# the classifiers honest: learnable to ROC AUC ≥ 0.95, but not by a single keyword.
_CUES: dict[str, dict[str, tuple[str, ...]]] = {
    "counterfeit": dict(
        strong=("replica", "1:1 copy", "AAA quality", "mirror quality", "unbranded version of",
                "inspired by the original", "no receipt, super clone"),
        weak=("designer", "luxury", "famous brand", "cheap", "best price"),
    ),
    "prohibited": dict(
        strong=("switchblade", "pepper spray", "prescription pills", "lock picks", "knuckle duster",
                "ivory inlay", "fireworks bundle", "stun gun"),
        weak=("discreet", "no questions", "cash only", "collector", "rare"),
    ),
    "contact_info": dict(
        strong=("whatsapp me at", "text 07", "email me at", "call me on", "find me on telegram",
                "pay outside the app"),
        weak=("quick reply", "message me", "contact", "dm", "available today"),
    ),
}
_VIOLATION_RATE = 0.12
_STRONG_RATE = 0.93  # a violator carries a strong cue with this probability
_FALSE_CUE_RATE = 0.015  # a clean listing carries a strong cue with this probability
_WEAK_RATE_POS, _WEAK_RATE_NEG = 0.6, 0.15


@dataclass(frozen=True)
class Look:
    """How an item looks; the renderer draws exactly this."""

    shape: str  # the category's shape family
    body_color: str
    accent_color: str
    pattern: str
    pattern_color: str
    pattern_scale: int  # 0 fine, 1 medium, 2 coarse
    logo: str
    logo_color: str
    logo_pos: tuple[float, float]  # logo centre in the body's unit box
    aspect: float  # width / height multiplier on the family's base proportions
    n_parts: int  # small parts: buttons, rivets, studs
    part_color: str

    def key(self) -> tuple:
        """The discrete identity of a look; no two items of the catalogue share it."""
        return (self.shape, self.body_color, self.accent_color, self.pattern, self.pattern_color,
                self.pattern_scale, self.logo, self.logo_color, self.n_parts, self.part_color)


@dataclass(frozen=True)
class Item:
    """One listing of the marketplace."""

    item_id: int
    title: str
    description: str
    price: float
    category: str
    width_cm: float
    height_cm: float
    depth_cm: float
    weight_kg: float
    listed_at: int  # unix seconds
    shipping_size: str
    violations: tuple[str, ...]
    look: Look

    @property
    def category_index(self) -> int:
        return CATEGORY_NAMES.index(self.category)

    def label(self, violation: str) -> int:
        """1 if the item carries `violation`, else 0."""
        if violation not in VIOLATIONS:
            raise InvalidInput(f"unknown violation {violation!r}; known: {', '.join(VIOLATIONS)}")
        return int(violation in self.violations)

    def to_dict(self) -> dict:
        return asdict(self)


def _rng(seed: int, item_id: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, item_id, attempt, 0xCA7A]))


def shipping_size_for(width: float, height: float, depth: float, weight: float) -> str:
    """Carrier size class from the parcel's largest side, volume and weight."""
    small, medium, large, oversize = SHIPPING_SIZES
    volume = width * height * depth
    side = max(width, height, depth)
    if side <= 25 and volume <= 2500 and weight <= 1.0:
        return small
    if side <= 50 and volume <= 25000 and weight <= 5.0:
        return medium
    if side <= 90 and volume <= 160000 and weight <= 15.0:
        return large
    return oversize


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _make_look(rng: np.random.Generator, category: str) -> Look:
    spec = CATEGORIES[category]
    body = _choice(rng, spec["body"])
    accent = _choice(rng, [c for c in ACCENT_COLORS if c != body])
    details = [c for c in DETAIL_COLORS if c != body]
    return Look(
        shape=category,
        body_color=body,
        accent_color=accent,
        pattern=_choice(rng, PATTERNS),
        pattern_color=_choice(rng, details),
        pattern_scale=int(rng.integers(3)),
        logo=_choice(rng, LOGOS),
        logo_color=_choice(rng, details),
        logo_pos=(round(float(rng.uniform(0.3, 0.7)), 3), round(float(rng.uniform(0.3, 0.7)), 3)),
        aspect=round(float(rng.uniform(0.8, 1.25)), 3),
        n_parts=int(rng.integers(4)),
        part_color=_choice(rng, details),
    )


def _violations(rng: np.random.Generator) -> tuple[tuple[str, ...], list[str]]:
    """Which violations the item has and the phrases its text will carry."""
    labels: list[str] = []
    phrases: list[str] = []
    for name in VIOLATIONS:
        cues = _CUES[name]
        positive = rng.random() < _VIOLATION_RATE
        if positive:
            labels.append(name)
        if rng.random() < (_STRONG_RATE if positive else _FALSE_CUE_RATE):
            phrases.append(_choice(rng, cues["strong"]))
        if rng.random() < (_WEAK_RATE_POS if positive else _WEAK_RATE_NEG):
            phrases.append(_choice(rng, cues["weak"]))
    return tuple(labels), phrases


def make_item(item_id: int, seed: int = DEFAULT_SEED, taken: set | None = None) -> Item:
    """Item `item_id` of the catalogue for `seed`; `taken` holds looks already used."""
    for attempt in range(100):
        rng = _rng(seed, item_id, attempt)
        category = CATEGORY_NAMES[int(rng.integers(len(CATEGORY_NAMES)))]
        look = _make_look(rng, category)
        if taken is None or look.key() not in taken:
            break
    else:  # pragma: no cover - 10^5 looks per category, a few hundred items each
        raise RuntimeError(f"no unique look for item {item_id}")
    spec = CATEGORIES[category]
    w0, h0, d0 = spec["size"]
    scale = float(rng.uniform(0.75, 1.35))
    width = round(w0 * scale * look.aspect, 1)
    height = round(h0 * scale, 1)
    depth = round(d0 * scale * float(rng.uniform(0.85, 1.15)), 1)
    weight = round(spec["kg"] * scale**3 * float(rng.uniform(0.8, 1.2)), 2)
    labels, phrases = _violations(rng)
    price = spec["price"] * scale * float(rng.lognormal(0.0, 0.35))
    if "counterfeit" in labels:
        price *= float(rng.uniform(0.3, 0.8))  # fakes tend to be suspiciously cheap
    brand = _choice(rng, _BRANDS)
    adjective = _choice(rng, _ADJECTIVES)
    pattern_word = "" if look.pattern == "plain" else f" {look.pattern_color} {look.pattern}"
    title = f"{brand} {adjective} {look.body_color} {category}{pattern_word}"
    sentences = [
        f"{adjective.capitalize()} {category} in {look.body_color} with {look.accent_color} trim.",
        f"Condition: {_choice(rng, _CONDITIONS)}.",
        f"Size {width:g} x {height:g} x {depth:g} cm, {weight:g} kg.",
        _choice(rng, _FILLER),
    ]
    for phrase in phrases:  # cues land in the title or somewhere in the description
        if rng.random() < 0.3:
            title = f"{title} {phrase}"
        else:
            sentences.insert(int(rng.integers(len(sentences) + 1)), phrase.capitalize() + ".")
    listed_at = LISTING_EPOCH + item_id * LISTING_INTERVAL_S + int(rng.integers(LISTING_INTERVAL_S))
    return Item(
        item_id=item_id,
        title=title,
        description=" ".join(sentences),
        price=round(max(price, 1.0), 2),
        category=category,
        width_cm=width,
        height_cm=height,
        depth_cm=depth,
        weight_kg=weight,
        listed_at=int(listed_at),
        shipping_size=shipping_size_for(width, height, depth, weight),
        violations=labels,
        look=look,
    )


def generate_items(n_items: int = DEFAULT_ITEMS, seed: int = DEFAULT_SEED) -> list[Item]:
    """The first `n_items` items for `seed`; a smaller catalogue is a prefix of a larger one."""
    if n_items < 1:
        raise InvalidInput(f"a catalogue needs at least one item, got {n_items}")
    taken: set = set()
    items = []
    for item_id in range(n_items):
        item = make_item(item_id, seed, taken)
        taken.add(item.look.key())
        items.append(item)
    return items


# ------------------------------------------------------------- in and out of the warehouse

def build_catalogue(
    n_items: int = DEFAULT_ITEMS, seed: int = DEFAULT_SEED, home: Path | None = None
) -> Path:
    """Generate the catalogue and write it to the warehouse (replacing what was there)."""
    items = generate_items(n_items, seed)
    path = warehouse.catalogue_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with warehouse.connect(tmp) as conn:
        conn.executescript(warehouse.SCHEMA)
        conn.executemany(
            warehouse.INSERT_ITEM,
            [_to_row(item) for item in items],
        )
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("seed", str(seed)), ("n_items", str(n_items)), ("schema", str(warehouse.SCHEMA_VERSION))],
        )
    conn.close()
    tmp.replace(path)  # readers see the old catalogue or the new one, never half of one
    return path


def _to_row(item: Item) -> tuple:
    return (item.item_id, item.title, item.description, item.price, item.category, item.width_cm,
            item.height_cm, item.depth_cm, item.weight_kg, item.listed_at, item.shipping_size,
            json.dumps(list(item.violations)), json.dumps(asdict(item.look)))


def _from_row(row: sqlite3.Row) -> Item:
    look = json.loads(row["look"])
    look["logo_pos"] = tuple(look["logo_pos"])
    return Item(
        item_id=int(row["item_id"]), title=row["title"], description=row["description"],
        price=float(row["price"]), category=row["category"], width_cm=float(row["width_cm"]),
        height_cm=float(row["height_cm"]), depth_cm=float(row["depth_cm"]),
        weight_kg=float(row["weight_kg"]), listed_at=int(row["listed_at"]),
        shipping_size=row["shipping_size"], violations=tuple(json.loads(row["violations"])),
        look=Look(**look),
    )


def catalogue_meta(home: Path | None = None) -> dict[str, str]:
    """seed, n_items and schema version of the stored catalogue."""
    conn = warehouse.open_existing(home)
    try:
        return {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")}
    finally:
        conn.close()


def load_items(
    home: Path | None = None,
    *,
    ids: Iterable[int] | None = None,
    id_range: tuple[int, int] | None = None,
    time_range: tuple[int, int] | None = None,
    category: str | None = None,
    limit: int | None = None,
) -> list[Item]:
    """Items of the warehouse ordered by id; ranges are half-open [lo, hi)."""
    where: list[str] = []
    params: list = []
    if ids is not None:
        id_list = [int(i) for i in ids]
        if not id_list:
            return []
        where.append(f"item_id IN ({', '.join('?' * len(id_list))})")
        params += id_list
    if id_range is not None:
        where.append("item_id >= ? AND item_id < ?")
        params += [int(id_range[0]), int(id_range[1])]
    if time_range is not None:
        where.append("listed_at >= ? AND listed_at < ?")
        params += [int(time_range[0]), int(time_range[1])]
    if category is not None:
        if category not in CATEGORIES:
            raise InvalidInput(f"unknown category {category!r}")
        where.append("category = ?")
        params.append(category)
    sql = "SELECT * FROM items"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY item_id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    conn = warehouse.open_existing(home)
    try:
        return [_from_row(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def get_item(item_id: int, home: Path | None = None) -> Item:
    """One item by id, or NotFound."""
    found = load_items(home, ids=[item_id])
    if not found:
        raise NotFound(f"no item {item_id} in the catalogue")
    return found[0]


def items_by_time(start: int, end: int, home: Path | None = None) -> list[Item]:
    """Items listed in [start, end) unix seconds: one day of new listings is one shard."""
    return load_items(home, time_range=(start, end))


def items_by_id_range(lo: int, hi: int, home: Path | None = None) -> list[Item]:
    """Items with lo <= item_id < hi."""
    return load_items(home, id_range=(lo, hi))


def append_items(n_new: int, home: Path | None = None) -> list[Item]:
    """New listings arrive: the next `n_new` items of the warehouse's own sequence, added to it.

    Deterministic (the catalogue is a prefix of a longer one for its seed), so a re-run of the
    pipeline from the same state appends the same listings.
    """
    if n_new < 1:
        raise InvalidInput(f"append needs at least one item, got {n_new}")
    conn = warehouse.open_existing(home)
    try:
        with conn:
            meta = {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")}
            seed, have = int(meta["seed"]), int(meta["n_items"])
            items = generate_items(have + n_new, seed)[have:]
            conn.executemany(
                warehouse.INSERT_ITEM,
                [_to_row(item) for item in items],
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'n_items'", (str(have + n_new),))
    finally:
        conn.close()
    return items
