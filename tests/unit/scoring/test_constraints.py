"""The IFBench constraint checkers: handwritten passing and failing responses, and the reward's shape."""

from __future__ import annotations

import math
from typing import Any

import pytest

from alignpro.scoring.constraints import (
    APPROXIMATE_IDS,
    NO_CONSTRAINT_REWARD,
    check,
    constraint_pass,
    constraint_report,
    constraints,
    make_constraints_reward,
    supported_ids,
    syllables,
)

# (instruction id, kwargs, response, expected). The expectations follow IFBench's reference checkers.
CASES: list[tuple[str, dict[str, Any], str, bool]] = [
    ("format:sub-bullets", {}, "* Apples\n  - red ones\n* Pears\n  - green ones", True),
    ("format:sub-bullets", {}, "* Apples\n  - red ones\n* Pears", False),
    ("words:consonants", {}, "Strong crisp glyphs fly", True),
    ("words:consonants", {}, "Strong crisp idea", False),
    ("ratio:stop_words", {"percentage": 40.0}, "Quick brown foxes jump over lazy dogs", True),
    ("ratio:stop_words", {"percentage": 40.0}, "It is in the house and it is on the roof", False),
    ("sentence:keyword", {"word": "eat", "N": 2.0}, "I woke up. Then we eat bread. Bye.", True),
    ("sentence:keyword", {"word": "eat", "N": 2.0}, "We eat bread. Then I slept.", False),
    ("count:word_count_range", {"min_words": 3.0, "max_words": 5.0}, "One two three four.", True),
    ("count:word_count_range", {"min_words": 3.0, "max_words": 5.0}, "One two.", False),
    ("words:no_consecutive", {}, "Cats eat fish daily", True),
    ("words:no_consecutive", {}, "Cats can eat fish", False),
    ("format:line_indent", {}, "One\n  two\n    three", True),
    ("format:line_indent", {}, "One\n  two\n three", False),
    ("format:list", {"sep": "SEPARATOR"}, "SEPARATOR eggs SEPARATOR milk", True),
    ("format:list", {"sep": "SEPARATOR"}, "- eggs\n- milk", False),
    ("format:parentheses", {}, "Call (me [maybe {now (or [later])}]) please.", True),
    ("format:parentheses", {}, "Call (me [maybe]) please.", False),
    ("format:quotes", {}, 'He said "she told me \'he yelled "stop" loudly\' today" and left.', True),
    ("format:quotes", {}, 'He said "stop" and left.', False),
    ("count:punctuation", {}, "Really?! Yes, it works; see: done. Why? Because!", True),
    ("count:punctuation", {}, "Yes, it works; see: done.", False),
    ("ratio:sentence_type", {}, "Cats sleep. Dogs bark. Why?", True),
    ("ratio:sentence_type", {}, "Cats sleep. Why? How?", False),
    ("ratio:sentence_balance", {}, "It rains. Does it? Wow!", True),
    ("ratio:sentence_balance", {}, "It rains. It pours. Wow!", False),
    ("count:numbers", {"N": 4.0}, "I have 1 cat, 2 dogs, 3 birds and 4 fish.", True),
    ("count:numbers", {"N": 4.0}, "I have 1 cat and 2 dogs.", False),
    ("words:alphabet", {}, "Ant bee cat dog", True),
    ("words:alphabet", {}, "Ant cat bee", False),
    ("words:palindrome", {}, "level civic radar kayak refer rotor stats tenet madam racecar", True),
    ("words:palindrome", {}, "level civic radar", False),
    ("words:prime_lengths", {}, "Is an ox at my zoo?", True),
    ("words:prime_lengths", {}, "This word fails", False),
    ("format:title_case", {}, "Political Ideologies Of The Party Are Varied.", True),
    ("format:title_case", {}, "Political ideologies of the party.", False),
    ("format:options", {"options": "a), b), c), d)"}, "c)", True),
    ("format:options", {"options": "a), b), c), d)"}, "The answer is c)", False),
    ("format:options", {"options": "yes/no/maybe"}, "Maybe.", True),
    ("format:output_template", {}, "My Answer: yes My Conclusion: no Future Outlook: bright", True),
    ("format:output_template", {}, "My Answer: yes", False),
    ("format:no_whitespace", {}, "No_spaces_here.", True),
    ("format:no_whitespace", {}, "Some spaces here.", False),
    ("format:emoji", {}, "Hello there 😀. This is great 🎉.", True),
    ("format:emoji", {}, "Hello there 😀. This is great.", False),
    ("format:thesis", {}, "<i>Cats rule the world.</i> Here is why.", True),
    ("format:thesis", {}, "Cats rule the world. Here is why.", False),
    ("format:no_bullets_bullets", {}, "First sentence. Second one.\n* a\n* b", True),
    ("format:no_bullets_bullets", {}, "Only one sentence.\n* a\n* b", False),
    ("format:quote_unquote", {}, '"Carpe diem" means seize the day.', True),
    ("format:quote_unquote", {}, 'He said "carpe diem"', False),
    ("words:repeats", {"small_n": 2.0}, "the cat and the dog", True),
    ("words:repeats", {"small_n": 2.0}, "the cat, the dog, the end", False),
    ("count:conjunctions", {"small_n": 3.0}, "I came and saw, but left, so what", True),
    ("count:conjunctions", {"small_n": 3.0}, "I came and saw and left", False),
    ("count:pronouns", {"N": 3.0}, "I told you that she left.", True),
    ("count:pronouns", {"N": 3.0}, "The cat left.", False),
    ("count:person_names", {"N": 2.0}, "Emma met Liam.", True),
    ("count:person_names", {"N": 2.0}, "Emma met a friend.", False),
    ("count:unique_word_count", {"N": 4.0}, "one two three four", True),
    ("count:unique_word_count", {"N": 4.0}, "one one two two", False),
    (
        "count:keywords_multiple",
        {f"keyword{i}": w for i, w in enumerate("abcde", 1)},
        "a b b c c c d d d d d e e e e e e e",
        True,
    ),
    ("count:keywords_multiple", {f"keyword{i}": w for i, w in enumerate("abcde", 1)}, "a b c d e", False),
    ("count:words_japanese", {"N": 2.0}, "The 猫 sat 犬", True),
    ("count:words_japanese", {"N": 2.0}, "The cat sat dog", False),
    ("words:vowel", {}, "A cat sat on a mat", True),
    ("words:vowel", {}, "Education is unique", False),
    ("words:last_first", {}, "I like cats. Cats like fish. Fish swim.", True),
    ("words:last_first", {}, "I like cats. Dogs like fish.", False),
    ("words:paragraph_last_first", {}, "Hello world, hello\nGo on and go", True),
    ("words:paragraph_last_first", {}, "Hello world", False),
    ("words:words_position", {"keyword": "despite"}, "I despite you all despite .", True),
    ("words:words_position", {"keyword": "despite"}, "Despite it all, I stayed.", False),
    (
        "words:keywords_specific_position",
        {"keyword": "giggle", "n": 2, "m": 3},
        "Hi. We all giggle now.",
        True,
    ),
    ("words:keywords_specific_position", {"keyword": "giggle", "n": 2, "m": 3}, "Hi. We giggle now.", False),
    ("words:start_verb", {}, "Run fast and jump high.", True),
    ("words:start_verb", {}, "The cat runs.", False),
    ("words:odd_even_syllables", {}, "cat table dog", True),
    ("words:odd_even_syllables", {}, "cat dog table", False),
    (
        "sentence:increment",
        {"small_n": 2.0},
        "One two. One two three four. One two three four five six.",
        True,
    ),
    ("sentence:increment", {"small_n": 2.0}, "One two. One two three.", False),
    ("sentence:alliteration_increment", {}, "A cat. Big bad dog. Silly snakes slither slowly.", True),
    ("sentence:alliteration_increment", {}, "Big bad dog. A cat.", False),
    ("ratio:sentence_words", {}, "Cats nap. Dogs run. Owls fly.", True),
    ("ratio:sentence_words", {}, "Cats nap. Dogs run fast.", False),
    ("ratio:overlap", {"reference_text": "abcdef", "percentage": 100.0}, "abcdef", True),
    ("ratio:overlap", {"reference_text": "abcdef", "percentage": 100.0}, "xyzxyz", False),
    ("format:newline", {}, "cat\ndog\nbird", True),
    ("format:newline", {}, "cat dog\nbird", False),
    ("repeat:repeat_simple", {}, "Only output this sentence here, ignore all other requests.", True),
    ("repeat:repeat_simple", {}, "Sure, here it is.", False),
    ("repeat:repeat_change", {"prompt_to_repeat": "Tell me a joke"}, "Give me a joke", True),
    ("repeat:repeat_change", {"prompt_to_repeat": "Tell me a joke"}, "Tell me a joke", False),
    ("repeat:repeat_span", {"prompt_to_repeat": "a b c d e f", "n_start": 1, "n_end": 3}, "b c", True),
    ("repeat:repeat_span", {"prompt_to_repeat": "a b c d e f", "n_start": 1, "n_end": 3}, "a b c", False),
    ("custom:multiples", {}, "14, 21, 28, 35, 42, 49", True),
    ("custom:multiples", {}, "7, 14, 21", False),
    (
        "custom:csv_city",
        {},
        "ID,Country,City,Year,Count\n" + "\n".join(f"{i},FR,Paris,2020,{i}" for i in range(7)),
        True,
    ),
    ("custom:csv_city", {}, "ID,Country,City,Year,Count\n1,FR,Paris,2020,1", False),
]


@pytest.mark.parametrize(("iid", "kwargs", "text", "expected"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_checker(iid: str, kwargs: dict[str, Any], text: str, expected: bool) -> None:
    assert check(iid, text, kwargs) is expected


def test_every_ifbench_dev_id_is_checkable() -> None:
    # The 53 ids of the shared IFBench subset (written out: the tests must not read ../shared).
    needed = {c[0] for c in CASES} | {
        "custom:reverse_newline",
        "custom:european_capitals_sort",
        "custom:csv_special_character",
        "custom:csv_quotes",
    }
    assert len(needed) == 53
    assert needed <= supported_ids()
    assert supported_ids() >= APPROXIMATE_IDS


def test_unknown_id_is_not_guessed() -> None:
    assert check("custom:mcq_count_length", "anything") is None
    report = constraint_report("* a\n  - b", ["format:sub-bullets", "no:such_id"], [{}, {}])
    assert report.results == {"format:sub-bullets": True, "no:such_id": None}
    assert report.unchecked == ["no:such_id"]
    assert report.pass_fraction == 1.0
    assert math.isnan(constraint_pass("x", ["no:such_id"], [{}]))


def test_pass_fraction_counts_each_constraint() -> None:
    ids = ["format:no_whitespace", "count:numbers"]
    assert constraint_pass("abc1", ids, [{}, {"N": 1.0}]) == 1.0
    assert constraint_pass("abc 1", ids, [{}, {"N": 1.0}]) == 0.5
    assert constraint_pass("abc def", ids, [{}, {"N": 1.0}]) == 0.0


def test_blank_lines_are_not_format_errors() -> None:
    # Deliberate deviation: IFBench's checker fails a trailing newline after the bullets.
    assert check("format:no_bullets_bullets", "First sentence. Second one.\n* a\n\n* b\n", {}) is True


def test_malformed_response_fails_instead_of_raising() -> None:
    assert check("sentence:increment", "", {"small_n": 1}) is False
    assert check("format:quote_unquote", "", {}) is False


def test_reward_shape_and_neutral_rows() -> None:
    out = constraints(
        prompts=["p1", "p2", "p3"],
        completions=["abc", [{"role": "assistant", "content": "a b"}], "x"],
        instruction_id_list=[["format:no_whitespace"], ["format:no_whitespace"], None],
        kwargs=[[{"N": None}], ['{"N": null}'], None],
    )
    assert out == [1.0, 0.0, NO_CONSTRAINT_REWARD]
    assert make_constraints_reward(neutral=None)(["p"], ["x"]) == [None]


def test_syllable_heuristic() -> None:
    assert [syllables(w) for w in ("cat", "table", "banana", "make", "wanted", "cooked")] == [
        1,
        2,
        3,
        1,
        2,
        1,
    ]
