"""Every operator command, written once.

One `Command` per action the operator can take: its name (the CLI word, the
control socket's `cmd`, the console's action), its arguments, its handler on
the primary, the one line that reports its result, and how the console offers
it (keys, palette title, whether it asks first). The CLI builds its parser
from this table, the control socket dispatches through it, signals map onto
it, and the console (in-process or attached) draws its bindings, palette and
help from it. gunicorn's `ctl/handlers.py` is the model.

Arguments arrive as JSON from the wire (or from the console, or a signal) and
are checked here, once, whoever sent them.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .control import ControlError
from .errors import ReloadFailed, ReloadInterrupted, ReloadRefused
from .wire import encode

if TYPE_CHECKING:
    from .primary import Primary


def whole(value: Any) -> int:
    """An integer from the wire: never a float, bool, string or infinity."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    return value


def name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a name, got {value!r}")
    return value


@dataclass(frozen=True)
class Arg:
    name: str
    check: Callable[[Any], Any]
    help: str
    required: bool = True


@dataclass(frozen=True)
class Key:
    """A console key for a command, with the arguments it always passes (scale's +1 and -1)."""

    key: str
    description: str
    display: str | None = None
    args: tuple[tuple[str, Any], ...] = ()
    id: str | None = None  # the binding's id, for remapping (default: the command's name)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[Primary, dict[str, Any]], Awaitable[Any]]
    args: tuple[Arg, ...] = ()
    report: Callable[[Any], str] = str  # the result, in one line for the operator (CLI output, console toast)
    keys: tuple[Key, ...] = ()
    title: str | None = None  # in the console's command palette
    confirm: str | None = None  # the console asks first; {arg} fields are filled in
    console: bool = True  # offered by the console
    cli: bool = True  # a `clusterctl-tui` command of its own (False: the socket and the console only)

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The arguments, checked; ValueError names the first that is missing or wrong."""
        args = {}
        for arg in self.args:
            if arg.name not in raw or raw[arg.name] is None:
                if arg.required:
                    raise ValueError(f"{self.name}: missing {arg.name}")
                continue
            try:
                args[arg.name] = arg.check(raw[arg.name])
            except ValueError as exc:
                raise ValueError(f"{self.name} {arg.name}: {exc}") from None
        return args


# ---------------------------------------------------------------- handlers (run on the primary)


async def _status(primary: Primary, args: dict[str, Any]) -> Any:
    return primary.snapshot().to_status()


async def _subscribe(primary: Primary, args: dict[str, Any]) -> Any:
    return primary.feed()


async def _scale(primary: Primary, args: dict[str, Any]) -> Any:
    if ("count" in args) == ("delta" in args):
        raise ValueError("scale: give exactly one of count or delta")
    count = args["count"] if "count" in args else primary.desired_workers + args["delta"]
    try:
        return {"desired_workers": primary.scale(count)}
    except ValueError as exc:  # out of range: the supervisor's words
        raise ControlError(str(exc)) from None


async def _reload(primary: Primary, args: dict[str, Any]) -> Any:
    try:
        generation = await primary.reload()
        return {"generation": generation, "config": primary.config_changes}
    except ReloadRefused as exc:
        raise ControlError(f"reload refused: {exc}") from None
    except ReloadInterrupted:
        raise ControlError("reload interrupted: the cluster is stopping") from None
    except ReloadFailed as exc:
        raise ControlError(f"reload rolled back: {exc}") from None


async def _kill(primary: Primary, args: dict[str, Any]) -> Any:
    try:
        return {"worker": args["worker"], "pid": primary.kill_worker(args["worker"])}
    except LookupError as exc:
        raise ControlError(str(exc)) from None


async def _run_job(primary: Primary, args: dict[str, Any]) -> Any:
    try:
        return {"job": args["job"], "run_id": await primary.run_job(args["job"])}
    except LookupError as exc:
        raise ControlError(str(exc)) from None


async def _wait_run(primary: Primary, args: dict[str, Any]) -> Any:
    assert primary.scheduler is not None
    try:
        await primary.scheduler.wait_run(args["job"], args["run_id"])
    except LookupError as exc:
        raise ControlError(str(exc)) from None
    return {"job": args["job"], "run_id": args["run_id"]}


def _pausing(paused: bool) -> Callable[[Primary, dict[str, Any]], Awaitable[Any]]:
    async def handler(primary: Primary, args: dict[str, Any]) -> Any:
        try:
            await primary.set_job_paused(args["job"], paused)
        except LookupError as exc:
            raise ControlError(str(exc)) from None
        return {"job": args["job"], "paused": paused}

    return handler


async def _replay(primary: Primary, args: dict[str, Any]) -> Any:
    ids = await primary.replay_delivery(args["delivery"])
    if not ids:
        raise ControlError(f"no delivery with id {args['delivery']}")
    return {"delivery": args["delivery"], "ids": ids}


async def _runs(primary: Primary, args: dict[str, Any]) -> Any:
    return encode(await primary.job_history(args.get("job"), args.get("status"), args.get("limit", 100)))


async def _deliveries(primary: Primary, args: dict[str, Any]) -> Any:
    return encode(await primary.deliveries(args.get("limit", 100)))


async def _queues(primary: Primary, args: dict[str, Any]) -> Any:
    return await primary.endpoint_queues()


async def _stop(primary: Primary, args: dict[str, Any]) -> Any:
    primary.request_stop()
    return {"stopping": True, "pid": primary.pid}


# ---------------------------------------------------------------- the table

_JOB = Arg("job", name, "the job's name")
_LIMIT = Arg("limit", whole, "at most this many", required=False)

COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("status", "show the running cluster", _status, console=False),
        Command(
            "subscribe", "a live feed of snapshots, events and worker output", _subscribe, console=False, cli=False
        ),
        Command(
            "scale",
            "set the worker count: N, +K or -K",
            _scale,
            (
                Arg("count", whole, "the number of workers", required=False),
                Arg("delta", whole, "workers to add (or remove, if negative)", required=False),
            ),
            report=lambda r: f"desired workers: {r['desired_workers']}",
            keys=(
                Key("plus", "+1", "+", (("delta", 1),), "scale_up"),
                Key("minus", "-1", "-", (("delta", -1),), "scale_down"),
            ),
        ),
        Command(
            "reload",
            "re-read the config, then a rolling restart; exits non-zero if refused or rolled back",
            _reload,
            report=lambda r: (
                f"reloaded: generation {r['generation']}" + (f" ({'; '.join(r['config'])})" if r.get("config") else "")
            ),
            keys=(Key("r", "Restart"),),
            title="Rolling restart",
            confirm="Rolling restart of every worker, one slot at a time?",
        ),
        Command(
            "kill",
            "SIGKILL one worker (it is replaced)",
            _kill,
            (Arg("worker", whole, "the worker's slot (its ID)"),),
            report=lambda r: f"killed worker {r['worker']} (pid {r['pid']})",
            keys=(Key("k", "Kill"),),
            title="Kill worker",
            confirm="SIGKILL worker {worker}?",
        ),
        Command(
            "run-job",
            "run a job now (recorded as a manual run)",
            _run_job,
            (_JOB,),
            report=lambda r: f"started run {r['run_id']} of {r['job']}",
            keys=(Key("j", "Run now"),),
            title="Run job now",
        ),
        Command(
            "wait-run",
            "wait until a run has finished and its outcome is stored",
            _wait_run,
            (_JOB, Arg("run_id", whole, "the run")),
            console=False,
            cli=False,
        ),
        Command(
            "pause-job",
            "pause a job's schedule (persisted)",
            _pausing(True),
            (_JOB,),
            report=lambda r: f"{r['job']}: paused",
            title="Pause job",
        ),
        Command(
            "resume-job",
            "resume a paused job's schedule",
            _pausing(False),
            (_JOB,),
            report=lambda r: f"{r['job']}: resumed",
            title="Resume job",
        ),
        Command(
            "replay",
            "deliver a webhook again (same webhook-id)",
            _replay,
            (Arg("delivery", whole, "the delivery's id"),),
            report=lambda r: f"delivery {r['delivery']} queued again as {', '.join(map(str, r['ids']))}",
            keys=(Key("y", "Replay"),),
            title="Replay delivery",
            cli=False,  # `clusterctl-tui webhooks replay` works on the store, with no primary needed
        ),
        Command(
            "runs",
            "job runs, newest first",
            _runs,
            (Arg("job", name, "only this job", required=False), Arg("status", name, "only this status", False), _LIMIT),
            console=False,
            cli=False,
        ),
        Command("deliveries", "recent webhook deliveries", _deliveries, (_LIMIT,), console=False, cli=False),
        Command("queues", "deliveries by endpoint and status", _queues, console=False, cli=False),
        Command(
            "stop",
            "graceful shutdown of the whole cluster",
            _stop,
            report=lambda r: f"stopping (primary {r['pid']})",
            title="Stop cluster",
            confirm="Stop the cluster? Every worker drains and exits.",
        ),
    )
}

# Signals on the primary, as gunicorn has them: each is a command with fixed arguments.
SIGNALS: dict[signal.Signals, tuple[str, dict[str, Any]]] = {
    signal.SIGHUP: ("reload", {}),
    signal.SIGTTIN: ("scale", {"delta": 1}),
    signal.SIGTTOU: ("scale", {"delta": -1}),
    signal.SIGTERM: ("stop", {}),
    signal.SIGINT: ("stop", {}),
}


def lookup(cmd: str) -> Command:
    try:
        return COMMANDS[cmd]
    except KeyError:
        raise ControlError(f"unknown command {cmd!r}") from None


async def dispatch(primary: Primary, cmd: str, raw: dict[str, Any]) -> Any:
    """Run one command on the primary: the control socket's handler, and the in-process console's."""
    command = lookup(cmd)
    return await command.run(primary, command.parse(raw))
