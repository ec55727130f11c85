"""bench/gpu.sh, the GPU suite as one budgeted command: its phases, their arguments, what it writes and when
it stops. The benchmarks are replaced by a stand-in interpreter that records each call, so the script's own
logic runs in a second; the benchmarks themselves are tested in test_bench.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs bench/*.py as a recording that writes its --json-out and prints a headline; anything else (the
# script's version probe) runs in the real interpreter.
STAND_IN = """#!/usr/bin/env bash
if [[ $1 == bench/*.py ]]; then
  echo "$*" >>"$CALLS"
  args=("$@")
  for i in "${!args[@]}"; do
    [[ ${args[$i]} == --json-out ]] && echo '{}' >"${args[$((i + 1))]}"
  done
  name=$(basename "$1" .py)
  [[ " $FAIL " == *" $name "* && " $*" != *" --random-weights"* && " $*" == *" --reps 1 "* ]] && exit 3
  echo "${name}_ms=1.5 ${name}_ratio=6"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _run(tmp_path: Path, budget: int, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.touch()
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), str(budget)],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHON": str(stand_in),
            "REAL_PYTHON": sys.executable,
            "CALLS": str(calls),
            "OUT": str(out),
            "BENCH_CACHE": str(tmp_path / "cache"),
            "BENCH_WHEELS": str(tmp_path / "no-wheels"),
            "FAIL": "",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done, calls.read_text().splitlines(), out


def _summary(out: Path) -> dict[str, dict[str, str]]:
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        name, *pairs = line.split()
        rows[name] = dict(pair.split("=", 1) for pair in pairs)
    return rows


def test_every_phase_runs_with_its_arguments_and_files(tmp_path: Path) -> None:
    done, calls, out = _run(tmp_path, 900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert [call.split()[0] for call in calls] == ["bench/generate.py", "bench/interrogate.py"] * 2 + [
        "bench/generate.py",
        "bench/memory.py",
    ] + ["bench/generate.py"] * 3
    wiring_generate, wiring_interrogate, generate, interrogate, guides, memory, upscale, *compiles = calls
    compiled, tuned = compiles
    for call in (wiring_generate, wiring_interrogate):  # smoke models, short lists, one timed run
        assert "--random-weights" not in call and "--reps 1" in call and "--labels" in call
        assert "--device cuda" in call
    assert "--random-weights" in generate and "--reps" not in generate
    assert "--random-weights" in interrogate and "--reps 3" in interrogate
    assert "--random-weights --reps 2 --keep none,layout,edges,depth,look,edges+depth --batches 8" in guides
    assert "--random-weights --keep none,layout,edges,depth,look,edges+depth --batch 8" in memory
    assert "--device cuda" in memory and "--json-out /tmp/" in memory
    assert "--reps 2 --keep none,layout:0.4 --size 1024 --batches 1 --json-out /tmp/" in upscale
    assert "--random-weights" in upscale
    assert "--compile reduce-overhead --no-fast-path-steps --batches 4,8" in compiled
    assert "--compile reduce-overhead --inductor-tuning --no-fast-path-steps --batches 4,8" in tuned

    summary = _summary(out)
    assert list(summary) == [
        "wiring-generate",
        "wiring-interrogate",
        "generate",
        "interrogate",
        "guides",
        "guides-memory",
        "upscale",
        "compile-reduce-overhead",
        "compile-reduce-overhead+tuned",
    ]
    assert all(row["rc"] == "0" for row in summary.values())
    assert summary["interrogate"]["interrogate_ms"] == "1.5" and summary["generate"]["generate_ratio"] == "6"

    # What comes back from a lent machine: at most 8 files, named as its tool allows.
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "env.txt",
        "generate-compile-reduce-overhead+tuned.json",
        "generate-compile-reduce-overhead.json",
        "generate-guides.json",
        "generate.json",
        "interrogate.json",
        "log.txt",
        "summary.txt",
    ]
    assert "torch " in (out / "env.txt").read_text()
    log = (out / "log.txt").read_text()
    assert "interrogate_ms=1.5 interrogate_ratio=6" in log and "done," in log
    # The wiring phase's short lists are the first lines of the packaged ones.
    flavors = (tmp_path / "cache" / "labels-short" / "flavors.txt").read_text().splitlines()
    assert len(flavors) == 100 and all(flavors)


def test_a_failed_wiring_check_stops_before_the_big_models(tmp_path: Path) -> None:
    done, calls, out = _run(tmp_path, 900, FAIL="generate")
    assert done.returncode == 1
    assert len(calls) == 1 and "--random-weights" not in calls[0]
    summary = _summary(out)
    assert list(summary) == ["wiring-generate"] and summary["wiring-generate"]["rc"] == "3"
    assert "stopping: the wiring check did not pass" in done.stdout


def test_a_phase_that_does_not_fit_is_skipped(tmp_path: Path) -> None:
    # 48 s: the generator's 60 % is under the 30 s a phase needs at least; interrogation's 90 % is not
    # (while the script's own start takes under 14 s).
    done, calls, out = _run(tmp_path, 48, BENCH_MODELS="smoke", BENCH_DEVICE="cpu")
    assert done.returncode == 0, done.stdout[-3000:]
    assert [call.split()[0] for call in calls] == ["bench/interrogate.py"]
    summary = _summary(out)
    assert summary["generate"]["skipped"] == "1" and summary["interrogate"]["rc"] == "0"


def test_too_small_a_budget_for_the_wiring_check_runs_nothing(tmp_path: Path) -> None:
    done, calls, out = _run(tmp_path, 100)
    assert done.returncode == 1 and calls == []
    assert list(_summary(out)) == ["wiring-generate"]


def test_the_dry_run_uses_the_smoke_models_and_compiles_nothing(tmp_path: Path) -> None:
    done, calls, out = _run(tmp_path, 900, BENCH_MODELS="smoke", BENCH_DEVICE="cpu")
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(calls) == 5
    assert all("--random-weights" not in call and "--device cpu" in call for call in calls)
    assert all("--reps 1" in call for call in calls[:3] + calls[4:])
    assert "--size 256 --batches 1" in calls[4]
    assert list(_summary(out)) == ["generate", "interrogate", "guides", "guides-memory", "upscale"]


def test_a_rerun_can_take_only_the_phases_it_names(tmp_path: Path) -> None:
    done, calls, out = _run(tmp_path, 900, BENCH_PHASES="compile", BENCH_COMPILE="reduce-overhead")
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(calls) == 1 and "--compile reduce-overhead" in calls[0] and "--random-weights" in calls[0]
    assert list(_summary(out)) == ["compile-reduce-overhead"]


def test_each_compile_run_may_name_its_own_batch_sizes(tmp_path: Path) -> None:
    done, calls, out = _run(
        tmp_path, 900, BENCH_PHASES="compile", BENCH_COMPILE="reduce-overhead@1,4,8 reduce-overhead+tuned@16"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plain, tuned = calls
    assert "--compile reduce-overhead --no-fast-path-steps --batches 1,4,8 " in plain
    assert "--inductor-tuning" not in plain
    assert "--compile reduce-overhead --inductor-tuning --no-fast-path-steps --batches 16 " in tuned
    assert list(_summary(out)) == ["compile-reduce-overhead@1,4,8", "compile-reduce-overhead+tuned@16"]
    assert sorted(p.name for p in out.glob("*.json")) == [
        "generate-compile-reduce-overhead+tuned-16.json",
        "generate-compile-reduce-overhead-1-4-8.json",
    ]
