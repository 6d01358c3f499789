"""bench/report.py: RESULTS.md's tables are what bench/results/ holds, and the renderer is right
on a hand-made file; bench/machine.py's load rule."""

import json
import re
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import machine, report  # noqa: E402


def test_committed_tables_match_their_results_files():
  proc = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


HAND_MADE = [
    "# python bench/x.py --batch 1",
    {"impl": "fmjax", "batch": 1, "tokens_per_second": 2766.6, "load_average": [0.5, 2.5],
     "machine": {"cpu": "Some CPU", "cores": 2, "versions": {"jax": "0.1", "torch": "2.0"}}},
    {"impl": "hf_torch", "batch": 1, "tokens_per_second": 1000.04},
    {"ratio": 2.7665, "batch": 1},
    "# python bench/x.py --batch 8",
    {"impl": "fmjax", "batch": 8, "tokens_per_second": 108.35, "load_average": [1.0, 1.5],
     "loaded": False, "machine": {"cpu": "Some CPU", "cores": 2, "versions": {"jax": "0.1"}}},
    {"impl": "hf_torch", "batch": 8, "tokens_per_second": 54.0},
    {"ratio": 2.00648, "batch": 8},
]

# Written by hand from HAND_MADE: half-up rounding of the file's decimals (108.35 -> 108.4),
# "—" for what a line lacks, and "loaded" where the load (2.5) exceeded the 2 cores.
EXPECTED = """\
| batch | fmjax tokens/s | HF tokens/s | ratio | machine | versions | load before / after |
|---|---|---|---|---|---|---|
| 1 | 2,767 | 1,000.0 | 2.77 | Some CPU, 2 cores | jax 0.1, torch 2.0 | 0.50 / 2.50 loaded |
| 8 | 108 | 54.0 | 2.01 | Some CPU, 2 cores | jax 0.1 | 1.00 / 1.50 |
"""


def _table():
  def rows(runs):
    return [{"run": run, "lines": run.lines} for run in runs["x.jsonl"]]
  return report.Table("x", ("x.jsonl",), rows, (
      ("batch", lambda r: str(r["run"].impl("fmjax")["batch"])),
      ("fmjax tokens/s", lambda r: report.num(r["run"].impl("fmjax")["tokens_per_second"])),
      ("HF tokens/s", lambda r: report.num(r["run"].impl("hf_torch")["tokens_per_second"], 1)),
      ("ratio", lambda r: report.num(r["run"].summary["ratio"], 2))))


def _write(tmp_path):
  with open(tmp_path / "x.jsonl", "w") as f:
    for line in HAND_MADE:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def test_hand_made_file_renders_the_hand_written_table(tmp_path):
  _write(tmp_path)
  assert report.render(_table(), str(tmp_path)) == EXPECTED
  runs = report.read_runs(str(tmp_path / "x.jsonl"))
  assert [r.command for r in runs] == ["python bench/x.py --batch 1", "python bench/x.py --batch 8"]


def test_update_rewrites_only_between_markers_and_names_the_stale_table(tmp_path):
  _write(tmp_path)
  text = ("prose before\n<!-- report:x -->\n| old | table |\n<!-- /report -->\nprose after\n")
  new, stale = report.update(text, [_table()], str(tmp_path))
  assert stale == ["x"]
  assert new == f"prose before\n<!-- report:x -->\n{EXPECTED}<!-- /report -->\nprose after\n"
  assert report.update(new, [_table()], str(tmp_path)) == (new, [])
  with pytest.raises(ValueError, match="without a table spec"):
    report.update(text.replace("report:x", "report:y"), [_table()], str(tmp_path))


def test_check_exits_1_naming_the_stale_table(tmp_path):
  with open(os.path.join(REPO, "bench", "RESULTS.md"), encoding="utf-8") as f:
    text = f.read()
  assert "| 1 (5 rounds) | 74.5 |" in text
  (tmp_path / "RESULTS.md").write_text(text.replace("| 1 (5 rounds) | 74.5 |",
                                                    "| 1 (5 rounds) | 75.5 |"))
  proc = subprocess.run([sys.executable, "bench/report.py", "--check",
                         f"--results_md={tmp_path / 'RESULTS.md'}"], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 1
  assert "report:generate_speed_gpt2" in proc.stderr and "train_speed" not in proc.stderr


def test_load_rule_repeats_a_loaded_round_then_marks_it(monkeypatch):
  loads = iter([3.0, 3.0, 0.5, 0.5])  # first attempt loaded, the second quiet
  monkeypatch.setattr(machine, "load_average", lambda: next(loads))
  monkeypatch.setattr(machine, "cores", lambda: 2)
  calls = []
  result, load = machine.measured(lambda: calls.append(1) or len(calls), retries=2)
  assert (result, load.attempts, load.loaded) == (2, 2, False)
  assert load.fields() == {"load_average": [0.5, 0.5], "loaded": False, "load_attempts": 2}

  loads = iter([1.0, 2.5] * 3)  # loaded after every attempt: kept, marked
  monkeypatch.setattr(machine, "load_average", lambda: next(loads))
  result, load = machine.measured(lambda: "r", retries=2)
  assert (result, load.attempts, load.loaded) == ("r", 3, True)
  assert machine.combine([load])["loaded"] is True


def test_machine_records_cpu_cores_versions_and_flags():
  m = machine.machine()
  assert m["cores"] == len(os.sched_getaffinity(0)) and m["cpu"]
  assert set(m) == {"cpu", "cores", "versions", "xla_flags"}
  assert "python" in m["versions"] and "jax" in m["versions"]


def test_startup_reads_the_trainers_first_step_log_line():
  """bench/startup.py times the trainer's own log line: its pattern must match the format
  string fmjax/trainer.py logs with (read from the source, so a reworded log fails here)."""
  from bench import startup
  with open(os.path.join(REPO, "fmjax", "trainer.py"), encoding="utf-8") as f:
    source = f.read()
  start = source.index('"compiled the train step')
  fmt = "".join(eval(part) for part in  # noqa: S307 -- two string literals of our own source
                re.findall(r'"[^"]*"', source[start:source.index(", _describe_shape", start)]))
  line = "I1130 19:30:01 trainer.py:363] " + fmt % ("(8, 32)", 13.04, 1)
  match = startup.FIRST_STEP.search(line)
  assert match and match.group(1) == "(8, 32)" and float(match.group(2)) == 13.0
  assert startup.FIRST_STEP.search(fmt % ("(8, 32)", 2.0, 2)) is None  # a later bucket's step


def test_startup_table_renders_the_summary_rows(tmp_path):
  host = {"cpu": "Some CPU", "cores": 2, "versions": {"jax": "0.1"}}
  rows = [{"config": "tiny", "cache": c, "round": 1, "first_step_s": s, "compile_s": k,
           "process_s": p, "load_average": [1.0, l], "loaded": l > 2, "machine": host}
          for c, s, k, p, l in (("cold", 33.21, 13.0, 43.34, 1.5), ("warm", 5.75, 1.3, 9.18, 2.5))]
  summaries = [{"config": "tiny", "cache": c, "rounds": 1, "median_first_step_s": s,
                "median_compile_s": k, "median_process_s": p, "loaded_rounds": 0}
               for c, s, k, p in (("cold", 33.21, 13.0, 43.34), ("warm", 5.75, 1.3, 9.18))]
  with open(tmp_path / "startup.jsonl", "w") as f:
    f.write("# python bench/startup.py --configs tiny\n")
    f.writelines(json.dumps(x) + "\n" for x in rows + summaries)
  table = next(t for t in report.TABLES if t.name == "startup")
  assert report.render(table, str(tmp_path)).splitlines()[2:] == [
      "| `configs/gpt.py:tiny` | cold | 1 | 33.2 | 13.0 | 43.3 | Some CPU, 2 cores | jax 0.1 "
      "| 1.00 / 1.50 |",
      "| `configs/gpt.py:tiny` | warm | 1 | 5.8 | 1.3 | 9.2 | Some CPU, 2 cores | jax 0.1 "
      "| 1.00 / 2.50 loaded |"]
