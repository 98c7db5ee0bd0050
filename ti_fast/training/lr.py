"""A1111's step-schedule syntax, for the learning rate and the gradient-clip threshold:
"0.005:100, 1e-3:1000, 1e-5" = 0.005 while fewer than 100 steps are done, then 1e-3 until
1000, then 1e-5 until max steps.

Semantics follow A1111's LearnScheduleIterator / LearnRateScheduler
(modules/textual_inversion/learn_schedule.py) exactly:
- `rate:step` is used while the completed-step count is < step; a bare `rate` (or step -1)
  runs to max steps and ends the schedule.
- On resume from step S, entries with step <= S are skipped.
- A step beyond max steps is clamped to max steps and ends the schedule.
- Training ends at the last entry's step, even if max steps is larger ("0.005:100" with
  3000 max steps trains 100 steps).
- After the end, rate() keeps the last value: A1111's clip threshold schedule does that (its
  `finished` flag is only checked for the learning rate).
Stricter than A1111, which crashes on some of these and silently ignores others: every entry
is checked (numbers, rate > 0 and finite, step a whole number >= 1 or -1, steps increasing,
nothing after a bare rate / step -1), whatever max steps is, and a schedule with nothing left
after the resume step is an error instead of A1111's StopIteration.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError


class ScheduleError(ConfigError):
    """A malformed schedule; the one-line message quotes the bad entry."""


@dataclass(frozen=True)
class Schedule:
    entries: tuple[tuple[float, int], ...]   # (rate, end): rate used while step < end; ends increase
    start_step: int                          # completed steps when training (re)starts
    text: str                                # the schedule as the user wrote it

    @property
    def end_step(self) -> int:
        """Total completed optimizer steps at which training stops."""
        return self.entries[-1][1]

    def rate(self, step: int) -> float:
        """Value for the update made when `step` steps are complete (the first update is 0)."""
        for r, end in self.entries:
            if step < end:
                return r
        return self.entries[-1][0]

    def __str__(self) -> str:
        return ", ".join(f"{r:g} until step {end}" for r, end in self.entries)


def _parse_entry(raw: str, what: str) -> tuple[float, int | None]:
    """'1e-3:1000' -> (0.001, 1000); '1e-5' -> (1e-05, None); '0.1:-1' -> (0.1, -1)."""
    entry = raw.strip()
    if not entry:
        raise ScheduleError(f"{what} schedule has an empty entry (stray comma?): use 'rate:step, ..., rate'")
    parts = entry.split(":")
    if len(parts) > 2:
        raise ScheduleError(f"{what} schedule entry {entry!r} has more than one ':': use 'rate:step'")
    try:
        rate = float(parts[0])
    except ValueError:
        raise ScheduleError(f"{what} schedule entry {entry!r}: rate {parts[0].strip()!r} is not a number") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ScheduleError(f"{what} schedule entry {entry!r}: rate must be a positive number")
    if len(parts) == 1:
        return rate, None
    try:
        step = int(parts[1])
    except ValueError:
        raise ScheduleError(f"{what} schedule entry {entry!r}: step {parts[1].strip()!r} is not a "
                            "whole number") from None
    if step < 1 and step != -1:
        raise ScheduleError(f"{what} schedule entry {entry!r}: step must be >= 1 (or -1 for max steps)")
    return rate, step


def parse_schedule(text, max_steps: int, start_step: int = 0, *, what: str = "learning rate") -> Schedule:
    """Parse "rate:step, ..., rate" (or a plain number) for a run of `max_steps` total steps
    resuming at `start_step` completed steps. `what` names the setting in error messages."""
    if max_steps < 1:
        raise ScheduleError(f"max steps must be at least 1, got {max_steps}")
    if start_step < 0:
        raise ScheduleError(f"start step must be >= 0, got {start_step}")
    src = str(text).strip() if text is not None else ""
    if not src:
        raise ScheduleError(f"{what} schedule is empty: give a rate like 0.005 or '0.005:100, 1e-3:1000, 1e-5'")
    raws = src.split(",")
    parsed = [_parse_entry(r, what) for r in raws]

    # structure: explicit steps increase; nothing after an entry that runs to the end
    last = 0
    for i, (_, step) in enumerate(parsed):
        if step is None or step == -1:
            if i + 1 < len(parsed):
                raise ScheduleError(f"{what} schedule entry {raws[i + 1].strip()!r} is never reached: "
                                    f"{raws[i].strip()!r} already runs to the last step")
            break
        if step <= last:
            raise ScheduleError(f"{what} schedule entry {raws[i].strip()!r}: steps must increase "
                                f"(previous entry ends at step {last})")
        last = step

    # A1111's iterator: skip what the resume already passed, clamp to max steps, stop there
    entries: list[tuple[float, int]] = []
    for rate, step in parsed:
        if step is None or step == -1:
            entries.append((rate, max_steps))
            break
        if step > start_step:
            entries.append((rate, min(step, max_steps)))
            if step >= max_steps:
                break
    if not entries or entries[-1][1] <= start_step:
        end = entries[-1][1] if entries else last
        raise ScheduleError(f"{what} schedule {src!r} ends at step {end}, but training is already at "
                            f"step {start_step}: nothing left to train (raise the steps or the schedule)")
    return Schedule(tuple(entries), start_step, src)


_CLIP_RE = re.compile(r"^\s*(value|norm)\s*:(.+)$", re.S)


def parse_clip_grad(spec: str | None, steps: int = 1):
    """'value:X' | 'norm:X', X a number or an A1111 schedule ('norm:0.1:500, 0.05') ->
    (mode, Schedule) or None."""
    if not spec:
        return None
    m = _CLIP_RE.match(spec)
    if not m:
        raise ConfigError(f"--clip-grad {spec!r}: use value:X or norm:X (X > 0, or a schedule like 0.1:500, 0.05)")
    try:
        return m.group(1), parse_schedule(m.group(2), max(1, steps), what="clip threshold")
    except ScheduleError as e:
        raise ConfigError(f"--clip-grad {spec!r}: {e}") from None
