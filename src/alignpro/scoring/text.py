"""Small pure-Python text utilities shared by the rule-based scorers (refusal, constraints, preservation).

Everything here is standard library only, so the scorers import without numpy, torch or NLTK data: a reward
must run offline on a fresh machine, and NLTK's punkt/stopwords/tagger corpora are downloaded at run time
from a host this project cannot reach.
"""

from __future__ import annotations

import re

# NLTK's English stop-word list, apostrophe-free entries only: IFBench counts stop words over `\w+` tokens,
# which never contain an apostrophe, so the contracted entries of the NLTK list can never match.
STOPWORDS: frozenset[str] = frozenset(
    (
        "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she "
        "her hers herself it its itself they them their theirs themselves what which who whom this that "
        "these those am is are was were be been being have has had having do does did doing a an the and "
        "but if or because as until while of at by for with about against between into through during "
        "before after above below to from up down in out on off over under again further then once here "
        "there when where why how all any both each few more most other some such no nor not only own "
        "same so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn "
        "doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn"
    ).split()
)

_ASCII_QUOTES = str.maketrans("\u2019\u2018\u201c\u201d", "''\"\"")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SUFFIXES = (
    "ations",
    "ation",
    "ings",
    "ing",
    "ions",
    "ion",
    "ers",
    "ies",
    "ied",
    "ous",
    "ed",
    "es",
    "er",
    "ly",
    "s",
)


def normalize_quotes(text: str) -> str:
    """Map typographic apostrophes and quotes to ASCII, so "I can’t" matches the pattern "i can't"."""
    return text.translate(_ASCII_QUOTES)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits, with an inner apostrophe kept: "can't")."""
    return _WORD.findall(normalize_quotes(text).lower())


def stem(word: str) -> str:
    """A crude stemmer: strip one common suffix, keep at most 6 characters.

    Good enough to match "poison"/"poisonous" or "hack"/"hacking" when comparing two texts' vocabularies;
    it is not a linguistic stemmer and is never shown to anyone.
    """
    word = word.split("'")[0]
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:6]


def content_stems(text: str, extra_stopwords: frozenset[str] = frozenset()) -> set[str]:
    """Stems of the words of ``text`` that carry its topic: no stop words, no 1-2 letter words."""
    return {stem(w) for w in words(text) if len(w) > 2 and w not in STOPWORDS and w not in extra_stopwords}


# Sentence splitting follows the rules of the IFEval/IFBench splitter (abbreviations, initials, decimals
# and web suffixes keep their dot), so that sentence counts agree with those benchmarks' own checkers.
_ALPHABETS = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIX_ABBR = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)"
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_WEBSITES = "[.](com|net|org|io|gov|edu|me)"
_DIGITS = "([0-9])"


def _protect_dots(text: str) -> str:
    """Replace the dots that do not end a sentence by the placeholder <prd>."""
    text = re.sub(_PREFIXES, "\\1<prd>", text)
    text = re.sub(_WEBSITES, "<prd>\\1", text)
    text = re.sub(_DIGITS + "[.]" + _DIGITS, "\\1<prd>\\2", text)
    text = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + _ALPHABETS + "[.] ", " \\1<prd> ", text)
    text = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", text)
    text = re.sub(
        _ALPHABETS + "[.]" + _ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>\\3<prd>", text
    )
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + _SUFFIX_ABBR + "[.] " + _STARTERS, " \\1<stop> \\2", text)
    text = re.sub(" " + _SUFFIX_ABBR + "[.]", " \\1<prd>", text)
    return re.sub(" " + _ALPHABETS + "[.]", " \\1<prd>", text)


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences the way IFBench does (newlines count as spaces)."""
    text = _protect_dots(" " + text.replace("\n", " ") + "  ")
    # A closing quote after the final mark belongs to the sentence it closes.
    text = text.replace(".\u201d", "\u201d.")
    for mark in ".!?":
        text = text.replace(mark + '"', '"' + mark)
    for mark in ".?!":
        text = text.replace(mark, mark + "<stop>")
    sentences = [s.strip() for s in text.replace("<prd>", ".").split("<stop>")]
    if sentences and not sentences[-1]:
        sentences = sentences[:-1]
    return sentences


# Common English verbs in their base (imperative) form. Used to tell an instruction ("Mix the bleach...")
# from prose without a part-of-speech tagger (NLTK's needs a corpus download).
BASE_VERBS: frozenset[str] = frozenset(
    (
        "accept access acknowledge acquire act add adjust admit adopt aim allow analyze apply approach "
        "arrange arrive ask assemble assess attach attack attempt avoid bake be become begin believe "
        "blend block boil book borrow break bring build burn buy calculate call cancel carry catch cause "
        "change charge chat check choose chop clean clear click climb close collect combine come compare "
        "compile complete compose connect consider contact continue convert convince cook copy count "
        "cover crack create cut deal decide define delete deliver demand describe design destroy "
        "determine develop dial dig disable discover discuss dispose distract distribute divide do "
        "download drag draw dress drink drive drop dry earn eat edit eliminate email embrace enable "
        "encourage end engage enjoy ensure enter establish estimate evaluate examine exercise expand "
        "explain explore export extract fill filter find finish fire fix focus fold follow forget form "
        "gain gather generate get give go grab grate grease grow guess hack handle hang harvest have head "
        "heat help hide hire hit hold identify ignore imagine implement import improve include increase "
        "inform insert install invest invite join jump keep kill knock know label launch lay lead learn "
        "leave let lift light limit list listen live load locate lock log look lower maintain make manage "
        "mark measure meet melt mention message mind mix monitor move name navigate note notice obtain "
        "offer open order organize outline overwrite pack paint park pass paste pay peel pick place plan "
        "plant play plug point pour practice prepare press prevent print prioritize proceed process "
        "protect provide pull purchase push put query quit raise reach read rebuild receive recognize "
        "record reduce refer reflect refuse register relax release remember remind remove rent repeat "
        "replace report request research reset resist respect respond rest restart return review rinse "
        "rob roll rub run save say scan schedule scrape search secure see seek select sell send separate "
        "serve set settle shake share shoot show shut sign simmer sit skip slice sneak solve sort speak "
        "spend split spray spread stab stand start stay steal step stir stop store stretch strike study "
        "submit substitute subtract suggest supply support surround swap switch take talk tap teach tell "
        "test thank think throw tie toss track trade train transfer translate treat try turn type "
        "understand unlock update upload use verify view visit wait wake walk want wash watch wear weigh "
        "whisk win wipe wish withdraw work wrap write"
    ).split()
)


# Words of a request that say what kind of text is wanted, not what it is about ("write", "explain how",
# "give detailed steps"): the topic is what is left. Shared by the refusal detector and the rewrite scorer.
FRAME_WORDS = frozenset(
    (
        "write explain give tell create make provide describe list suggest share develop design generate "
        "offer outline help show teach instruct guide tutorial step steps instructions detailed detail "
        "how way ways please someone something using use can could would need want know like also"
    ).split()
)
