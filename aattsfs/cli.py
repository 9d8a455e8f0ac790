"""The `aattsfs` command. Each subcommand is a thin layer over mount.py or
the control surface of a live mount (xattrs and `.aatts/`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import sys

import re
import tomllib

import click
from click.core import ParameterSource

from . import control
from .control import CONTROL_NAME
from .errors import UserError
from .passthrough import MODES as PASSTHROUGH_MODES
from .policy import ADMISSIONS, POLICIES
from .predict import PREDICTORS
from .tracegen import PATTERNS, write_trace
from .units import SIZE_HELP, format_size, parse_size

LOG_LEVELS = ["debug", "info", "warning", "error"]


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except UserError as exc:
            self.fail(str(exc), param, ctx)


class FloorType(SizeType):
    """A size, `auto` (None: the default, decided by the fast dir's
    filesystem at mount) or `off` (0). A size of 0 is refused as any size:
    `off` says it plainly."""
    name = "size|auto|off"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
            return None if value.strip().lower() == "auto" else 0
        try:
            return parse_size(value)
        except UserError as exc:
            self.fail(f"{exc}; or auto, or off", param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aattsfs")
def cli():
    """aattsfs: a tiered FUSE filesystem for model files.

    Mount a slow cold directory; reads come from a fast tier (RAM by default)
    once files are promoted there.
    """


@cli.command()
@click.argument("cold_dir", required=False)
@click.argument("mountpoint", required=False)
@click.option("--config", "config_file", metavar="FILE",
              help="A TOML file of these settings, keyed by option name with underscores "
              "(cold_dir, mountpoint, fast_size = \"16G\", ...); options given on the "
              "command line override it. See docs/operations.md.")
@click.option("--fast-dir", help="Directory of the fast tier [default: /dev/shm/aattsfs/<mount>].")
@click.option("--fast-size", type=SizeType(), default="4G", show_default=True,
              help=f"Byte budget of the fast tier, e.g. 512M, 2G; units {SIZE_HELP}.")
@click.option("--fast-min-free", type=FloorType(), default="auto", show_default=True,
              help="Free memory to keep on the box (its MemAvailable), e.g. 2G: below it the "
              "fast tier evicts and shrinks until memory is back, then grows back to "
              "--fast-size; auto: 1G if the fast dir is on tmpfs or ramfs, else off; off: "
              "never (docs/memory.md).")
@click.option("--state-dir", help="Where the metadata (LMDB) and the log live "
              "[default: /var/lib/aattsfs/<mount> for root].")
@click.option("--policy", type=click.Choice(sorted(POLICIES)), default="lru",
              show_default=True, help="Eviction policy of the fast tier.")
@click.option("--admission", type=click.Choice(sorted(ADMISSIONS)), default="reuse",
              show_default=True, help="Which files that need room are copied: reuse: only "
              "those expected back before they would be evicted, the rest are read from the "
              "cold tier; all: every file read (docs/admission.md).")
@click.option("--read-ahead", type=SizeType(), default="1M", show_default=True,
              help="Kernel readahead of the mount, the size of read requests.")
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="Stage the files expected next (learned order and model-format "
              "hints) before they are opened.")
@click.option("--predictor", type=click.Choice(sorted(PREDICTORS)), default="markov",
              show_default=True, help="How the order of opens is learned.")
@click.option("--prefetch-jobs", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Files the prefetcher promotes at once.")
@click.option("--prefetch-bandwidth", type=SizeType(), default=None,
              help="Cap on the cold-tier bytes per second read by prefetching, e.g. 100M "
              "[default: no cap].")
@click.option("--learn-from", metavar="FILE",
              help="Seed the learner at each start with a trace exported on another box "
              "(aattsfs trace export), after what this mount has learned; not kept "
              "(docs/fleet.md).")
@click.option("--push-page-cache", is_flag=True,
              help="Also copy each staged file into the kernel page cache (RAM used twice; "
              "see docs/prediction.md).")
@click.option("--passthrough", type=click.Choice(PASSTHROUGH_MODES), default="auto",
              show_default=True, help="Let the kernel read promoted files from the fast "
              "tier itself (Linux 6.9+, libfuse 3.17+, root); auto: when possible, saying "
              "why not otherwise. See docs/passthrough.md.")
@click.option("--cold-watch", type=click.Choice(["auto", "off"]), default="auto",
              show_default=True, help="Open fast copies without a cold-tier call while "
              "inotify reports no change to the cold file (local filesystems only); off: "
              "check the cold file on every open. See docs/reliability.md.")
@click.option("--metrics-address", metavar="HOST:PORT",
              help="Serve Prometheus metrics there, e.g. 127.0.0.1:9464 [default: off].")
@click.option("--metrics-allow-remote", is_flag=True,
              help="Allow a --metrics-address other machines can reach (no authentication).")
@click.option("--allow-other", is_flag=True, help="Let other users access the mount.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground "
              "(for systemd and debugging); log to stderr.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="info", show_default=True,
              help="Least severe messages logged; debug logs every FUSE request.")
@click.option("--debug", is_flag=True, help="Same as --log-level debug.")
def mount(config_file, foreground, debug, **opts):
    """Mount COLD_DIR on MOUNTPOINT.

    Both may come from a --config file instead. Without --foreground the
    daemon detaches and logs to <state-dir>/aattsfs.log.
    """
    from .mount import MountConfig, daemonize, run_foreground

    if config_file:
        ctx = click.get_current_context()
        for key, value in _read_config(ctx, config_file).items():
            if ctx.get_parameter_source(key) != ParameterSource.COMMANDLINE:
                opts[key] = value
    if not (opts["cold_dir"] and opts["mountpoint"]):
        raise UserError("give COLD_DIR and MOUNTPOINT, or a --config file that sets "
                        "cold_dir and mountpoint")
    opts["log_level"] = "debug" if debug else opts["log_level"]
    opts["prefetch_bandwidth"] = opts["prefetch_bandwidth"] or 0
    cfg = MountConfig(opts.pop("cold_dir"), opts.pop("mountpoint"), **opts)
    if foreground:
        run_foreground(cfg)
    else:
        daemonize(cfg, sys.argv[1:])


NOT_IN_CONFIG = {"config_file", "foreground", "debug"}


def _read_config(ctx: click.Context, path: str) -> dict:
    """The settings of a TOML config file, checked and converted by the very
    option types of the command line. Raises UserError naming the file, the
    line and the key of the first mistake."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: "
                        f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    params = {p.name: p for p in ctx.command.params if p.name not in NOT_IN_CONFIG}
    out = {}
    for key, value in data.items():
        m = re.search(rf'^[ \t]*\[?[ \t]*["\']?{re.escape(key)}["\']?[ \t]*[=.\]]', text,
                      re.M)
        where = f"{path}:{text.count(chr(10), 0, m.start()) + 1}" if m else path
        if key not in params:
            raise UserError(f"{where}: unknown key '{key}'; the keys are "
                            f"{', '.join(sorted(params))}")
        param = params[key]
        types, expected = _toml_kind(param)
        # TOML has real types: a flag is true or false, a count an integer;
        # nothing is coerced (1 is not true, 2.7 not 2, "2" not 2)
        if not isinstance(value, types) or isinstance(value, bool) != (bool in types):
            raise UserError(f"{where}: bad value for '{key}': expected {expected}, "
                            f"not {_toml_repr(value)}")
        try:  # then ranges, choices and sizes, as on the command line
            out[key] = param.type.convert(value, param, ctx)
        except click.BadParameter as exc:
            raise UserError(f"{where}: bad value for '{key}': {exc.message}") from None
    return out


def _toml_kind(param: click.Parameter) -> tuple[tuple[type, ...], str]:
    """The TOML types a setting accepts, and how to say so."""
    if isinstance(param.type, SizeType):
        return (str, int), 'a size: a string such as "16G" or a positive integer of bytes'
    if isinstance(param.type, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(param.type, click.types.IntParamType):
        return (int,), "an integer"
    return (str,), "a string (in quotes)"


def _toml_repr(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "a table"
    return str(value)  # numbers, dates


@cli.command()
@click.argument("mountpoint", required=False)
@click.option("--config", "config_file", metavar="FILE",
              help="Unmount the mountpoint this mount config file names.")
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if files are open.")
def umount(mountpoint, config_file, lazy):
    """Unmount an aattsfs mount."""
    from .mount import unmount

    if config_file and not mountpoint:  # the file is a mount's: read it as `mount` would
        mount_ctx = click.Context(mount, info_name="mount")
        mountpoint = _read_config(mount_ctx, config_file).get("mountpoint")
    if not mountpoint:
        raise UserError("give the MOUNTPOINT, or a --config file that sets mountpoint")
    unmount(mountpoint, lazy)


@cli.command("install-unit")
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True)
@click.option("--config-dir", default="/etc/aattsfs", show_default=True,
              help="Where the unit looks for NAME.toml, and where example.toml goes.")
def install_unit(unit_dir, config_dir):
    """Install the systemd unit and an example config.

    Puts aattsfs@.service in --unit-dir and example.toml in --config-dir. Then
    write CONFIG_DIR/NAME.toml (see example.toml there) and run
    `systemctl enable --now aattsfs@NAME`. The unit runs this install of
    aattsfs and reads its configs from --config-dir.
    """
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    # the unit and the example ship inside the package (package data)
    source = Path(__file__).resolve().parent / "systemd"
    if not (source / "aattsfs@.service").is_file() or not (source / "example.toml").is_file():
        raise UserError(f"the unit file or example.toml is missing from {source}; "
                        "reinstall aattsfs")
    for value, option in ((unit_dir, "--unit-dir"), (config_dir, "--config-dir")):
        if not value:
            raise UserError(f"{option} is empty; give a directory")
    config_dir = os.path.abspath(config_dir)  # the unit names it from /
    _check_unit_path(config_dir, "--config-dir")
    # this environment's console script; `python -m` where there is none (it
    # would also import an `aattsfs` directory in the working directory first)
    script = Path(sysconfig.get_path("scripts"), "aattsfs")
    if script.is_file() and os.access(script, os.X_OK):
        program, command = str(script), str(script)
    else:
        program, command = sys.executable, f"{sys.executable} -m aattsfs"
    _check_unit_path(program, "the aattsfs command")
    unit = (source / "aattsfs@.service").read_text()
    unit = unit.replace("@AATTSFS@", command).replace("@CONFDIR@", config_dir)
    # the config dir first, and the unit replaced whole (a temporary file
    # renamed over it): a failed install leaves an installed unit as it was
    unit_path = Path(unit_dir, "aattsfs@.service")
    partial = unit_path.with_name(f".{unit_path.name}.{os.getpid()}")
    try:
        Path(config_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "example.toml", Path(config_dir, "example.toml"))
        Path(unit_dir).mkdir(parents=True, exist_ok=True)
        partial.write_text(unit)
        os.replace(partial, unit_path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        hint = "run as root or choose" if os.geteuid() else "choose another"
        raise UserError(f"cannot install the unit: {exc.strerror} ({exc.filename}); "
                        f"{hint} --unit-dir/--config-dir") from None
    click.echo(f"installed {Path(unit_dir, 'aattsfs@.service')} (running {command}, "
               f"configs in {config_dir}) and {Path(config_dir, 'example.toml')}")
    if Path("/run/systemd/system").is_dir():  # systemd is the running init
        subprocess.run(["systemctl", "daemon-reload"], check=False)


def _check_unit_path(path: str, what: str) -> None:
    """A path the unit file names unquoted: systemd would split it at a
    space and expand `%` and `$` in it, so such paths are refused."""
    try:
        path.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8: nothing systemd reads back
        raise UserError(f"{what} {path!r} is not valid UTF-8; choose another path") from None
    bad = sorted(set(path) & set(" \t\n\"'\\$%;"))
    if bad:
        raise UserError(f"{what} {path!r} has characters a unit file cannot hold unquoted "
                        f"({' '.join(map(repr, bad))}); choose another path")


def _control_file(mountpoint: str, name: str) -> bytes:
    path = os.path.join(mountpoint, CONTROL_NAME, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise UserError(f"{path} is for the mount's owner only; run this as root") from None
    except OSError:
        raise UserError(f"{mountpoint} is not a live aattsfs mount (cannot read {path})") from None


@cli.command()
@click.argument("mountpoint")
def verify(mountpoint):
    """Hash every copy in the fast tier against the digest taken when it was
    copied; a copy that does not match is dropped (never served) and named
    here. Exit status 1 if any did not match."""
    report = json.loads(_control_file(mountpoint, "verify"))
    click.echo(f"verified {report['checked']} copies ({format_size(report['bytes'])}): "
               f"{len(report['corrupt'])} did not match")
    for rel in report["corrupt"]:
        click.echo(f"dropped (did not match): {rel}")
    if report["corrupt"]:
        sys.exit(1)


@cli.command()
@click.argument("mountpoint")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON of .aatts/stats.")
def status(mountpoint, as_json):
    """Show tiers, budget use and hit ratios of a live mount."""
    raw = _control_file(mountpoint, "stats")
    if as_json:
        click.echo(raw.decode(errors="replace"), nl=False)
        return
    try:
        s = json.loads(raw)
    except (ValueError, RecursionError):
        raise UserError(f"{mountpoint}/{CONTROL_NAME}/stats is not JSON; is the daemon of "
                        "another version? (aattsfs status --json shows it raw)") from None

    # Every number may be missing (a daemon of another version): it prints
    # as '?', and a ratio of a missing or zero whole as '-'; never a crash.
    def num(*keys):
        v = s
        for key in keys:
            v = v.get(key) if isinstance(v, dict) else None
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def text(v):
        return "?" if v is None else f"{v:.0f}"

    def count(*keys):
        return text(num(*keys))

    def size(*keys):
        v = num(*keys)
        return "?" if v is None else format_size(v)

    def both(key):  # fast + cold
        fast, cold = num(key, "fast"), num(key, "cold")
        return None if fast is None or cold is None else fast + cold

    used, budget = num("fast_tier", "used_bytes"), num("fast_tier", "budget_bytes")
    use = f"{100 * used / budget:.0f}%" if used is not None and budget else "-"
    fast_opens, opens = num("opens", "fast"), both("opens")
    hit = f"{fast_opens / opens:.2f}" if fast_opens is not None and opens else "-"
    ft = s.get("fast_tier") if isinstance(s, dict) else None
    policy = ft.get("policy") if isinstance(ft, dict) else None
    admission = ft.get("admission") if isinstance(ft, dict) else None

    def on_off(section: str) -> str:
        sec = s.get(section) if isinstance(s, dict) else None
        sec = sec if isinstance(sec, dict) else {}
        return "?" if "active" not in sec else "on" if sec["active"] is True else \
            f"off ({sec.get('reason') or '?'})"

    pt_state, cw_state = on_off("passthrough"), on_off("cold_watch")
    mf = s.get("memory_floor") if isinstance(s, dict) else None
    mf = mf if isinstance(mf, dict) else {}
    floor_state = "?" if "active" not in mf else "off" if num("memory_floor", "floor_bytes") == 0 \
        else (f"{size('memory_floor', 'floor_bytes')}, "
              + (f"active: budget shrunk to {size('fast_tier', 'effective_budget_bytes')}"
                 if mf["active"] is True else "not active")
              + f", {size('memory_floor', 'available_bytes')} available")
    rows = [
        ("fast tier", f"{size('fast_tier', 'used_bytes')} of {size('fast_tier', 'budget_bytes')} "
                      f"({use}), {count('fast_tier', 'files')} files, "
                      f"{count('fast_tier', 'pinned_files')} pinned, policy {policy or '?'}, "
                      f"admission {admission or '?'}"),
        ("opens", f"{text(opens)} ({count('opens', 'fast')} fast, {count('opens', 'cold')} cold; "
                  f"hit ratio {hit})"),
        ("reads", f"{text(both('reads'))} ({count('reads', 'fast')} fast, "
                  f"{count('reads', 'cold')} cold)"),
        ("bytes served", f"{size('bytes_served', 'fast')} fast, "
                         f"{size('bytes_served', 'cold')} cold (passthrough reads not seen)"),
        ("passthrough", f"{pt_state}; {count('passthrough', 'opens')} opens of "
                        f"{size('passthrough', 'opened_bytes')} from the fast tier, "
                        f"{count('passthrough', 'page_cache_opens')} of "
                        f"{size('passthrough', 'page_cache_bytes')} from the cold "
                        f"tier's page cache, {count('passthrough', 'backing_files')} "
                        "backing files"),
        ("cold watch", f"{cw_state}; {count('cold_watch', 'opens')} opens without a "
                       "cold-tier call"),
        ("memory floor", f"{floor_state}; {count('memory_floor', 'evictions')} evictions "
                         f"({size('memory_floor', 'evicted_bytes')})"),
        ("cold bytes read", size("cold_bytes_read")),
        ("prefetched", f"{count('prefetch', 'prefetches')} files "
                       f"({size('prefetch', 'prefetched_bytes')}): "
                       f"{size('prefetch', 'used_bytes')} used, "
                       f"{size('prefetch', 'wasted_bytes')} wasted, "
                       f"{count('prefetch', 'cancelled')} cancelled"),
        ("demand misses", f"{count('prefetch', 'demand_misses')} "
                          f"({size('prefetch', 'demand_miss_bytes')})"),
        ("bypassed", f"{count('bypasses')} opens ({size('bypassed_bytes')}) read from "
                     "cold without a copy"),
        ("promotions", f"{count('promotions')} ({size('promoted_bytes')}), "
                       f"{count('promotions_in_flight')} in flight, "
                       f"{count('promotions_failed')} failed, "
                       f"{count('promotions_cancelled')} cancelled"),
        ("evictions", f"{count('evictions')} ({size('evicted_bytes')}), "
                      f"{count('invalidations')} invalidated"),
        ("uptime", f"{count('uptime_seconds')} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    tiers = [line.split("\t", 6) for line in
             _control_file(mountpoint, "tiers").decode(errors="replace").splitlines()[1:]]
    tiers = [t for t in tiers if len(t) == 7 and t[1].isdigit()]  # skip what is not a row
    if tiers:
        click.echo(f"\n{'tier':<10} {'size':>10} {'hits':>6} {'pin':>3}  path")
        # by the names files were opened by: a hub snapshot's files together,
        # each with the blob it is
        for tier, nbytes, hits, _misses, pinned, path, name in sorted(tiers, key=lambda t: t[6]):
            shown = name if name == path else f"{name} (-> {posixpath.basename(path)[:12]})"
            click.echo(f"{tier:<10} {format_size(int(nbytes)):>10} {hits:>6} "
                       f"{'yes' if pinned == '1' else '':>3}  {shown}")


def _hub_revision(path: str) -> str:
    """A Hugging Face hub cache's model directory (models--ORG--NAME) means
    the snapshot its refs/main names; any other path means itself."""
    try:
        with open(os.path.join(path, "refs", "main")) as f:
            rev = f.read().strip()
    except OSError:
        return path
    snapshot = os.path.join(path, "snapshots", rev)
    return snapshot if rev and "/" not in rev and os.path.isdir(snapshot) else path


def _files(paths):
    """The regular files the paths name, each once: links are followed to
    regular files (a hub snapshot is all links into its blobs), and a hub
    model directory means its refs/main snapshot."""
    seen: set[str] = set()
    for path in paths:
        if CONTROL_NAME in os.path.normpath(path).split(os.sep):
            raise UserError(f"{path} is in aattsfs's control directory, not a file of the "
                            "cold directory")
        if os.path.isdir(path):
            for dirpath, _dirs, files in os.walk(_hub_revision(path)):
                for name in sorted(files):
                    file = os.path.join(dirpath, name)
                    if os.path.isfile(file) and os.path.realpath(file) not in seen:
                        seen.add(os.path.realpath(file))
                        yield file
        elif os.path.isfile(path):
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                yield path
        elif os.path.lexists(path):
            raise UserError(f"{path} is not a regular file or a directory (or a link to one "
                            "on the mount)")
        else:
            raise UserError(f"{path} does not exist")


def _act(paths, verb: str):
    from .mount import aattsfs_mount_of

    for path in paths:  # act only on files of a mount
        try:
            os.lstat(path)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise UserError(f"{path} is on an aattsfs mount whose daemon died; clean it "
                                f"up with 'aattsfs umount {aattsfs_mount_of(path)}' and mount "
                                "again") from None
            continue  # reported as missing below
        if aattsfs_mount_of(path) is None:
            raise UserError(f"{path} is not on an aattsfs mount")
    files = [(p, os.path.getsize(p)) for p in _files(paths)]
    files = [(p, n) for p, n in files if n]
    # A bar by bytes on a terminal (warm waits for each promotion); nothing
    # on a pipe, where scripts read the one line of the result.
    bar = click.progressbar(length=sum(n for _, n in files), label=verb, file=sys.stderr,
                            show_percent=True, show_eta=True) if sys.stderr.isatty() else None
    clients: dict[str, control.Client] = {}
    with contextlib.ExitStack() as stack:
        if bar is not None:
            stack.enter_context(bar)
        for path, size in files:
            real = os.path.realpath(path)
            mountpoint = aattsfs_mount_of(real)
            if mountpoint is None:
                raise UserError(f"{path} leads to {real}, which is not on an aattsfs mount")
            try:
                if mountpoint not in clients:
                    clients[mountpoint] = stack.enter_context(control.Client(mountpoint))
                clients[mountpoint].act(verb, os.path.relpath(real, mountpoint))
            except OSError as exc:
                why = "it is pinned; unpin it first" if (verb, exc.errno) == (
                    "evict", errno.EBUSY) else WHY_NOT_FAST.get(exc.errno, exc.strerror)
                raise UserError(f"cannot {verb} {path}: {why}") from None
            if bar is not None:
                bar.update(size)
    click.echo(f"{verb}: {len(files)} file(s), {format_size(sum(n for _, n in files))}")


# What the daemon's errors of warm and pin mean (Store.warm), and what to do.
WHY_NOT_FAST = {
    errno.EFBIG: "it does not fit in the fast tier: it is larger than the whole budget; "
                 "raise --fast-size",
    errno.ENOMEM: "the box is short of memory (MemAvailable below --fast-min-free), so the "
                  "fast tier is shrunk until it is back; try again then",
    errno.EDQUOT: "it does not fit in the fast tier next to pinned files and copies "
                  "passthrough opens hold; unpin some, close files or raise --fast-size",
    errno.ENOSPC: "the fast tier's filesystem is full or failing; free space there or "
                  "lower --fast-size (see the daemon's log)",
    errno.EBUSY: "the file kept changing (or being evicted) while it was copied; try again",
    errno.EPERM: "only root and the mount's owner may warm, evict, pin or unpin",
    errno.ENODATA: "the daemon serving it has no control socket (started by an older "
                   "aattsfs?); remount it",
    errno.ECONNREFUSED: "the daemon serving it does not answer on its control socket; "
                        "see its log",
    errno.EUSERS: "the daemon has too many control connections open; try again",
}


ACTIONS = [  # (command, help): control.ACTIONS
    ("warm", "Promote files (directories: every file below) into the fast tier; waits "
             "until done."),
    ("evict", "Drop files from the fast tier (they stay in the cold tier)."),
    ("pin", "Promote files and keep them in the fast tier: never evicted."),
    ("unpin", "Let pinned files be evicted again."),
]


def _action_command(verb: str, help_text: str) -> None:
    @cli.command(verb, help=help_text)
    @click.argument("paths", nargs=-1, required=True)
    def command(paths):
        _act(paths, verb)


for _action in ACTIONS:
    _action_command(*_action)


@cli.group()
def trace():
    """Access traces: export a mount's, import one into another, or generate a
    synthetic one."""


@trace.command("export")
@click.argument("mountpoint")
def trace_export(mountpoint):
    """Print the recent opens seen by a live mount, as JSON lines."""
    sys.stdout.buffer.write(_control_file(mountpoint, "trace"))


@trace.command("import")
@click.argument("mountpoint")
@click.argument("trace_file", type=click.File("rb"), metavar="FILE")
def trace_import(mountpoint, trace_file):
    """Seed a live mount's learner with FILE, a trace exported on another box
    ('-' for stdin): merged with what it learns itself, and kept across
    restarts (docs/fleet.md). The whole file is checked first; a mistake
    imports nothing."""
    from .mount import aattsfs_mount_of, read_seed

    opens = read_seed(trace_file, trace_file.name)
    try:
        os.lstat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UserError(f"{mountpoint} is an aattsfs mount whose daemon died; clean it "
                            f"up with 'aattsfs umount {mountpoint}' and mount again") from None
        raise UserError(f"{mountpoint} is not a live aattsfs mount ({exc.strerror})") from None
    root = aattsfs_mount_of(mountpoint)
    if root is None:
        raise UserError(f"{mountpoint} is not on an aattsfs mount")
    try:
        with control.Client(root) as client:
            answer = client.learn(opens)
    except OSError as exc:
        why = WHY_NOT_LEARNED.get(exc.errno, exc.strerror or str(exc))
        raise UserError(f"cannot import {trace_file.name} into {root}: {why}") from None
    if answer.get("learned", True):
        click.echo(f"trace import: {answer.get('opens', len(opens))} opens learned by {root}")
    else:
        click.echo(f"trace import: {root} has learned these {len(opens)} opens before "
                   "(imported, or its --learn-from); nothing imported")


# What the daemon's errors of an import mean, and what to do.
WHY_NOT_LEARNED = {
    errno.EPERM: "only root and the mount's owner may import a trace",
    errno.ENODATA: "the daemon serving it has no control socket (started by an older "
                   "aattsfs?); remount it",
    errno.ECONNREFUSED: "the daemon serving it does not answer on its control socket; "
                        "see its log",
    errno.ECONNRESET: "the daemon closed the connection (started by an older aattsfs?); "
                      "see its log",
    errno.EUSERS: "the daemon has too many control connections open; try again",
    errno.EBUSY: "another import into it is in progress; try again once it is done",
}


@trace.command("generate")
@click.argument("pattern", type=click.Choice(sorted(PATTERNS)))
@click.option("--seed", type=int, default=0, show_default=True)
def trace_generate(pattern, seed):
    """Print a synthetic trace of PATTERN (the simulator's seed patterns)."""
    write_trace(PATTERNS[pattern](seed=seed), sys.stdout)


@cli.command()
@click.argument("trace_file", type=click.File("rb"), metavar="TRACE")
@click.option("--budget", type=SizeType(), required=True,
              help=f"Fast-tier budget, e.g. 2G; units {SIZE_HELP}.")
@click.option("--policy", "policies", type=click.Choice(sorted(POLICIES)), multiple=True,
              help="Policy to replay (repeatable) [default: all].")
@click.option("--admission", type=click.Choice(sorted(ADMISSIONS)), default="reuse",
              show_default=True, help="Admission filter, as the mount's --admission.")
@click.option("--predictor", type=click.Choice(sorted(PREDICTORS)), default="markov",
              show_default=True, help="Predictor of the predictive policy and of "
              "--prefetch, as the mount's --predictor.")
@click.option("--prefetch/--no-prefetch", default=False, show_default=True,
              help="Also stage the files the predictor expects, ahead of the requests "
                   "(the mount's --prefetch; off here, to compare policies alone).")
@click.option("--cold-bandwidth", type=SizeType(), default=None,
              help="Bytes a second the cold tier reads, e.g. 200M: model time (the "
                   "trace's gaps, reads one after the other) and report each policy's "
                   f"time against reading directly; units {SIZE_HELP}.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def sim(trace_file, budget, policies, admission, predictor, prefetch, cold_bandwidth,
        as_json):
    """Replay TRACE (JSON lines, '-' for stdin) through the daemon's eviction
    policies and report each against the offline optimum."""
    from .policy import make_admission, make_policy
    from .learn import Learner
    from .sim import belady_min, byte_bound, read_trace_file, simulate

    requests = read_trace_file(trace_file, trace_file.name)
    if not any(r.size for r in requests):  # no byte to cache: every ratio is 0/0
        raise UserError(f"{trace_file.name}: every open in it has size 0; there is nothing "
                        "to simulate")
    rows = {}
    for name in policies or sorted(POLICIES):
        chosen = predictor if prefetch or name == "predictive" else None
        label = name + (f"+{chosen}" if chosen else "") + ("+prefetch" if prefetch else "")
        rows[label] = simulate(requests, budget, make_policy(name),
                               Learner(chosen) if chosen else None, bool(prefetch),
                               make_admission(admission, budget),
                               cold_bandwidth or float("inf"))
    sizes = {r.size for r in requests}
    if len(sizes) == 1:  # MIN is exact for one file size
        rows["optimum (MIN)"] = belady_min(requests, budget // sizes.pop())
    bound = byte_bound(requests, budget)
    out = {name: {"hit_ratio": r.hit_ratio, "byte_hit_ratio": r.byte_hit_ratio,
                  "cold_bytes": r.cold_bytes, "prefetch_precision": r.precision,
                  "prefetch_recall": r.recall,
                  "of_optimum": r.byte_hit_ratio / bound.byte_hit_ratio
                  if bound.byte_hit_ratio else 1.0,
                  "seconds": r.seconds, "stall_seconds": r.stall_seconds,
                  "time_vs_direct": r.slowdown if cold_bandwidth else None}
           for name, r in rows.items()}
    out["byte bound"] = {"hit_ratio": None, "byte_hit_ratio": bound.byte_hit_ratio,
                         "cold_bytes": bound.cold_bytes, "prefetch_precision": 0.0,
                         "prefetch_recall": 0.0, "of_optimum": 1.0, "seconds": None,
                         "stall_seconds": None, "time_vs_direct": None}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{len(requests)} opens, budget {format_size(budget)}, admission {admission}"
               + (f", cold tier {format_size(cold_bandwidth)}/s" if cold_bandwidth else ""))
    width = max(len(n) for n in out)
    click.echo(f"{'policy':<{width}} {'hit ratio':>9} {'byte hits':>9} {'from cold':>11} "
               f"{'of bound':>8}" + (f" {'precision':>9} {'recall':>6}" if prefetch else "")
               + (f" {'time vs direct':>14}" if cold_bandwidth else ""))
    for name, r in out.items():
        hit = "-" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}"
        extra = (f" {r['prefetch_precision']:>9.2f} {r['prefetch_recall']:>6.2f}"
                 if prefetch else "")
        if cold_bandwidth:
            t = r["time_vs_direct"]
            extra += f" {'-' if t is None else f'{t:.2f}x':>14}"
        click.echo(f"{name:<{width}} {hit:>9} {r['byte_hit_ratio']:>9.3f} "
                   f"{format_size(r['cold_bytes']):>11} {r['of_optimum']:>8.2f}" + extra)
    if prefetch:
        click.echo("With prefetch, hits can exceed the bound (files are staged before "
                   "they are asked for); compare the bytes read from cold instead.")


def main():
    try:
        cli.main(prog_name="aattsfs", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aattsfs: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # click's own errors (a bad option value, a missing argument) in the
        # one-line form of every other mistake, instead of a usage block
        message = exc.format_message().rstrip(".")
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f"; see '{exc.ctx.command_path} --help'"
        click.echo(f"aattsfs: error: {message[:1].lower()}{message[1:]}", err=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"aattsfs: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
