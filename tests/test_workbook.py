import json
import subprocess
import sys

import nbformat
import pytest

from surgvqa import workbook


def test_notebook_01_runs_headless_and_stores_its_metrics(tmp_path):
    small_probe = {"probe_size": 32, "probe_rows": 100, "probe_clips": 100, "gallery_size": 48}
    written = workbook.run_workbook(["01"], params=small_probe, reports_dir=tmp_path, log=lambda *_: None)
    assert written == [tmp_path / "01-explore-data.ipynb"]
    assert (tmp_path / "01-explore-data.html").stat().st_size > 10_000
    metrics = workbook.read_metrics("01-explore-data", tmp_path)
    assert metrics["n"] == {"train": 2302, "eval": 398, "test": 1000}
    assert metrics["blind_prior_accuracy"]["test"] == pytest.approx(0.573)
    assert metrics["blind_prior_accuracy"]["eval"] == pytest.approx(0.530, abs=5e-4)
    assert "tool_identification" in metrics["single_class_test_types"]
    assert (tmp_path / "figures" / "01-test-answer-balance.png").exists()


def test_notebooks_follow_the_house_rules():
    for path in workbook.notebook_paths():
        nb = nbformat.read(str(path), as_version=4)
        assert "parameters" in nb.cells[0].metadata.get("tags", []) or \
            "parameters" in nb.cells[1].metadata.get("tags", []), path
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path} has committed outputs"
                assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell.source.splitlines()), path


def notebooks_of(tmp_path, monkeypatch, name: str, *sources: str) -> None:
    """The workbook's notebooks folder replaced by one holding a notebook of a parameters cell + ``sources``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('reports_dir = "x"', metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, str(tmp_path / "nbs" / f"{name}.ipynb"))
    monkeypatch.setattr(workbook, "NOTEBOOKS_DIR", tmp_path / "nbs")


def test_a_failing_cell_names_the_notebook_and_cell(tmp_path, monkeypatch):
    notebooks_of(tmp_path, monkeypatch, "09-broken", "x = 1", "raise ValueError('broken on purpose')")
    with pytest.raises(workbook.NotebookFailed) as err:
        workbook.run_workbook(["09"], reports_dir=tmp_path / "out", log=lambda *_: None)
    assert err.value.notebook == "09-broken" and err.value.cell == 2
    assert "ValueError: broken on purpose" in str(err.value)


def test_cli_exit_codes_for_unknown_notebook_and_parameter(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "surgvqa", "workbook", *a, "--reports-dir", str(tmp_path)],
                                    capture_output=True, text=True)
    bad = run("99")
    assert bad.returncode == 2 and "no notebook '99'" in bad.stderr
    bad = run("01", "-p", "not_a_key=1")
    assert bad.returncode == 2 and "not_a_key" in bad.stderr


def test_metrics_merge_and_missing_metrics_error(tmp_path):
    workbook.store_metrics("nb", {"a": 1}, tmp_path)
    workbook.store_metrics("nb", {"b": [1, 2]}, tmp_path)
    assert json.loads((tmp_path / "metrics" / "nb.json").read_text()) == {"a": 1, "b": [1, 2]}
    with pytest.raises(FileNotFoundError, match="run it first"):
        workbook.read_metrics("other", tmp_path)


def test_a_cell_that_runs_too_long_fails_and_is_quoted(tmp_path, monkeypatch):
    notebooks_of(tmp_path, monkeypatch, "08-slow", "import time\ntime.sleep(60)")
    with pytest.raises(workbook.NotebookFailed) as err:
        workbook.run_workbook(["08"], reports_dir=tmp_path / "out", cell_timeout=3, log=lambda *_: None)
    assert err.value.notebook == "08-slow" and "CellTimeoutError" in str(err.value)
    assert "time.sleep(60)" in str(err.value)  # the failing cell is quoted



def test_each_preset_reports_into_its_own_folder_unless_told():
    assert workbook.default_reports_dir("tiny") == "reports"
    assert workbook.default_reports_dir("smoke") == "reports/smoke"
    assert workbook.default_reports_dir("qwen2vl-2b") == "reports/qwen2vl-2b"
    from surgvqa import get_config

    outputs = {get_config(p).output_dir for p in ("tiny", "smoke", "qwen2vl-2b", "qlora-2x24gb")}
    assert len(outputs) == 4  # nor does training write into another preset's run
