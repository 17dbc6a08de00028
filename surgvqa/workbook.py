"""Run the numbered notebooks headlessly with papermill, and pass metrics between them.

``python -m surgvqa workbook [names...] [--preset P] [-p key=value ...]`` executes notebooks/NN-*.ipynb in
order into reports/ (an executed .ipynb and an HTML copy each). ``-p`` sets a notebook parameter when a
notebook declares it in its ``parameters`` cell, and otherwise a config override (passed to every
notebook as ``overrides``); a key that is neither raises. A failing cell stops the run with a non-zero
exit naming the notebook and the cell. Notebooks store metrics with ``store_metrics`` (JSON under
reports/metrics/) so that tests and later notebooks can read them back with ``read_metrics``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import DEFAULT_PRESET, REPO_ROOT, Config, parse_overrides, parse_pairs

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "surgvqa"


class NotebookFailed(RuntimeError):
    def __init__(self, notebook: str, cell: int | None, error: str):
        self.notebook, self.cell, self.error = notebook, cell, error
        where = f"cell {cell}" if cell is not None else "an unknown cell"
        super().__init__(f"notebook {notebook} failed at {where}: {error}")


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, or those named (by number '01' or stem '01-explore-data')."""
    available = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]-*.ipynb"))
    if not names:
        return available
    chosen = []
    for name in names:
        match = [p for p in available if p.stem == name or p.stem.split("-")[0] == name]
        if not match:
            raise KeyError(f"no notebook {name!r}; notebooks: {[p.stem for p in available]}")
        chosen += match
    return chosen


def default_reports_dir(preset: str) -> str:
    """Where a preset's executed notebooks go unless told: reports/ for the offline default, else reports/<preset>."""
    return "reports" if preset == DEFAULT_PRESET else f"reports/{preset}"


def metrics_path(notebook: str, reports_dir: str | Path = "reports") -> Path:
    return Config().path(str(reports_dir)) / "metrics" / f"{notebook}.json"


def store_metrics(notebook: str, metrics: dict[str, Any], reports_dir: str | Path = "reports") -> Path:
    """Merge ``metrics`` into reports/metrics/<notebook>.json (written atomically)."""
    path = metrics_path(notebook, reports_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(metrics)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def read_metrics(notebook: str, reports_dir: str | Path = "reports") -> dict[str, Any]:
    path = metrics_path(notebook, reports_dir)
    if not path.exists():
        raise FileNotFoundError(f"no metrics stored by notebook {notebook} ({path}); run it first")
    return json.loads(path.read_text())


def peak_gpu_gib() -> float | None:
    """This process's peak of allocated GPU memory so far, in GiB (None without a GPU); notebooks store it."""
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} as a metric")


def ensure_kernel() -> str:
    """A kernelspec that runs this very interpreter, so notebooks see the same environment."""
    from jupyter_client.kernelspec import KernelSpecManager
    from ipykernel.kernelspec import install

    specs = KernelSpecManager().find_kernel_specs()
    if KERNEL_NAME in specs:
        spec = json.loads((Path(specs[KERNEL_NAME]) / "kernel.json").read_text())
        if spec["argv"][0] == sys.executable:
            return KERNEL_NAME
    install(kernel_name=KERNEL_NAME, display_name="surgvqa", prefix=sys.prefix)
    return KERNEL_NAME


def notebook_parameters(name: str) -> set[str]:
    """The names of a notebook's parameters (its ``parameters`` cell)."""
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook_paths([name])[0])))


def run_workbook(names: list[str] | None = None, preset: str = DEFAULT_PRESET,
                 params: dict[str, Any] | None = None, reports_dir: str | Path = "reports",
                 html: bool = True, cell_timeout: int | None = None, log=print) -> list[Path]:
    """Execute notebooks into ``reports_dir``; raise ``NotebookFailed`` at the first failing cell.

    ``cell_timeout`` (seconds) fails a cell that runs longer, instead of waiting for it forever.
    """
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    params = dict(params or {})
    paths = notebook_paths(names)
    declared = {p.stem: set(pm.inspect_notebook(str(p))) for p in paths}
    every = set().union(*declared.values()) if declared else set()
    config_keys = set(Config.__dataclass_fields__)
    unknown = sorted(k for k in params if k not in every and k not in config_keys)
    if unknown:
        raise KeyError(f"unknown parameter(s) {unknown}: neither a notebook parameter "
                       f"({sorted(every)}) nor a config key")
    overrides = {k: v for k, v in params.items() if k not in every}
    parse_overrides([f"{k}={json.dumps(v)}" for k, v in overrides.items()])  # validate early
    out_dir = Config().path(str(reports_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel()
    written = []
    for path in paths:
        given = {"preset": preset, "overrides": overrides, "reports_dir": str(out_dir)}
        given.update({k: v for k, v in params.items() if k in declared[path.stem]})
        given = {k: v for k, v in given.items() if k in declared[path.stem]}
        target = out_dir / path.name
        start = time.time()
        log(f"[workbook] {path.stem}: running with {given}")
        try:
            with _cells_reported(path, log):
                pm.execute_notebook(str(path), str(target), parameters=given, kernel_name=kernel,
                                    cwd=str(NOTEBOOKS_DIR), progress_bar=False, execution_timeout=cell_timeout,
                                    log_output=True)
        except pm.PapermillExecutionError as e:
            raise NotebookFailed(path.stem, _source_cell_index(target, e.cell_index),
                                 f"{e.ename}: {e.evalue}") from None
        except (CellTimeoutError, DeadKernelError) as e:
            # nbclient's message quotes the cell's source, which names it when no index is known
            raise NotebookFailed(path.stem, None, f"{type(e).__name__}: {e}") from None
        if html:
            _write_html(target)
        log(f"[workbook] {path.stem}: done in {time.time() - start:.1f} s -> {target}")
        written.append(target)
    if not names:
        write_summary(out_dir, preset)
    return written


@contextlib.contextmanager
def _cells_reported(path: Path, log):
    """While papermill runs ``path``: a line when each code cell starts (its number, its first line, how long
    the one before took) and the cells' printed output, prefixed by the notebook's name (training's steps,
    the predictions' progress), through ``log``."""
    import logging

    import nbformat

    cells = nbformat.read(str(path), as_version=4).cells
    # papermill numbers the cells of the notebook it runs: ours with its injected parameters after the
    # parameters cell
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    after = tagged[0] + 1 if tagged else 0
    # papermill announces markdown cells too: only code cells are reported
    sources = ([c.source if c.cell_type == "code" else None for c in cells[:after]] + ["# injected parameters"]
               + [c.source if c.cell_type == "code" else None for c in cells[after:]])
    started = [None, None]  # (cell number, time) of the running cell

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Executing Cell "):
                number = int(message[len("Executing Cell "):].strip("-") or 0)
                source = sources[number - 1] if 0 < number <= len(sources) else ""
                if source is None:
                    return
                now = time.time()
                before = f" (cell {started[0]} took {now - started[1]:.1f} s)" if started[0] else ""
                started[:] = [number, now]
                first = next((line for line in source.splitlines() if line.strip()), "")
                log(f"[workbook] {path.stem}: cell {number}{before}: {first[:80]}")
            elif message.strip() and not message.startswith(("Ending Cell", "Input notebook", "Output notebook",
                                                               "Executing notebook")):
                for line in message.rstrip().splitlines():
                    log(f"[{path.stem}] {line}")

    logger = logging.getLogger("papermill")
    handler, level, propagate = Lines(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the lines above, not papermill's own copies on stderr
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def write_summary(reports_dir: str | Path = "reports", preset: str = DEFAULT_PRESET) -> Path:
    """``summary.json`` (every notebook's stored metrics) and ``README.md`` (the results tables) in reports/."""
    import pandas as pd

    out_dir = Config().path(str(reports_dir))
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((out_dir / "metrics").glob("*.json"))}
    (out_dir / "summary.json").write_text(json.dumps({"preset": preset, "notebooks": metrics}, indent=2) + "\n")
    lines = [f"# Results of the workbook (preset `{preset}`)", "",
             "Generated by `python -m surgvqa workbook`; the executed notebooks and their HTML copies are beside "
             "this file, figures in `figures/`, every stored metric in `summary.json`.", ""]
    evaluated = metrics.get("05-evaluate")
    if evaluated:
        first = ["blind prior", "audio-only (headline)", "text-only", "audio + text"]
        order = sorted(evaluated["baselines"], key=lambda n: (first.index(n) if n in first else len(first), n))

        table = pd.DataFrame([{
            "accuracy": _percent(row["accuracy"]), "95 % CI": f"{_percent(row['ci_low'])} - {_percent(row['ci_high'])}",
            "candidate accuracy": _percent(row["candidate_accuracy"]), "chance": _percent(row["chance"]),
            "blind prior": _percent(row["blind_prior"]),
            "ms/query": "" if not row.get("ms_per_query") else f"{row['ms_per_query']:.0f}"}
            for row in (evaluated["baselines"][name] for name in order)], index=pd.Index(order, name="baseline"))
        lines += [f"Held-out test video 002-004, n = {evaluated['n_test']}; accuracy is the strict scorer's "
                  "reading of the free-text answer, with its 95 % Wilson interval.", "", markdown_table(table), ""]
    robust = metrics.get("08-robustness")
    if robust:
        conditions = robust["conditions"]
        table = pd.DataFrame([{
            "accuracy": _percent(row["accuracy"]), "95 % CI": f"{_percent(row['ci_low'])} - {_percent(row['ci_high'])}",
            "ASR -> closest question -> text": _percent(row.get("pipeline")), "chance": _percent(row["chance"]),
            "blind prior": _percent(row["blind_prior"])} for row in conditions],
            index=pd.Index([row["condition"] for row in conditions], name="condition"))
        lines += [f"Robustness (08), audio-only unless read, n = {robust['rows_per_condition']} test rows per "
                  "condition:", "", markdown_table(table), ""]
        if robust["targets"]:
            targets = pd.DataFrame([{"target": t["target"], "accuracy": _percent(t["accuracy"]),
                                     "met": "yes" if t["met"] else "no"} for t in robust["targets"]],
                                   index=pd.Index([t["condition"] for t in robust["targets"]], name="condition"))
            lines += ["Targets:", "", markdown_table(targets), ""]
    trained = metrics.get("04-train")
    if trained:
        lines += [f"Training: {trained['steps']} steps, best eval accuracy {100 * trained['best_eval_accuracy']:.1f} % "
                  f"at step {trained['best_step']} (blind prior on the same eval rows "
                  f"{100 * trained['eval_prior_accuracy']:.1f} %), {trained['samples_per_s']:.1f} samples/s.", ""]
    readme = out_dir / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def markdown_table(table) -> str:
    """A pandas table as a pipe table (pandas' to_markdown needs tabulate, which is not a dependency): floats
    to 3 decimals, whole floats as integers, strings as they are; the index is the first column."""
    import pandas as pd

    def cell(v):
        return "" if pd.isna(v) else f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else \
            str(int(v)) if isinstance(v, float) else str(v)

    header = [table.index.name or "question_type", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(i), *map(cell, row)]) + " |" for i, row in zip(table.index, table.values)]
    return "\n".join(lines)


def _source_cell_index(executed: Path, index: int) -> int:
    """Cell index in the source notebook: papermill inserts a cell for the injected parameters."""
    import nbformat

    cells = nbformat.read(str(executed), as_version=4).cells
    injected = [i for i, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])]
    return index - 1 if injected and injected[0] < index else index


def _write_html(executed: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(executed), as_version=4))
    out = executed.with_suffix(".html")
    out.write_text(body)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa workbook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all, in order)")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reports-dir", default=None,
                        help="default: reports/ for the offline default preset, reports/<preset>/ for any other, "
                             "so that one preset's run never writes over another's")
    parser.add_argument("--no-html", action="store_true")
    parser.add_argument("--cell-timeout", type=int, default=None, help="fail a cell that runs longer (seconds)")
    args = parser.parse_args(argv)
    try:
        params = parse_pairs(args.param)
    except ValueError as e:
        parser.error(str(e))
    reports_dir = args.reports_dir or default_reports_dir(args.preset)
    try:
        run_workbook(args.names, args.preset, params, reports_dir, html=not args.no_html,
                     cell_timeout=args.cell_timeout)
    except NotebookFailed as e:
        print(f"[workbook] FAILED: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"[workbook] {e.args[0]}", file=sys.stderr)
        return 2
    return 0
