"""Tokenizer and singularizer of the original CHAIR scorer, re-implemented without its dependencies.

The original ``utils/chair.py`` (github.com/LisaAnne/Hallucination, Rohrbach et al. 2018) runs
``nltk.word_tokenize`` on the lower-cased caption and ``pattern.en.singularize`` on every token.
Neither package is a dependency here (NLTK's tokenizer also needs the ``punkt`` data download), so
this module reproduces their observable behaviour:

- :func:`treebank_tokenize`: NLTK's Treebank word tokenizer with the Unicode-quote additions that
  ``word_tokenize`` installs, run per sentence. Punkt's sentence splitting is approximated: a
  sentence ends at a period that ends a word and is followed by white space or punctuation. Punkt
  additionally keeps the period of a known abbreviation, initial or ordinal number attached
  ("mr.", "no."); no COCO word or synonym is among those, so CHAIR mentions are unaffected.
- :func:`pattern_singularize`: the rule cascade of ``pattern.en.singularize`` (Pattern 3.6, CLiPS,
  BSD licence; its rules derive from Bermi Ferrer's Inflector), including its quirks: "bus" ->
  "bu", "glass" -> "glas", "ties" -> "ty", "canoes" -> "cano", "thieves" -> "thieve", "kine" ->
  "cow", "collies" and "doggies" unchanged.

See ``docs/evaluation.md`` ("CHAIR variants") for the consequences on CHAIR.
"""

from __future__ import annotations

import re
from functools import lru_cache

# ----------------------------------------------------------------------------- singularize

# Words returned unchanged, and so is every word that is a *suffix* of one of them (pattern
# tests ``listed.endswith(word)``, so e.g. "ice" is kept because of "rice").
_UNINFLECTED = frozenset(
    """
    bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn
    high-jinks proceedings whiting britches eland homework rabies wildebeest carp elk innings
    salmon chassis flounder jackanapes scissors christmas gallows mackerel series clippers
    georgia measles shears cod graffiti mews species contretemps mumps swine corps news swiss
    advice equipment happiness luggage software bread fruit information mathematics progress
    understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge
    meat rice electricity gravel love mustard sand
    """.split()
)
# Plurals in -ies whose singular ends in -ie: a word ending in one of these + "s" is returned
# unchanged (not reduced). "^pie" and "^tie" are literal strings in pattern, so they never match:
# "ties" falls through to the -ies -> -y rule.
_IE_STEMS = tuple(
    """
    alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie
    eyrie indie oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie
    laddie pixie techie bombie groupie laramie quickie ^tie collie hankie lingerie reverie
    toughie cookie hippie meanie rookie valkyrie
    """.split()
)
# Irregular plural suffix -> singular suffix, matched against the end of the word ("women" ->
# "woman", "four" -> "fmy"). No key is a suffix of another, so their order does not matter.
_IRREGULAR_SUFFIXES: dict[str, str] = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef",
    "brethren": "brother", "children": "child", "corpora": "corpus", "corpuses": "corpus",
    "ephemerides": "ephemeris", "feet": "foot", "ganglia": "ganglion", "geese": "goose",
    "genera": "genus", "genii": "genie", "graffiti": "graffito", "helves": "helve", "kine": "cow",
    "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose", "monies": "money",
    "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox",
    "penes": "penis", "penises": "penis", "people": "person", "sexes": "sex",
    "soliloquies": "soliloquy", "teeth": "tooth", "testes": "testis", "trilbys": "trilby",
    "turves": "turf", "zoa": "zoon",
}  # fmt: skip
_PREPOSITIONS = frozenset(
    """
    about before during of till above behind except off to across below for on under after
    beneath from onto until among beside in out unto around besides into over upon at between
    near since with athwart betwixt beyond but by
    """.split()
)
# (pattern, replacement), first match wins. Character classes are written as pattern's regexes
# behave, e.g. "[m|l]" is the set {m, |, l} and "[octop|vir]" the set {c, i, o, p, r, t, v, |}.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"(.)ae$", r"\1a"),
        (r"(.)itis$", r"\1itis"),
        (r"(.)eaux$", r"\1eau"),
        (r"quizzes$", "quiz"),
        (r"matrices$", "matrix"),
        (r"(ap|vert|ind)ices$", r"\1ex"),
        (r"^oxen", "ox"),
        (r"(alias|status)es$", r"\1"),
        (r"([cioprtv|])i$", r"\1us"),
        (r"(cris|ax|test)es$", r"\1is"),
        (r"shoes$", "shoe"),
        (r"oes$", "o"),
        (r"buses$", "bus"),
        (r"([ml|])ice$", r"\1ouse"),
        (r"(x|ch|ss|sh)es$", r"\1"),
        (r"movies$", "movie"),
        (r"(.)ombies$", r"\1ombie"),
        (r"series$", "series"),
        (r"([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"),
        (r"([^d]ea)ves$", r"\1f"),
        (r"arves$", "arf"),
        (r"erves$", "erve"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"),
        (r"([st]ive|hive)s$", r"\1"),
        (r"([^f])ves$", r"\1fe"),
        (r"^analyses$", "analysis"),
        (r"(analy)ses$", r"\1asis"),  # pattern also re-inserts its inner "(a)" group here
        (r"(ba|diagno|parenthe|progno|synop|the)ses$", r"\1sis"),
        (r"(.)opses$", r"\1opsis"),
        (r"(.)yses$", r"\1ysis"),
        (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(.)oses$", r"\1osis"),
        (r"([ti])a$", r"\1um"),
        (r"news$", "news"),
        (r"s$", ""),
    )
)


@lru_cache(maxsize=65536)
def pattern_singularize(word: str) -> str:
    """``pattern.en.singularize(word)`` for a lower-case token, quirks included."""
    if "-" in word:
        parts = word.split("-")
        if parts[1] in _PREPOSITIONS:
            return pattern_singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return pattern_singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(listed.endswith(w) for listed in _UNINFLECTED):
        return word
    if any(w.endswith(stem + "s") for stem in _IE_STEMS):
        return w
    for plural, singular in _IRREGULAR_SUFFIXES.items():
        if w.endswith(plural):
            return word[: len(word) - len(plural)] + singular
    for rule, replacement in _RULES:
        if rule.search(word):
            return rule.sub(replacement, word, count=1)
    return word


# ----------------------------------------------------------------------------- tokenize

# A sentence ends at a period that ends a word (not an ellipsis) and is followed by white space
# and more text, or by one of punkt's "after token" punctuation characters.
_SENTENCE_END = re.compile(r"(?<=[^\s.])\.(?=[?!)\";}\]*:@'({\[]|\s+\S)")

_STARTING_QUOTES = (
    (re.compile(r"([«“‘„]|[`]+)"), r" \1 "),  # added by word_tokenize
    (re.compile(r'^"'), "``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'{2})"), r"\1 `` "),
)
_PUNCTUATION = (
    (re.compile(r"([^\.])(\.)([\]\)}>\"'»”’ ]*)\s*$"), r"\1 \2 \3 "),  # added by word_tokenize
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.\.\."), " ... "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"([^\.])(\.)([\]\)}>\"']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
)
_PARENS = re.compile(r"[\]\[\(\)\{\}\<\>]")
_ENDING_QUOTES = (
    (re.compile(r"([»”’])"), r" \1 "),  # added by word_tokenize
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
)
_CONTRACTIONS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\b(can)(not)\b",
        r"\b(d)('ye)\b",
        r"\b(gim)(me)\b",
        r"\b(gon)(na)\b",
        r"\b(got)(ta)\b",
        r"\b(lem)(me)\b",
        r"\b(more)('n)\b",
        r"\b(wan)(na)(?=\s)",
        r" ('t)(is)\b",
        r" ('t)(was)\b",
    )
)


def _treebank(sentence: str) -> list[str]:
    text = sentence
    for rule, sub in (*_STARTING_QUOTES, *_PUNCTUATION):
        text = rule.sub(sub, text)
    text = _PARENS.sub(r" \g<0> ", text)
    text = " " + text.replace("--", " -- ") + " "
    for rule, sub in _ENDING_QUOTES:
        text = rule.sub(sub, text)
    for rule in _CONTRACTIONS:
        text = rule.sub(r" \1 \2 ", text)
    return text.split()


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` as punkt would cut it, up to abbreviations (see the module docstring)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.end()])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip()]


def treebank_tokenize(text: str) -> list[tuple[str, int, int]]:
    """``nltk.word_tokenize(text)`` with character spans ``(token, start, end)`` into ``text``.

    A quote that the tokenizer rewrote (``"`` or ``''`` -> two backticks) keeps the span of its source.
    """
    tokens = [tok for sentence in split_sentences(text) for tok in _treebank(sentence)]
    spans: list[tuple[str, int, int]] = []
    pos = 0
    for tok in tokens:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith(tok, pos):
            end = pos + len(tok)
        elif tok in ("``", "''") and text.startswith(('"', "''", "``"), pos):
            end = pos + (1 if text[pos] == '"' else 2)
        else:  # not expected; keep the cursor monotonic
            found = text.find(tok, pos)
            pos, end = (found, found + len(tok)) if found >= 0 else (pos, pos)
        spans.append((tok, pos, end))
        pos = end
    return spans
