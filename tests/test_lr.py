"""A1111 schedule semantics ("0.005:100, 1e-3:1000, 1e-5") and the errors."""
import pytest

from ti_fast.training.lr import ScheduleError, parse_schedule

EXAMPLE = "0.005:100, 1e-3:1000, 1e-5"


def test_documented_example_full_run():
    s = parse_schedule(EXAMPLE, 3000)
    assert s.entries == ((0.005, 100), (1e-3, 1000), (1e-5, 3000))
    assert s.end_step == 3000
    assert [s.rate(k) for k in (0, 99, 100, 999, 1000, 2999)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]


def test_max_steps_clamps_and_stops():
    s = parse_schedule(EXAMPLE, 500)
    assert s.entries == ((0.005, 100), (1e-3, 500))
    assert s.end_step == 500 and s.rate(499) == 1e-3


def test_training_ends_at_last_entry():
    s = parse_schedule("0.005:100", 3000)
    assert s.end_step == 100 and s.rate(99) == 0.005


def test_resume_skips_passed_entries():
    s = parse_schedule(EXAMPLE, 3000, start_step=150)
    assert s.entries == ((1e-3, 1000), (1e-5, 3000))
    assert s.rate(150) == 1e-3 and s.start_step == 150
    # an entry ending exactly at the resume step is passed too (A1111: step > cur_step)
    assert parse_schedule(EXAMPLE, 3000, start_step=100).entries[0] == (1e-3, 1000)


def test_minus_one_means_max_steps():
    s = parse_schedule("0.01:50, 0.002:-1", 400)
    assert s.entries == ((0.01, 50), (0.002, 400)) and s.end_step == 400


def test_plain_float_and_whitespace():
    s = parse_schedule(" 0.005 ", 10)
    assert s.entries == ((0.005, 10),) and s.rate(0) == 0.005 and s.rate(9) == 0.005


def test_step_equal_to_max_steps():
    s = parse_schedule("0.01:200, 1e-4", 200)
    assert s.entries == ((0.01, 200),) and s.end_step == 200


def test_value_held_after_end_for_clip_threshold():
    s = parse_schedule("1.0:10, 0.5:20", 100, what="clip threshold")
    assert s.end_step == 20 and s.rate(25) == 0.5


def test_str_for_logs():
    assert str(parse_schedule(EXAMPLE, 500)) == "0.005 until step 100, 0.001 until step 500"


@pytest.mark.parametrize("text, quoted", [
    ("abc", "'abc'"),
    ("0.005:1x0", "'0.005:1x0'"),
    ("0.005:100.5", "'0.005:100.5'"),
    ("0:100", "'0:100'"),
    ("-0.1", "'-0.1'"),
    ("nan", "'nan'"),
    ("inf:10", "'inf:10'"),
    ("0.01:0", "'0.01:0'"),
    ("0.01:-5", "'0.01:-5'"),
    ("0.1:1:2", "'0.1:1:2'"),
    ("0.01:500, 0.001:200", "'0.001:200'"),
    ("0.01:500, 0.001:500", "'0.001:500'"),
    ("0.01, 0.001:2000", "'0.001:2000'"),
    ("0.01:-1, 0.001", "'0.001'"),
])
def test_rejects_bad_entries_quoting_them(text, quoted):
    with pytest.raises(ScheduleError) as e:
        parse_schedule(text, 1000)
    msg = str(e.value)
    assert quoted in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["", "   ", None, "0.01:100,", "0.01:100, , 1e-5"])
def test_rejects_empty(text):
    with pytest.raises(ScheduleError, match="empty"):
        parse_schedule(text, 1000)


def test_errors_independent_of_max_steps():
    # A1111 never reads the entry after the clamp; a typo there is still reported here
    with pytest.raises(ScheduleError, match="'1e-5:oops'"):
        parse_schedule("0.005:100, 1e-3:1000, 1e-5:oops", 500)


def test_nothing_left_after_resume():
    with pytest.raises(ScheduleError, match="nothing left"):
        parse_schedule("0.005:100", 3000, start_step=150)
    with pytest.raises(ScheduleError, match="nothing left"):
        parse_schedule("0.005", 3000, start_step=3000)


def test_bad_bounds():
    with pytest.raises(ScheduleError):
        parse_schedule("0.005", 0)
    with pytest.raises(ScheduleError):
        parse_schedule("0.005", 10, start_step=-1)
