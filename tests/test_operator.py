"""What operators meet first: YAML config, --print-config, --plan, status, the console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_launch
from nougat_dist.config import parse_args
from testing import fake_model
from testing.samples import write_sample_pdfs


def test_config_file_then_flags_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("input: [a.pdf]\noutput: out\nbatch-size: 8\nno-steal: true\nunit_pages: 4\n")
    cfg, _ = parse_args(["--config", str(cfg_file), "--batch-size", "3"])
    assert (cfg.batch_size, cfg.steal, cfg.unit_pages, cfg.input) == (3, False, 4, ["a.pdf"])


def test_unknown_key_names_the_closest_valid_one(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("input: a.pdf\noutput: out\nbatch_sise: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg_file)])
    assert "unknown key 'batch_sise'; did you mean 'batch-size'?" in capsys.readouterr().err


def test_print_config_round_trips(tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "--input", "x.pdf", "--output", "o",
                           "--no-markdown", "--batch-size", "5", "--print-config"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    data = yaml.safe_load(proc.stdout)
    assert data["batch-size"] == 5 and data["no-markdown"] is True
    (tmp_path / "c.yaml").write_text(proc.stdout)
    cfg, _ = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert cfg.batch_size == 5 and cfg.markdown is False


def test_plan_on_mixed_input(tmp_path):
    pdfs = write_sample_pdfs(tmp_path / "papers", n_docs=3, seed=0)  # 6 + 3 + 2 pages
    with zipfile.ZipFile(tmp_path / "books.zip", "w") as z:
        z.write(pdfs[0], "dup-of-first.pdf")  # same bytes as a loose file: a duplicate
        z.writestr("broken.pdf", b"not a pdf at all")
    (tmp_path / "papers" / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    proc = run_launch(["--input", str(tmp_path / "papers"), str(tmp_path / "books.zip"),
                       "--output", str(tmp_path / "out"), "--plan", "--unit-pages", "4",
                       "--plan-pages-per-s", "0.5"], nproc=0)
    text = proc.stdout
    assert "documents       6 input(s), 5 unique by content (1 duplicate(s))" in text
    assert "archives        1 (2 member(s))" in text
    # 11 readable pages + one error row for each of the two broken files
    assert "pages           13 in total, 0 already committed, 13 to do in 6 unit(s)" in text  # 4+2, 3, 2, and one per broken file
    assert "unreadable      2" in text and "broken.pdf" in text
    assert "estimate        0.4 min at 0.5 pages/s" in text
    assert not (tmp_path / "out" / "pages").exists() or not list((tmp_path / "out" / "pages").iterdir())


def status(out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "nougat_dist", "status", str(out), "--json"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_status_of_finished_running_and_crashed_dirs(tmp_path):
    write_sample_pdfs(tmp_path / "in", n_docs=2, seed=3)
    out = tmp_path / "out"
    run_launch(["--input", str(tmp_path / "in"), "--output", str(out),
                "--device", "cpu", "--unit-pages", "1", "--commit-pages", "1"], env=fake_model.env("delay=0"))
    s = status(out)
    assert s["state"] == "finished" and s["pages_remaining"] == 0 and s["pages_done"] == s["pages_total"]

    # Crash after part of the work: drop some committed chunks, leave a stale live file.
    chunks = sorted((out / "pages").glob("part-*.parquet"))
    for c in chunks[len(chunks) // 2:]:
        c.unlink()
    (out / "stats.json").unlink()
    live = json.loads((out / "status.json").read_text())
    live.update(state="running", updated=time.time() - 3600)
    (out / "status.json").write_text(json.dumps(live))
    s = status(out)
    assert s["state"].startswith("not updated for") and 0 < s["pages_remaining"] < s["pages_total"]

    live["updated"] = time.time()
    live["eta_s"] = 12.0
    live["pages_done"] = 1  # older than the chunks: processed is never shown below committed
    (out / "status.json").write_text(json.dumps(live))
    s = status(out)
    assert s["state"] == "running" and s["eta_s"] == 12.0
    assert s["pages_processed_live"] == s["pages_done"] > 1
    table = subprocess.run([sys.executable, "-m", "nougat_dist", "status", str(out)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "remaining" in table and "ETA" in table


def test_sigquit_prints_every_thread_stack_and_the_run_goes_on(tmp_path):
    write_sample_pdfs(tmp_path / "in", n_docs=1, seed=3)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--input", str(tmp_path / "in"),
                             "--output", str(out), "--device", "cpu", "--num-workers", "1"],
                            cwd=ROOT, env={**os.environ, **fake_model.env("delay=0.4")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "status.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGQUIT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Current thread" in err and "nougat_dist/worker.py" in err, err[-3000:]
    assert json.loads((out / "stats.json").read_text())["complete"]


def test_pip_install_editable_gives_a_console_script(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    # --no-deps: the pinned runtime set is requirements.txt's job (several GB); this proves the
    # packaging and that --help needs none of it.
    subprocess.run([str(pip), "install", "--quiet", "--no-deps", "-e", str(ROOT)],
                   check=True, capture_output=True)
    proc = subprocess.run([str(venv / "bin" / "nougat-dist"), "--help"], capture_output=True,
                          text=True, check=True)
    assert "\n  run " in proc.stdout and "\n  status " in proc.stdout, proc.stdout
    proc = subprocess.run([str(venv / "bin" / "nougat-dist"), "run", "--help"], capture_output=True,
                          text=True, check=True)
    assert "--input" in proc.stdout and "--plan" in proc.stdout


def test_live_status_counts_failures_by_status_and_rank(tmp_path):
    from types import SimpleNamespace

    from nougat_dist.store.status import write_live_status
    from nougat_dist.sched.steal import (ST_DONE_PAGES, ST_ERROR, ST_FAIL, ST_RATE_MILLI,
                                       ST_RENDER_ERROR, STATUS_LEN)
    from nougat_dist.store.status import render

    rows = [[0] * STATUS_LEN for _ in range(3)]
    rows[0][ST_DONE_PAGES], rows[0][ST_RATE_MILLI], rows[0][ST_FAIL] = 40, 2500, 2
    rows[1][ST_DONE_PAGES], rows[1][ST_RENDER_ERROR], rows[1][ST_ERROR] = 30, 1, 1
    rows[2][ST_DONE_PAGES] = 10
    plan = SimpleNamespace(total_pages=200, committed_pages=20)
    write_live_status(tmp_path, plan, rows, time.time() - 10, "running")
    live = json.loads((tmp_path / "status.json").read_text())
    assert live["pages_done"] == 100 and live["ranks_alive"] == 3
    assert live["failures_by_status"] == {"fail": 2, "render_error": 1, "error": 1}
    assert [r["failed"] for r in live["per_rank"]] == [2, 2, 0]
    table = render({"output": "out", "state": "running", "pages_done": 100, "pages_total": 200,
                    "pages_remaining": 100, "pages_failed": 4, "by_status": {}, "documents": 3,
                    "units_committed": 5, "pages_per_s": 10.0, "eta_s": 10.0,
                    "per_rank": live["per_rank"]})
    assert "failed" in table.splitlines()[-4] and table.splitlines()[-3].split() == ["0", "40", "2.5", "2"]


def test_finished_status_has_the_live_per_rank_shape(tmp_path):
    from types import SimpleNamespace

    from nougat_dist.store.status import write_final_status, write_live_status
    from nougat_dist.sched.steal import STATUS_LEN

    plan = SimpleNamespace(total_pages=10, committed_pages=0)
    write_live_status(tmp_path, plan, [[0] * STATUS_LEN], time.time() - 1, "running")
    live = json.loads((tmp_path / "status.json").read_text())
    run = {"pages_per_s": 2.0, "per_rank": [
        {"rank": 0, "host": "a", "pages": 6, "pages_per_s": 1.5, "failures": {"fail": 1, "error": 1}},
        {"rank": 1, "host": "b", "pages": 4, "pages_per_s": None, "failures": {}}]}
    write_final_status(tmp_path, plan, {"ok": 8, "fail": 1, "error": 1}, run)
    final = json.loads((tmp_path / "status.json").read_text())
    assert set(final) == set(live) and final["state"] == "finished" and final["eta_s"] == 0
    assert {tuple(sorted(r)) for r in final["per_rank"]} == {tuple(sorted(live["per_rank"][0]))}
    assert [(r["pages"], r["failed"]) for r in final["per_rank"]] == [(6, 2), (4, 0)]
    assert final["failures_by_status"] == {"fail": 1, "error": 1}
