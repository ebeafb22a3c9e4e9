"""`seqpar bench sweep CONFIG.yaml`: run a grid of benchmark points, resumably; collect; plot.

    seqpar bench sweep configs/sweeps/toy_cpu.yaml            # run what is missing, then plot
    seqpar bench sweep configs/sweeps/toy_cpu.yaml --dry-run  # list the points and their commands

A sweep YAML names a grid (the cartesian product of its lists, minus `exclude`), one point runner
(a command-line template with the grid values substituted, or a Python `module:function`), the
metrics to keep from each point's JSON output, and the plots to draw. Each point leaves one JSON
record in <out>/records/, written atomically; a point whose record exists is not run again (a
failed one only with --retry-failed). All records are collected into <out>/results.json and the
plots are drawn into <out>/plots/. The YAML format and the record format are in docs/scaling.md.
"""
from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

RECORD_SCHEMA = "seqpar.sweep.record/1"
RESULTS_SCHEMA = "seqpar.sweep.results/1"
_TOP_KEYS = {"name", "description", "output", "grid", "exclude", "point", "rows", "metrics", "plots"}
_POINT_KEYS = {"command", "function", "args", "timeout_s", "env", "expects"}
_PLOT_KEYS = {"file", "title", "x", "y", "series", "where", "logx", "logy", "xlabel", "ylabel", "model"}
_RESERVED = {"out", "python"}  # placeholders the runner fills in besides the grid values


class SweepError(ValueError):
    """A sweep YAML that cannot run as written; the message says what to change."""


@dataclass(frozen=True)
class Sweep:
    name: str
    grid: dict
    point: dict
    path: Path
    description: str = ""
    output: str | None = None
    exclude: tuple = ()
    rows: str | None = None
    metrics: dict = field(default_factory=dict)
    plots: tuple = ()

    @property
    def keys(self) -> list[str]:
        """The names a point's values have: grid names, and the keys of zipped axes' entries."""
        return _point_keys(self.grid)

    def points(self) -> list[dict]:
        """The grid's points in a stable order (the YAML's key order, then each list's order)."""
        out = []
        for combo in itertools.product(*self.grid.values()):
            values = {}
            for name, value in zip(self.grid, combo):
                values.update(value if isinstance(value, dict) else {name: value})
            if not any(all(values.get(k) == v for k, v in ex.items()) for ex in self.exclude):
                out.append(values)
        return out

    def out_dir(self, override: str | None = None) -> Path:
        return Path(override or self.output or Path("runs") / "sweeps" / self.name)


def _point_keys(grid: dict) -> list[str]:
    keys = []
    for name, values in grid.items():
        if isinstance(values[0], dict):  # a zipped axis: each entry sets several keys together
            keys += [k for k in values[0] if k not in keys]
        else:
            keys.append(name)
    return keys


def load_sweep(path) -> Sweep:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} not found") from None
    where = f"sweep {path}"
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping at the top level")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "grid", "point"):
        if key not in raw:
            raise SweepError(f"{where}: missing '{key}'")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(raw["name"])):
        raise SweepError(f"{where}: name {raw['name']!r} must be letters, digits, '_', '.', '-' (it names a folder)")
    grid = raw["grid"]
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where}: 'grid' must map names to lists of values")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"{where}: grid '{k}' must be a non-empty list, got {v!r}")
        if any(isinstance(x, dict) for x in v):
            if not all(isinstance(x, dict) and set(x) == set(v[0]) for x in v):
                raise SweepError(f"{where}: zipped grid axis '{k}' needs entries that all set the same keys")
        names = set(v[0]) if isinstance(v[0], dict) else {k}
        if names & _RESERVED:
            raise SweepError(f"{where}: grid name(s) {sorted(names & _RESERVED)} are reserved for the runner")
    keys = _point_keys(grid)
    if len(keys) != sum(len(v[0]) if isinstance(v[0], dict) else 1 for v in grid.values()):
        raise SweepError(f"{where}: a grid name is set by two axes")
    exclude = raw.get("exclude") or []
    for ex in exclude:
        if not isinstance(ex, dict) or not set(ex) <= set(keys):
            raise SweepError(f"{where}: each 'exclude' entry must map grid names to values, got {ex!r}")
    point = raw["point"]
    if not isinstance(point, dict) or set(point) - _POINT_KEYS:
        raise SweepError(f"{where}: 'point' takes {sorted(_POINT_KEYS)}, got {point!r}")
    if ("command" in point) == ("function" in point):
        raise SweepError(f"{where}: 'point' needs exactly one of 'command' (a template) or 'function' (module:name)")
    if "command" in point:
        fields = {f for _, f, _, _ in string.Formatter().parse(point["command"]) if f}
        missing = fields - set(keys) - _RESERVED
        if missing:
            raise SweepError(f"{where}: the command uses {{{', '.join(sorted(missing))}}} which the grid does not define")
        if "out" not in fields:
            raise SweepError(f"{where}: the command must write its JSON to {{out}} (add e.g. '--out {{out}}')")
    elif ":" not in point["function"]:
        raise SweepError(f"{where}: function must be 'module:name', got {point['function']!r}")
    metrics = raw.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise SweepError(f"{where}: 'metrics' must map a name to a dotted path into the point's JSON output")
    plots = raw.get("plots") or []
    for p in plots:
        if not isinstance(p, dict) or set(p) - _PLOT_KEYS or not {"file", "x", "y"} <= set(p):
            raise SweepError(f"{where}: each plot needs file, x, y (and may have {sorted(_PLOT_KEYS)}), got {p!r}")
    return Sweep(name=raw["name"], grid=grid, point=point, path=path, description=raw.get("description", ""),
                 output=raw.get("output"), exclude=tuple(exclude), rows=raw.get("rows"), metrics=metrics,
                 plots=tuple(plots))


# ---- points and records ------------------------------------------------------------------------------
def point_key(values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def record_path(out_dir: Path, values: dict) -> Path:
    key = point_key(values)
    readable = re.sub(r"[^A-Za-z0-9=,._-]", "_", key)[:120]
    return out_dir / "records" / f"{readable}.{hashlib.sha1(key.encode()).hexdigest()[:8]}.json"


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary file in the same folder, then rename: a reader sees all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lookup(obj, path: str):
    """A dotted path into nested dicts/lists: 'results.0.efficiency'."""
    for part in path.split("."):
        if isinstance(obj, list):
            obj = obj[int(part)]
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            raise KeyError(path)
    return obj


def _pick(sweep: Sweep, obj) -> dict:
    if not sweep.metrics:
        return {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool))} if isinstance(obj, dict) else {}
    out = {}
    for name, path in sweep.metrics.items():
        try:
            out[name] = lookup(obj, path)
        except (KeyError, IndexError, ValueError):
            raise SweepError(f"sweep {sweep.name}: metric '{name}' path '{path}' is not in the point's output "
                             f"(keys there: {sorted(obj) if isinstance(obj, dict) else type(obj).__name__})") from None
    return out


def extract_metrics(sweep: Sweep, output) -> list[dict]:
    """The metrics of a point's output: one dict, or one per row when the sweep names `rows` (a
    dotted path to a list in the output, e.g. the `results` table of `seqpar bench sp`). A dict
    is the sweep's `metrics` (name -> dotted path); without that mapping, the top-level numbers
    and strings."""
    if sweep.rows is None:
        return [_pick(sweep, output)]
    try:
        rows = lookup(output, sweep.rows)
    except (KeyError, IndexError, ValueError):
        raise SweepError(f"sweep {sweep.name}: rows path '{sweep.rows}' is not in the point's output") from None
    return [_pick(sweep, row) for row in rows]


# ---- command checks ----------------------------------------------------------------------------------
def _seqpar_words(argv: list[str]) -> list[str] | None:
    """The words after the seqpar entry point in argv (`seqpar ...` or `-m seqpar.cli ...`), or None."""
    for i, w in enumerate(argv):
        if os.path.basename(w) == "seqpar":
            return argv[i + 1:]
        if w == "-m" and i + 1 < len(argv) and argv[i + 1] == "seqpar.cli":
            return argv[i + 2:]
    return None


def missing_command(argv: list[str]) -> str | None:
    """Why this command line cannot run here (the program or the seqpar subcommand it names does not
    exist), or None."""
    if shutil.which(argv[0]) is None:
        return f"program '{argv[0]}' is not on PATH"
    words = _seqpar_words(argv)
    if words is None:
        return None
    from seqpar.cli import SUBCOMMANDS

    if not words or words[0] not in SUBCOMMANDS:
        return f"'seqpar {words[0] if words else ''}' is not a seqpar subcommand (have: {', '.join(SUBCOMMANDS)})"
    if words[0] == "bench":
        from seqpar.bench.cli import BENCHMARKS

        if len(words) < 2 or words[1] not in BENCHMARKS:
            name = words[1] if len(words) > 1 else ""
            return f"'seqpar bench {name}' is not a seqpar benchmark (have: {', '.join(BENCHMARKS)})"
    return None


def command_argv(sweep: Sweep, values: dict, out: Path) -> list[str]:
    """The template split like a shell line, then each word filled in (values cannot split words)."""
    fill = {**values, "out": str(out), "python": sys.executable}
    return [word.format(**fill) for word in shlex.split(sweep.point["command"])]


def check_runnable(sweep: Sweep, points: list[dict], out_dir: Path) -> None:
    """Raise before any point runs if a point's command or function does not exist."""
    if "function" in sweep.point:
        resolve_function(sweep.point["function"])
        return
    problems = {}
    for values in points:
        why = missing_command(command_argv(sweep, values, out_dir / "x.json"))
        if why:
            problems.setdefault(why, values)
    if problems:
        expects = sweep.point.get("expects")
        lines = [f"sweep {sweep.name} ({sweep.path}): its point command cannot run here:"]
        lines += [f"  {why} (first at point {point_key(v)})" for why, v in problems.items()]
        if expects:
            lines.append(f"  this sweep expects: {expects}")
        lines.append("  nothing was run. Install or merge what provides the command, or fix 'point.command'.")
        raise SweepError("\n".join(lines))


def resolve_function(spec: str):
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SweepError(f"point function '{spec}' cannot be imported: {e}") from None
    if not callable(fn):
        raise SweepError(f"point function '{spec}' is not callable")
    return fn


# ---- running -----------------------------------------------------------------------------------------
def run_point(sweep: Sweep, values: dict, out_dir: Path) -> dict:
    """Run one point; return its record (status ok or failed; never raises for a failing point)."""
    rec_path = record_path(out_dir, values)
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": RECORD_SCHEMA, "sweep": sweep.name, "key": point_key(values), "point": values,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}
    t0 = time.perf_counter()
    try:
        if "function" in sweep.point:
            args = sweep.point.get("args") or {}
            record["runner"] = {"function": sweep.point["function"], "args": args}
            output = resolve_function(sweep.point["function"])(**values, **args)
        else:
            output = _run_command(sweep, values, rec_path, record)
        record.update(status="ok", output=output, error=None)
    except Exception as e:  # noqa: BLE001 - a failing point is a result (e.g. out of memory), kept and reported
        record.update(status="failed", output=None, error=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(rec_path, record)
    return record


def _run_command(sweep: Sweep, values: dict, rec_path: Path, record: dict):
    out = rec_path.with_suffix(".out.json")
    out.unlink(missing_ok=True)
    argv = command_argv(sweep, values, out)
    record["runner"] = {"command": argv}
    env = {**os.environ, **{k: str(v) for k, v in (sweep.point.get("env") or {}).items()}}
    log = rec_path.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=sweep.point.get("timeout_s"))
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}; last lines of {log}:\n" + _tail(log))
    if not out.exists():
        raise RuntimeError(f"the command exited 0 but wrote no JSON to {out}; last lines of {log}:\n" + _tail(log))
    output = json.loads(out.read_text())
    out.unlink()
    return output


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class SweepRun:
    out_dir: Path
    ran: int
    skipped: int  # points that already had a record and were not run again
    records: list
    results_path: Path
    plots: list


def run_sweep(sweep: Sweep, out_dir: Path | None = None, retry_failed: bool = False, run: bool = True,
              log=print) -> SweepRun:
    """Run the points without a record (and failed ones with retry_failed), collect, plot."""
    out_dir = Path(out_dir) if out_dir else sweep.out_dir()
    points = sweep.points()
    todo = []
    for values in points:
        rec = _read_record(record_path(out_dir, values))
        if rec is None or (retry_failed and rec.get("status") != "ok"):
            todo.append(values)
    if run and todo:
        check_runnable(sweep, todo, out_dir)
    ran = 0
    for i, values in enumerate(todo if run else []):
        log(f"[{i + 1}/{len(todo)}] {point_key(values)} ...", flush=True)
        rec = run_point(sweep, values, out_dir)
        ran += 1
        obs = observations(sweep, [rec]) if rec["status"] == "ok" else []
        summary = f"{len(obs)} rows" if len(obs) > 1 else ", ".join(
            f"{k}={_fmt(v)}" for o in obs for k, v in o.items() if k not in values and k != "status")
        log(f"    {rec['status']} in {rec['seconds']:.1f} s" + (f": {summary}" if summary else "")
            + (f"\n    {rec['error']}" if rec["error"] else ""), flush=True)
    records = [r for r in (_read_record(record_path(out_dir, v)) for v in points) if r is not None]
    results_path = out_dir / "results.json"
    write_json_atomic(results_path, {"schema": RESULTS_SCHEMA, "sweep": sweep.name, "description": sweep.description,
                                     "config": str(sweep.path), "grid": sweep.grid, "records": records})
    plots = draw_plots(sweep, records, out_dir / "plots")
    return SweepRun(out_dir, ran, len(points) - len(todo), records, results_path, plots)


def _read_record(path: Path):
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if rec.get("schema") != RECORD_SCHEMA:
        raise SweepError(f"{path} is not a {RECORD_SCHEMA} record; move it away or choose another --out")
    return rec


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def observations(sweep: Sweep, records: list) -> list[dict]:
    """What tables and plots read: per ok record, one dict per row of its output (its point values
    plus the metrics the sweep names), extracted now, so that editing `metrics` in the YAML needs no
    rerun; a failed record gives one dict with its status."""
    out = []
    for r in records:
        if r["status"] != "ok":
            out.append({**r["point"], "status": r["status"]})
            continue
        out += [{**r["point"], "status": "ok", **m} for m in extract_metrics(sweep, r["output"])]
    return out


def format_table(sweep: Sweep, records: list) -> str:
    obs = observations(sweep, records)
    cols = list(dict.fromkeys([*sweep.keys, "status", *(k for o in obs for k in o)]))
    rows = [[_fmt(o.get(c, "")) for c in cols] for o in obs]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


# ---- plots -------------------------------------------------------------------------------------------
def plot_series(spec: dict, obs: list[dict]) -> dict:
    """{series label: sorted [(x, y)]} of the ok observations that pass `where`."""
    series = spec.get("series") or []
    series = [series] if isinstance(series, str) else list(series)
    where = spec.get("where") or {}
    out: dict[str, list] = {}
    for o in obs:
        if o["status"] != "ok" or any(o.get(k) != v for k, v in where.items()):
            continue
        x, y = o.get(spec["x"]), o.get(spec["y"])
        if x is None or y is None:
            continue
        label = ", ".join(f"{k}={o.get(k)}" for k in series) or spec["y"]
        out.setdefault(label, []).append((x, y))
    return {k: sorted(v) for k, v in out.items()}


def model_curves(spec: dict) -> dict:
    """{'model: <method>': [(P, predicted efficiency)]} from the cost model (seqpar bench model);
    spec holds predict_point's arguments, with `methods` and `P` lists."""
    from seqpar.bench.model import predict_point

    spec = dict(spec)
    methods = spec.pop("methods", ["lasp2_ring", "zeco"])
    Ps = spec.pop("P", [2 ** i for i in range(1, 11)])
    spec.setdefault("variant", "gla")
    spec.setdefault("t_local", 65536)
    curves = {}
    for method in methods:
        pts = [(P, predict_point(world_size=P, method=method, **spec)["efficiency"]) for P in Ps]
        curves[f"model: {method}"] = [(P, e) for P, e in pts if e is not None]
    return curves


def draw_plots(sweep: Sweep, records: list, plot_dir: Path) -> list[Path]:
    if not sweep.plots:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plot_dir.mkdir(parents=True, exist_ok=True)
    obs = observations(sweep, records)
    paths = []
    for spec in sweep.plots:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        measured = plot_series(spec, obs)
        for label, pts in measured.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, lw=1.5, ms=4)
        if spec.get("model"):
            for label, pts in model_curves(spec["model"]).items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", label=label, lw=1.2)
        if not measured:
            ax.text(0.5, 0.5, "no successful points yet", ha="center", va="center", transform=ax.transAxes)
        if spec.get("logx"):
            ax.set_xscale("log", base=2)
        elif all(isinstance(x, int) for pts in measured.values() for x, _ in pts):
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if spec.get("logy"):
            ax.set_yscale("log")
        elif all(y >= 0 for pts in measured.values() for _, y in pts):
            ax.set_ylim(bottom=0)  # a linear axis from zero: a 6% drop should look like one
        ax.set_xlabel(spec.get("xlabel", spec["x"]))
        ax.set_ylabel(spec.get("ylabel", spec["y"]))
        ax.set_title(spec.get("title", f"{sweep.name}: {spec['y']} vs {spec['x']}"), fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / spec["file"]
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- command line ------------------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("config", help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the YAML's 'output' or runs/sweeps/NAME)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed points again")
    parser.add_argument("--dry-run", action="store_true", help="list the points and what would run; run nothing")
    parser.add_argument("--plots-only", action="store_true", help="collect the records and plot; run nothing")
    parser.set_defaults(func=main)


def main(args) -> int:
    try:
        sweep = load_sweep(args.config)
        out_dir = sweep.out_dir(args.out)
        if args.dry_run:
            for values in sweep.points():
                done = _read_record(record_path(out_dir, values))
                what = (" ".join(shlex.quote(w) for w in command_argv(sweep, values, Path("{out}")))
                        if "command" in sweep.point else f"{sweep.point['function']}(**point, **args)")
                print(f"{'done' if done else 'todo'}  {point_key(values)}  {what}")
            if "command" in sweep.point:
                check_runnable(sweep, sweep.points(), out_dir)
            return 0
        result = run_sweep(sweep, out_dir, retry_failed=args.retry_failed, run=not args.plots_only)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(sweep, result.records))
    print(f"ran {result.ran} point(s), {result.skipped} already recorded; wrote {result.results_path}")
    for p in result.plots:
        print(f"wrote {p}")
    failed = [r for r in result.records if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} point(s) failed (kept as records; --retry-failed runs them again)")
    return 1 if failed else 0
