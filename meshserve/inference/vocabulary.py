"""The output vocabularies models are trained on and answer in: categories, violations, sizes."""

from __future__ import annotations

# Order matters: a detector's label i is CATEGORY_NAMES[i], a shipping estimate's column j is
# SHIPPING_SIZES[j]. The catalogue describes each category (training/catalogue.py CATEGORIES).
CATEGORY_NAMES = (
    "mug",
    "bottle",
    "sneaker",
    "backpack",
    "lamp",
    "chair",
    "watch",
    "headphones",
    "handbag",
    "teapot",
    "vase",
    "phone",
    "book",
    "tshirt",
    "umbrella",
    "guitar",
)
VIOLATIONS = ("counterfeit", "prohibited", "contact_info")
SHIPPING_SIZES = ("small", "medium", "large", "oversize")
