"""Schedule math: which instants a cron expression names, in a time zone, across DST.

Pure functions of their inputs (no clock), so slot computation, catch-up and
daylight-saving behaviour are unit-tested with any "now".

Expressions have 5 fields, or 6 with seconds first (`*/5 * * * * *`, as in
node-cron and Quartz). croniter walks local wall-clock time as naive
datetimes, which never skips or repeats; each wall time is then placed on the
UTC timeline here, with the rules of Vixie cron:

- a wall time inside the spring-forward gap runs once, at the instant the
  clock would have shown it (2:30 in a 2:00→3:00 gap runs at 3:30);
- a wall time in the repeated autumn hour runs once, at its first
  occurrence, for a fixed-time job (minute and hour fields without `*`), and
  at both occurrences for a job whose minute or hour field is a wildcard
  (`*/5 * * * *` keeps running every five minutes through both passes).

The nicknames of Vixie cron (`@hourly`, `@daily`, ...) stand for their 5-field
forms; `@reboot` names no instant, so it is not a schedule here.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

# No zone sets its clock back by more than this at once; it bounds the look-ahead.
MAX_SHIFT = timedelta(hours=3)
# As crontab(5) defines them; expanded here so the field count and `fixed_time` see the real fields.
NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Any fixed instant will do: with no year field a schedule repeats within croniter's 50-year search
# (February 29th on a given weekday comes round within 40 years), so one that ever fires fires after this.
_REFERENCE = datetime(2000, 1, 1)


def expand(expression: str) -> str:
    """The 5- or 6-field form of `expression`: a nickname's, otherwise the expression itself."""
    return NICKNAMES.get(expression.strip(), expression)


def is_valid(expression: str) -> bool:
    expression = expand(expression)
    fields = expression.split()
    if len(fields) not in (5, 6):
        return False
    return croniter.is_valid(expression, second_at_beginning=True)


def ever_fires(expression: str) -> bool:
    """Whether a valid expression names any instant at all (`0 3 30 2 *`, February 30th, never does).

    The scheduler would find out only when it looks for the first slot, after the primary has started.
    """
    try:
        croniter(expand(expression), _REFERENCE, second_at_beginning=True).get_next(datetime)
    except CroniterBadDateError:
        return False
    return True


class CronSchedule:
    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        if not is_valid(expression):
            raise ValueError(f"not a valid cron expression: {expression!r}")
        expression = expand(expression)
        self.expression = expression
        self.zone = ZoneInfo(timezone)
        fields = expression.split()
        minute, hour = (fields[1], fields[2]) if len(fields) == 6 else (fields[0], fields[1])
        self.fixed_time = not minute.startswith("*") and not hour.startswith("*")

    def _instants(self, wall: datetime) -> list[datetime]:
        """The UTC instants at which naive local `wall` time happens (gap: shifted once; fold: see module doc)."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second or self.fixed_time:
            return [first]
        # An ambiguous wall time has fold=0 earlier than fold=1; a gap time has them reversed.
        return [first, second] if first < second else [second]

    def next_after(self, after: datetime) -> datetime:
        """The first instant strictly after `after` (an aware datetime) that this schedule names.

        A few croniter steps, whatever the schedule: walk wall time forward from `after`'s wall
        time; the only instants that walk can miss are the second pass of a repeated hour that
        starts soon after `after`, looked up on their own.
        """
        after = after.astimezone(UTC)
        best = self._first_from(after.astimezone(self.zone).replace(tzinfo=None), after)
        if not self.fixed_time:
            fold_start = self._clock_goes_back_within(after)
            if fold_start is not None:
                wall = fold_start.astimezone(self.zone).replace(tzinfo=None)
                second_pass = self._first_from(wall - timedelta(microseconds=1), after, fold=1)
                best = min(best, second_pass)
        return best

    def _first_from(self, wall_start: datetime, after: datetime, fold: int | None = None) -> datetime:
        walker = croniter(self.expression, wall_start, second_at_beginning=True)
        while True:
            wall = walker.get_next(datetime)
            if fold is not None:
                instants = [wall.replace(tzinfo=self.zone, fold=fold).astimezone(UTC)]
            else:
                instants = self._instants(wall)
            later = [instant for instant in instants if instant > after]
            if later:
                return min(later)

    def _clock_goes_back_within(self, after: datetime) -> datetime | None:
        """The instant the clock is set back, if that happens within MAX_SHIFT after `after`."""
        low, high = after, after + MAX_SHIFT
        offset = low.astimezone(self.zone).utcoffset()
        end_offset = high.astimezone(self.zone).utcoffset()
        assert offset is not None and end_offset is not None
        if end_offset >= offset:
            return None
        while high - low > timedelta(seconds=1):
            middle = low + (high - low) / 2
            if middle.astimezone(self.zone).utcoffset() == offset:
                low = middle
            else:
                high = middle
        return high.replace(microsecond=0)

    def between(self, start: datetime, end: datetime, limit: int | None = None) -> Iterator[datetime]:
        """Instants in (start, end], oldest first, at most `limit` of them."""
        count = 0
        current = start
        while limit is None or count < limit:
            current = self.next_after(current)
            if current > end:
                return
            yield current
            count += 1


def to_iso(instant: datetime) -> str:
    """The canonical text of a slot: UTC, millisecond precision, 'Z' suffix (the UNIQUE key)."""
    return instant.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
