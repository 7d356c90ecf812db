"""Subject category names: one normal form, so that "Dogs", "a dog" and "brown dog"
count as the same vote in category consensus and ask the detector for the same thing.

The normal form is lowercase, without articles, leading colour or size adjectives and
surrounding punctuation, with the last word made singular ("teddy bears" -> "teddy
bear"). Pure rules, no model: deterministic and cheap.
"""
from __future__ import annotations

import re

# Things a VLM tends to list that are not subjects one can photograph on their own.
NOT_SUBJECTS = frozenset({
    "background", "scene", "scenery", "image", "picture", "photo", "frame", "sky", "ground",
    "floor", "wall", "ceiling", "grass", "road", "street", "water", "light", "shadow", "text",
    "logo", "watermark", "nothing", "none", "unknown", "object", "thing", "noun", "cloud",
    "field", "horizon", "sunlight", "surface", "area", "space", "view", "blur",
})

_ARTICLES = ("a", "an", "the", "some")
# Adjectives dropped in front of a noun: a "red car" and a "blue car" are both cars, and
# open-vocabulary detectors are asked for the kind, not the look.
_ADJECTIVES = frozenset({
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "silver", "golden", "gold", "beige", "dark", "light", "bright", "colorful",
    "colourful", "small", "large", "big", "little", "tiny", "huge", "tall", "short", "young",
    "old", "cute",
})
_IRREGULAR = {
    "people": "person", "persons": "person", "men": "man", "women": "woman", "children": "child",
    "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox",
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "wolves": "wolf",
    "calves": "calf", "halves": "half", "shelves": "shelf", "loaves": "loaf", "thieves": "thief",
    "scarves": "scarf", "elves": "elf", "tomatoes": "tomato", "potatoes": "potato",
    "heroes": "hero", "mangoes": "mango", "volcanoes": "volcano", "buses": "bus",
    "cactuses": "cactus", "cacti": "cactus", "octopuses": "octopus", "walruses": "walrus",
    "platypuses": "platypus", "hippopotamuses": "hippopotamus", "viruses": "virus",
    "cookies": "cookie", "movies": "movie", "zombies": "zombie", "hoodies": "hoodie",
    "collies": "collie", "budgies": "budgie", "beanies": "beanie", "brownies": "brownie",
    "dice": "die", "indices": "index", "matrices": "matrix", "vertices": "vertex",
}
# The same word in singular and plural, or words that end like a plural but are not one.
_INVARIANT = frozenset({
    "sheep", "deer", "fish", "aircraft", "series", "species", "bison", "moose", "salmon",
    "trout", "shrimp", "cattle", "police", "glasses", "scissors", "pants", "jeans", "shorts",
    "trousers", "binoculars", "headphones", "tongs", "pliers", "news", "chess", "physics", "lens",
    "canvas", "atlas",
})
_CATEGORY_RE = re.compile(r"^[a-z][a-z' -]{0,39}$")


def singular(word: str) -> str:
    """English singular of one lowercase noun, by rule (plural endings and a table)."""
    if word in _INVARIANT or len(word) <= 3:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"                        # puppies, butterflies
    if word.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return word[:-2]                              # watches, dishes, dresses, boxes
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]                              # dogs, horses, bikes, toys
    return word


def normalise_category(text: str) -> str:
    """The normal form of a category name ("" when nothing is left of it)."""
    words = " ".join(text.lower().replace("_", " ").split()).strip(" .,;:!?\"'").split(" ")
    while words and words[0] in _ARTICLES:
        words = words[1:]
    while len(words) > 1 and words[0] in _ADJECTIVES:
        words = words[1:]
    if not words or not words[0]:
        return ""
    return " ".join([*words[:-1], singular(words[-1])])


def category_problem(name: str, allowed: frozenset[str] | None = None) -> str | None:
    """Why a normalised name is not a subject category, or None when it is one."""
    if not _CATEGORY_RE.match(name) or len(name.split()) > 4:
        return "not a short noun"
    if name in NOT_SUBJECTS:
        return "not a subject"
    if allowed is not None and name not in allowed:
        return "not in the vocabulary"
    return None


def screen_categories(items: list, allowed: frozenset[str] | None = None,
                      max_categories: int = 8) -> tuple[list[str], list[str]]:
    """(valid names in normal form, each once; refused entries as "word (why)")."""
    valid: list[str] = []
    rejected: list[str] = []
    for item in items:
        name = normalise_category(item) if isinstance(item, str) else ""
        problem = category_problem(name, allowed) if isinstance(item, str) else "not text"
        if problem:
            rejected.append(f"{(name or repr(item))[:40]} ({problem})")
        elif name not in valid:
            valid.append(name)
    return valid[:max_categories], rejected


__all__ = ["NOT_SUBJECTS", "category_problem", "normalise_category", "screen_categories", "singular"]
