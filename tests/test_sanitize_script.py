"""benchmarks/sanitize.py on a CPU machine: its workload runs (with the CPU kernels), and its verdicts
read compute-sanitizer's summaries right (a stand-in compute-sanitizer prints canned reports)."""

import os
import stat
import sys

import pytest

import baichuan_kernels as bk

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import sanitize  # noqa: E402

pytestmark = pytest.mark.skipif(not bk.build_info()["extension"], reason="needs the compiled extension")


def test_workload_runs_every_case_on_the_cpu_kernels(capsys):
    assert sanitize.main(["--workload", "--device", "cpu", "--backends", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    runs = int(out.split("workload: ")[1].split(" runs")[0])
    assert runs == len([ln for ln in out.splitlines() if ln.startswith("  ok ")]) and runs >= 60


REPORTS = {  # what the stand-in prints for --tool memcheck / racecheck, and its exit code
    "clean": ("workload: 69 runs, 0 failures\n========= ERROR SUMMARY: 0 errors", 0,
              "workload: 69 runs, 0 failures\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", 0),
    "unclean": ("========= Invalid __global__ read of size 16 bytes\nworkload: 69 runs, 0 failures\n"
                "========= ERROR SUMMARY: 3 errors", 99,
                "workload: 69 runs, 0 failures\n========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)", 99),
    "wrong": ("workload: 69 runs, 2 failures\n========= ERROR SUMMARY: 0 errors", 1,
              "workload: 69 runs, 2 failures\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", 1),
    "nothing": ("workload: 0 runs, 0 failures\n========= ERROR SUMMARY: 0 errors", 1,
                "workload: 0 runs, 0 failures\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", 1),
}


@pytest.mark.parametrize("case,want", [("clean", ("clean", "clean")),
                                       ("unclean", ("UNCLEAN (3 errors)", "UNCLEAN (2 errors)")),
                                       ("wrong", ("WRONG (2 results)", "WRONG (2 results)")),
                                       ("nothing", ("error (no kernel ran)", "error (no kernel ran)"))])
def test_verdicts(case, want, tmp_path, monkeypatch, capsys):
    mem, mem_rc, race, race_rc = REPORTS[case]
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!/bin/sh\ncase \"$*\" in\n"
                    f"  *memcheck*) printf '%s\\n' '{mem}'; exit {mem_rc};;\n"
                    f"  *racecheck*) printf '%s\\n' '{race}'; exit {race_rc};;\nesac\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "sanitize.log"
    rc = sanitize.main(["--tools", "memcheck,racecheck", "--timeout", "60", "--log", str(log)])
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert want[0] in lines["memcheck"] and want[1] in lines["racecheck"], out
    assert rc == (0 if case == "clean" else 1)
    assert "===== verdict" in log.read_text()
