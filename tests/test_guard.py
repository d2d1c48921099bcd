"""The output guard's rules as a library (the CLI-level cases are in test_hostile_inputs.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from compress.base.errors import GuardError
from compress.base.guard import JobPaths, Output, check_job_paths, data_file_inputs


def job(tmp_path: Path, **kw) -> JobPaths:
    return JobPaths(inputs=kw.pop("inputs", ()), outputs=kw.pop("outputs", ()), **kw)


def test_existing_run_folder_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = (Output(run, "dir", "--out"),)
    check_job_paths(job(tmp_path, outputs=out))                       # empty: fine
    (run / "report.json").write_text("{}")
    with pytest.raises(GuardError, match=r"--out .*already holds an earlier run \(report.json\)"):
        check_job_paths(job(tmp_path, outputs=out))
    check_job_paths(job(tmp_path, outputs=out, resume=True))
    check_job_paths(job(tmp_path, outputs=out, exist_ok=True))
    check_job_paths(job(tmp_path, outputs=out, check_existing=False))  # torchrun rank > 0
    with pytest.raises(GuardError):
        check_job_paths(job(tmp_path, outputs=out, resume_marker="manifest.json"))
    (run / "manifest.json").write_text("{}")
    check_job_paths(job(tmp_path, outputs=out, resume_marker="manifest.json"))


def test_inputs_inside_output_folder(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "w.pt").write_bytes(b"x")
    out = (Output(tmp_path / "r", "dir", "--out"),)
    with pytest.raises(GuardError, match="holds the input"):
        check_job_paths(job(tmp_path, inputs=(tmp_path / "r" / "w.pt",), outputs=out, exist_ok=True))
    check_job_paths(job(tmp_path, inputs=(tmp_path / "r" / "w.pt",), outputs=out, resume=True))


def test_output_file_inside_input_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    check_job_paths(job(tmp_path, inputs=(tmp_path / "imgs",), outputs=(Output(tmp_path / "imgs" / "new.json"),)))
    with pytest.raises(GuardError, match="inside the input folder"):
        check_job_paths(job(tmp_path, inputs=(tmp_path / "imgs",), outputs=(Output(tmp_path / "imgs" / "a.png"),)))


def test_data_file_lists_are_inputs(tmp_path):
    for name in ("train.txt", "valid.txt", "x.names"):
        (tmp_path / name).write_text("")
    data = tmp_path / "d.data"
    data.write_text("classes = 1\ntrain = train.txt\nvalid=valid.txt\nnames = x.names\nbackup = backup/\n")
    assert {p.name for p in data_file_inputs(data)} == {"train.txt", "valid.txt", "x.names"}
    with pytest.raises(GuardError, match="is an input"):
        check_job_paths(job(tmp_path, inputs=(data,), outputs=(Output(tmp_path / "valid.txt", "file", "--json"),)))


def test_file_output_equal_to_output_folder(tmp_path):
    with pytest.raises(GuardError, match="is the --out folder"):
        check_job_paths(job(tmp_path, outputs=(Output(tmp_path / "o", "dir", "--out"),
                                               Output(tmp_path / "o", "file", "--report"))))
