"""The benchmark's compiled, MasaCtrl, StyleAligned and batch-job rows run at tiny shapes on the CPU (no timing
asserts: the rows run, and the table holds them with their baselines). Compiled rows use dynamo's "eager" backend
(``IMAGEPROMPT_COMPILE_BACKEND``), so no C compiler is needed."""

from __future__ import annotations

import pytest

from imageprompt.cli.main import main

QUICK = ["plain diffusers, 2 prompts, base size", "masactrl, base size", "style aligned, 2 prompts, base size",
         "p2p replace + local blend, base size, compiled", "batch job, 64 variation rows, batch 8"]


def table_rows(out: str) -> dict[str, list[str]]:
    """Markdown table rows by name: ``[s/image, x plain, peak, x plain, note]``."""
    cells = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return {c[0].strip(): [x.strip() for x in c[1:]] for c in cells[1:]}


def run_bench(rows, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("IMAGEPROMPT_COMPILE_BACKEND", "eager")
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--tiny", "--device", "cpu", "--steps", "2", "--rows", *rows]) == 0
    finally:
        torch.set_num_threads(threads)
    return table_rows(capsys.readouterr().out)


def test_new_rows_are_listed():
    from imageprompt.bench.main import all_rows

    names = list(all_rows())
    for name in ("plain diffusers, batch 1, compiled", "imageprompt variation, batch 1, compiled",
                 "ip-adapter sd15 (imageprompt), batch 1, compiled", "masactrl, base size, compiled",
                 "masactrl + masks, base size", "ip-adapter sd15 (imageprompt), batch 8",
                 "style aligned, 2 prompts, base size, compiled", "batch job, 64 variation rows, batch 64"):
        assert name in names


def test_quick_new_rows_run_at_tiny_shapes(capsys, monkeypatch):
    table = run_bench(QUICK, capsys, monkeypatch)
    assert list(table) == QUICK
    for name in QUICK:
        assert float(table[name][0]) > 0, name
    for name in QUICK[1:4]:  # against plain diffusers' two prompts, eager, in the same run
        assert float(table[name][1]) > 0 and table[name][4].startswith("64x64"), table[name]
    assert table["p2p replace + local blend, base size, compiled"][4] == "64x64, compiled"


@pytest.mark.slow
def test_every_new_row_runs_at_tiny_shapes(capsys, monkeypatch):
    from imageprompt.bench import batch, compiled

    rows = ["plain diffusers, batch 1", *QUICK[:1], *compiled.ROWS, *batch.ROWS]
    table = run_bench(rows, capsys, monkeypatch)
    assert list(table) == rows and all(float(cells[0]) > 0 for cells in table.values())


@pytest.mark.slow
def test_cpu_time_script_runs(capsys, monkeypatch):
    from imageprompt.bench.cpu_time import main as cpu_time

    monkeypatch.setenv("IMAGEPROMPT_COMPILE_BACKEND", "eager")
    cpu_time(["--tiny", "--steps", "1", "--reps", "1", "--calls", "plain"])
    assert "plain diffusers, batch 1: eager" in capsys.readouterr().out
