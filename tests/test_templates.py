"""Template files, prompt rendering (A1111 create_text semantics) and its deliberate fixes."""
import random

import pytest

from ti_fast.training.data import DataError
from ti_fast.training.templates import (TEMPLATES, check_name_reachable, draw_prompt, load_template,
                                     render_prompt)


@pytest.mark.parametrize("name", TEMPLATES)
def test_builtin_templates_load(name):
    lines = load_template(name)
    if name == "none":
        assert lines == ["[filewords]"]
        return
    if name == "hypernetwork":           # a hypernetwork has no trigger word: style-like lines, no [name]
        assert 15 <= len(lines) <= 25 and len(set(lines)) == len(lines)
        assert all("[filewords]" in ln and "[name]" not in ln for ln in lines)
        return
    assert 15 <= len(lines) <= 25 and len(set(lines)) == len(lines)
    assert all("[name]" in ln for ln in lines)
    assert all(("[filewords]" in ln) == name.endswith("_filewords") for ln in lines)


def test_template_file_and_errors(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("\ufeffa [name] toy\n\n  a [name] plush  \n", encoding="utf-8")
    assert load_template(f) == ["a [name] toy", "a [name] plush"]
    with pytest.raises(DataError, match="subject, subject_filewords, style, style_filewords, none"):
        load_template("portrait")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        load_template(empty)


def test_render_plain_keeps_caption_verbatim():
    out = render_prompt("a photo of [name], [filewords]", "zork", "red,  shiny car")
    assert out == "a photo of zork, red,  shiny car"


def test_caption_may_hold_name_placeholder():
    # [filewords] is replaced before [name], as in A1111
    assert render_prompt("[filewords]", "zork", "[name] on a beach") == "zork on a beach"


def test_empty_caption_leaves_no_stray_commas():
    assert render_prompt("[filewords], art by [name]", "zork", "") == "art by zork"
    assert render_prompt("[name], [filewords], photo", "zork", "") == "zork, photo"


def test_shuffle_and_dropout_deterministic_under_seed():
    cap = "a, b, c, d, e, f, g, h"
    run = lambda seed: [render_prompt("[name]: [filewords]", "zork", cap, shuffle_tags=True,
                                      tag_dropout=0.3, rng=rng) for rng in [random.Random(seed)] for _ in range(10)]
    assert run(1) == run(1) and run(1) != run(2)
    # the rng protocol: one draw per tag in caption order (dropout), then shuffle the kept ones
    rng = random.Random(5)
    kept = [t for t in "abcdefgh" if rng.random() >= 0.3]
    rng.shuffle(kept)
    got = render_prompt("[name]: [filewords]", "zork", cap, shuffle_tags=True, tag_dropout=0.3,
                        rng=random.Random(5))
    assert got == "zork: " + ", ".join(kept)
    outs = {render_prompt("[filewords]", "x", cap, shuffle_tags=True, rng=random.Random(s))
            for s in range(20)}
    assert len(outs) > 5                                   # it does shuffle
    for o in outs:                                         # and keeps every tag once
        assert sorted(o.split(", ")) == list("abcdefgh")


def test_dropout_rate_and_protected_trigger():
    rng = random.Random(0)
    tags = [f"t{i}" for i in range(50)]
    kept = [len(render_prompt("[filewords]", "zork", ", ".join(tags), tag_dropout=0.5, rng=rng).split(", "))
            for _ in range(200)]
    mean = sum(kept) / len(kept)
    assert 22 < mean < 28                                  # each tag kept with prob 1 - p
    # p = 1 drops everything except the tags that carry the trigger
    out = render_prompt("[filewords]", "zork", "red, zork plush, [name] toy, blue", tag_dropout=1.0,
                        rng=random.Random(3))
    assert out == "zork plush, zork toy"
    # without shuffle the order of kept tags is the caption's
    out = render_prompt("[filewords]", "x", "a,b , c", tag_dropout=0.0, shuffle_tags=False)
    assert out == "a,b , c"
    with pytest.raises(ValueError):
        render_prompt("[filewords]", "x", "a", tag_dropout=1.5, rng=random.Random(0))


def test_draw_prompt_draws_a_fresh_line_each_use():
    lines = load_template("subject")
    rng = random.Random(7)
    prompts = [draw_prompt(lines, "zork", "cap", rng) for _ in range(40)]
    assert len(set(prompts)) > 10 and all("zork" in p for p in prompts)
    rng2 = random.Random(7)
    assert prompts == [draw_prompt(lines, "zork", "cap", rng2) for _ in range(40)]


def test_check_name_reachable():
    check_name_reachable(load_template("subject"), ["anything"], "zork")
    check_name_reachable(["[filewords]"], ["a zork. on grass", "[name] toy"], "zork")
    with pytest.raises(DataError, match="'a zorkish cat'"):
        check_name_reachable(["[filewords]"], ["zork toy", "a zorkish cat"], "zork")
    with pytest.raises(DataError, match="neither"):
        check_name_reachable(["picture"], ["zork"], "zork")
