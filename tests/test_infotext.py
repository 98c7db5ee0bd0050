"""A1111 v1.10.1 infotext: exact text, quoting, parsing, and the PNG `parameters` chunk."""
import pytest
from PIL import Image

from ti_fast.infotext import (make_infotext, parse_infotext, parse_ti_hashes, quote,
                                     read_png_infotext, write_png_with_infotext)

BASE = dict(steps=20, sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=7.0, seed=123,
            width=512, height=512, model_hash="6ce0161689", model_name="v1-5-pruned-emaonly",
            version="v1.10.1")


def test_exact_v1_10_1_text():
    text = make_infotext("a photo of foo, by bar", "blurry, lowres", clip_skip=2,
                         ti_hashes={"foo": "0123456789ab", "bar": "ba9876543210"}, **BASE)
    assert text == (
        "a photo of foo, by bar\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
        'TI hashes: "foo: 0123456789ab, bar: ba9876543210", Version: v1.10.1')


def test_optional_fields_left_out():
    text = make_infotext("cat", "", **{**BASE, "cfg_scale": 7.5, "width": 768, "model_hash": None,
                                       "model_name": None, "version": None, "schedule_type": "Automatic"})
    assert text == ("cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7.5, "
                    "Seed: 123, Size: 768x512")


def test_quoting_like_a1111():
    assert quote("plain value") == "plain value"
    assert quote(5) == "5"
    assert quote("a, b") == '"a, b"'
    assert quote("x: y") == '"x: y"'
    assert quote('say "hi",\nthen') == '"say \\"hi\\",\\nthen"'
    assert quote("café, ü") == '"café, ü"'  # ensure_ascii=False
    text = make_infotext("p", "", **{**BASE, "model_name": "my model, v2: final"})
    assert 'Model: "my model, v2: final", Version' in text


def test_parse_round_trip():
    prompt = "first line, with commas: and colons\nsecond line"
    neg = "bad hands,\nworse feet"
    text = make_infotext(prompt, neg, clip_skip=2, ti_hashes={"foo": "0123456789ab", "b:a,r": "ba9876543210"},
                         **{**BASE, "model_name": 'odd "name", v2'})
    got = parse_infotext(text)
    assert got == {
        "Prompt": prompt, "Negative prompt": neg, "Steps": "20", "Sampler": "DPM++ 2M",
        "Schedule type": "Karras", "CFG scale": "7", "Seed": "123", "Size": "512x512",
        "Model hash": "6ce0161689", "Model": 'odd "name", v2', "Clip skip": "2",
        "TI hashes": "foo: 0123456789ab, bar: ba9876543210", "Version": "v1.10.1"}
    assert parse_ti_hashes(got["TI hashes"]) == {"foo": "0123456789ab", "bar": "ba9876543210"}
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_png_parameters_chunk(tmp_path):
    text = make_infotext("ünïcode ☃ prompt", "", **BASE)  # not Latin-1: goes to an iTXt chunk
    img = Image.new("RGB", (16, 8), (1, 2, 3))
    path = write_png_with_infotext(img, tmp_path / "out.png", text, extra_chunks={"extra": "x"})
    with Image.open(path) as im:
        assert im.text["parameters"] == text and im.text["extra"] == "x"
        assert im.size == (16, 8) and im.getpixel((0, 0)) == (1, 2, 3)
    assert read_png_infotext(path) == text
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp files left
    with pytest.raises(ValueError, match="png"):
        write_png_with_infotext(img, tmp_path / "out.jpg", text)
