"""Slot math across time zones and daylight saving, with property tests."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.cron import CronSchedule, is_valid, to_iso

DST_ZONES = [
    "America/New_York",
    "America/Los_Angeles",
    "Europe/London",
    "Europe/Berlin",
    "Australia/Sydney",
    "Australia/Lord_Howe",  # a 30-minute shift
    "America/Santiago",
    "Pacific/Auckland",
]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_autumn_repeated_hour_runs_a_fixed_time_job_once():
    schedule = CronSchedule("30 1 * * *", "America/New_York")
    runs = list(schedule.between(at("2026-10-31 00:00"), at("2026-11-03 00:00")))
    assert [to_iso(r) for r in runs] == [
        "2026-10-31T05:30:00.000Z",  # 01:30 EDT
        "2026-11-01T05:30:00.000Z",  # 01:30 EDT, the first of the two 01:30s; not again at 01:30 EST
        "2026-11-02T06:30:00.000Z",  # 01:30 EST
    ]


def test_spring_gap_runs_a_job_inside_the_skipped_hour_once():
    schedule = CronSchedule("30 2 * * *", "America/New_York")
    runs = list(schedule.between(at("2026-03-07 00:00"), at("2026-03-10 00:00")))
    local = [r.astimezone(ZoneInfo("America/New_York")) for r in runs]
    assert [d.date().isoformat() for d in local] == ["2026-03-07", "2026-03-08", "2026-03-09"]
    assert local[1].strftime("%H:%M %Z") == "03:30 EDT"  # 02:30 never happened: the instant it would have


def test_wildcard_jobs_keep_their_rhythm_through_both_passes_of_the_repeated_hour():
    schedule = CronSchedule("*/20 * * * *", "America/New_York")
    runs = list(schedule.between(at("2026-11-01 04:30"), at("2026-11-01 07:30")))
    gaps = {b - a for a, b in zip(runs, runs[1:], strict=False)}
    assert gaps == {timedelta(minutes=20)}
    assert len(runs) == 9


def test_six_fields_means_seconds_first():
    schedule = CronSchedule("*/15 * * * * *")
    runs = list(schedule.between(at("2026-01-01 00:00:00"), at("2026-01-01 00:01:00")))
    assert [r.second for r in runs] == [15, 30, 45, 0]
    assert is_valid("* * * * * *") and is_valid("0 3 * * *")
    assert not is_valid("* * * *") and not is_valid("61 * * * *") and not is_valid("* * * * * * *")


@settings(max_examples=20, deadline=None)
@given(
    zone=st.sampled_from(DST_ZONES),
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    year=st.integers(2024, 2030),
)
def test_a_fixed_time_job_runs_exactly_once_every_local_day(zone, minute, hour, year):
    schedule = CronSchedule(f"{minute} {hour} * * *", zone)
    tz = ZoneInfo(zone)
    runs = list(schedule.between(datetime(year, 1, 1, tzinfo=tz), datetime(year + 1, 1, 1, tzinfo=tz)))
    days = Counter(r.astimezone(tz).date() for r in runs)
    assert max(days.values()) == 1, [d for d, n in days.items() if n > 1]
    first, last = min(days), max(days)
    assert len(days) == (last - first).days + 1  # no local day without its run
    assert runs == sorted(set(runs))


@settings(max_examples=20, deadline=None)
@given(
    zone=st.sampled_from(DST_ZONES),
    step=st.sampled_from([5, 10, 15, 30]),
    start_day=st.sampled_from([66, 67, 68, 86, 87, 88, 95, 96, 97, 266, 267, 276, 277, 297, 298, 303, 304, 305]),
)
def test_wildcard_jobs_never_repeat_an_instant_and_never_stall(zone, step, start_day):
    schedule = CronSchedule(f"*/{step} * * * *", zone)
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=start_day)
    runs = list(schedule.between(start, start + timedelta(days=2)))
    assert runs == sorted(set(runs))
    gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
    assert max(gaps) <= timedelta(minutes=step)  # a DST change never opens a hole in an interval job
    assert min(gaps) > timedelta(0)


@pytest.mark.parametrize("zone", DST_ZONES)
def test_next_after_is_strictly_after(zone):
    schedule = CronSchedule("0 * * * *", zone)
    instant = at("2026-06-01 12:00")
    assert schedule.next_after(instant) == at("2026-06-01 13:00") or zone == "Australia/Lord_Howe"
    assert schedule.next_after(instant) > instant


@settings(max_examples=20, deadline=None)
@given(
    zone=st.sampled_from(DST_ZONES),
    step=st.sampled_from([1, 5, 7, 15, 30]),
    start_day=st.sampled_from([66, 67, 87, 88, 94, 95, 268, 269, 276, 277, 297, 298, 303, 304, 305]),
)
def test_wildcard_jobs_match_a_brute_force_walk_of_every_minute(zone, step, start_day):
    """Oracle: an interval job runs at every UTC minute whose local wall time matches, no more, no less."""
    tz = ZoneInfo(zone)
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=start_day)
    end = start + timedelta(days=2)
    expected = []
    minute = start + timedelta(minutes=1)
    while minute <= end:
        if minute.astimezone(tz).minute % step == 0:
            expected.append(minute)
        minute += timedelta(minutes=1)
    assert list(CronSchedule(f"*/{step} * * * *", zone).between(start, end)) == expected
