"""Regenerates the tables of bench/RESULTS.md from the raw lines in bench/results/.

  python bench/report.py            # rewrite every generated table in place
  python bench/report.py --check    # exit 1 naming each table whose text differs from its files

A generated table sits in RESULTS.md between two markers; the prose around it is left alone:

  <!-- report:generate_speed_gpt2 -->
  | batch | fmjax tokens/s | ... |
  <!-- /report -->

Each entry of TABLES below holds, for one marker, the file(s) it reads, which lines make its
rows, and its columns (a header and a function of the row). Every table ends with three
columns from the lines themselves: the machine (CPU model, cores), the versions (jax, torch,
transformers) and the 1-minute load before / after (with `loaded` when it exceeded the core
count); "—" where an older line does not record them. A number in RESULTS.md that is not in
any results file is not generated: the text says so under its table.

Files: JSON lines (`.jsonl`), one object per line; a line `# python bench/...` (the command)
or an object with a "command" key starts a new run of the file. A `.json` file is one object.
"""

import argparse
import dataclasses
import decimal
import json
import os
import re
import statistics
import sys
from typing import Any, Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(BENCH, "RESULTS.md")
RESULTS_DIR = os.path.join(BENCH, "results")
DASH = "—"
BLOCK = re.compile(r"<!-- report:([\w.-]+) -->\n(.*?)<!-- /report -->", re.S)


# Reading the files --------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """The lines of one run of a results file (they follow one command line, if any).

  Attributes:
    command: the command that produced them ("" when the file does not say).
    header: the object that opened the run ({"command": ..., "machine": ...}) or {}.
    lines: the JSON objects in file order.
  """
  command: str = ""
  header: dict = dataclasses.field(default_factory=dict)
  lines: list = dataclasses.field(default_factory=list)

  def impl(self, name: str) -> dict:
    """The run's line for implementation `name` (its "impl" field).

    Args:
      name: e.g. "fmjax", "hf_torch".

    Returns:
      the line; KeyError naming the run's command when there is none.
    """
    for line in self.lines:
      if line.get("impl") == name:
        return line
    raise KeyError(f"no line with impl={name!r} in the run of {self.command or '(no command)'}")

  @property
  def summary(self) -> dict:
    """The run's last line without an "impl" (the ratio / summary line), or {}."""
    rest = [line for line in self.lines if "impl" not in line]
    return rest[-1] if rest else {}


def read_runs(path: str) -> list[Run]:
  """A results file as its runs.

  Args:
    path: a .jsonl file (command lines start runs) or a .json file (one object).

  Returns:
    the runs in file order.
  """
  with open(path, encoding="utf-8") as f:
    if path.endswith(".json"):
      return [Run(lines=[json.load(f)])]
    runs = [Run()]
    for number, text in enumerate(f, 1):
      text = text.strip()
      if not text:
        continue
      if text.startswith("#"):
        runs.append(Run(command=text.lstrip("# ").strip()))
        continue
      try:
        line = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
      if isinstance(line.get("command"), str) and "impl" not in line:  # a run's header
        runs.append(Run(command=line["command"], header=line))
      else:
        runs[-1].lines.append(line)
  return [run for run in runs if run.lines or run.header]


# Formatting ---------------------------------------------------------------------------------------

def num(x, digits: int = 0, comma: bool = True) -> str:
  """`x` rounded to `digits` decimals, thousands separated; "—" for None.

  Args:
    x: a number or None.
    digits: decimals.
    comma: thousands separators.

  Returns:
    e.g. num(2766.6) == "2,767", num(0.896, 2) == "0.90".
  """
  if x is None:
    return DASH
  # Half up from the decimal text the file holds (108.35 -> 108.4), as a reader rounds it.
  rounded = decimal.Decimal(repr(x)).quantize(decimal.Decimal(1).scaleb(-digits),
                                              decimal.ROUND_HALF_UP)
  return f"{rounded:{',' if comma else ''}.{digits}f}"


def pct(x, digits: int = 0) -> str:
  """A share as a percentage: pct(0.929) == "93%"."""
  return DASH if x is None else f"{100 * x:.{digits}f}%"


def _machine_of(line: dict) -> dict:
  m = line.get("machine")
  if isinstance(m, dict):
    return m
  return {k: line[k] for k in ("cpu", "cores", "versions") if k in line}


def provenance(lines: list[dict]) -> list[str]:
  """The machine, versions and load cells of a row made of `lines`.

  Args:
    lines: the JSON objects the row was read from (run headers included).

  Returns:
    [machine, versions, load], each "—" when no line records it.
  """
  machines, versions, loads = [], [], []
  cores = next((_machine_of(x)["cores"] for x in lines if "cores" in _machine_of(x)), None)
  for line in lines:
    m = _machine_of(line)
    if "cpu" in m:
      text = f"{m['cpu']}, {m['cores']} cores" if "cores" in m else m["cpu"]
      machines.append(text)
    v = dict(m.get("versions") or {})
    if v:
      versions.append(", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch", "transformers")
                                if k in v))
    if "load_average" in line:
      before, after = line["load_average"]
      loaded = line.get("loaded", cores is not None and max(before, after) > cores)
      loads.append(f"{before:.2f} / {after:.2f}" + (" loaded" if loaded else ""))
  unique = lambda xs: "; ".join(dict.fromkeys(xs)) or DASH
  return [unique(machines), unique(versions), unique(loads)]


# Tables -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Table:
  """One generated table of RESULTS.md.

  Attributes:
    name: its marker, `<!-- report:NAME -->`.
    files: the results files it reads, relative to bench/results/.
    rows: (runs by file) -> the rows, each a dict the columns read; a row's "lines" (the JSON
      objects it came from) give its machine / versions / load columns.
    columns: (header, row -> cell text) pairs.
    provenance: append the machine, versions and load columns.
    optional: RESULTS.md may leave it out (a table whose measurements are still to be made;
      adding its markers to the text is enough to have it generated).
  """
  name: str
  files: tuple[str, ...]
  rows: Callable[[dict[str, list[Run]]], list[dict]]
  columns: tuple[tuple[str, Callable[[dict], str]], ...]
  provenance: bool = True
  optional: bool = False


def render(table: Table, results_dir: str = RESULTS_DIR) -> str:
  """The markdown of `table` from the files under `results_dir`.

  Args:
    table: the table's spec.
    results_dir: where its files are.

  Returns:
    the table's lines, each ending in a newline.
  """
  runs = {name: read_runs(os.path.join(results_dir, name)) for name in table.files}
  headers = [h for h, _ in table.columns]
  if table.provenance:
    headers += ["machine", "versions", "load before / after"]
  out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in table.rows(runs):
    cells = [fn(row) for _, fn in table.columns]
    if table.provenance:
      cells += provenance(row.get("lines", []))
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def update(text: str, tables, results_dir: str = RESULTS_DIR) -> tuple[str, list[str]]:
  """`text` with every marked table regenerated.

  Args:
    text: RESULTS.md's text.
    tables: the Table specs (every marker in text needs one, and every spec a marker).
    results_dir: where the files are.

  Returns:
    (the new text, the names of the tables whose text changed).
  """
  by_name = {t.name: t for t in tables}
  found = BLOCK.findall(text)
  unknown = [name for name, _ in found if name not in by_name]
  missing = sorted({t.name for t in tables if not t.optional} - {name for name, _ in found})
  if unknown or missing:
    raise ValueError(f"markers without a table spec: {unknown}; table specs without a marker "
                     f"in the text: {missing}")
  stale = []

  def replace(match):
    name, old = match.group(1), match.group(2)
    new = render(by_name[name], results_dir)
    if new != old:
      stale.append(name)
    return f"<!-- report:{name} -->\n{new}<!-- /report -->"
  return BLOCK.sub(replace, text), stale


# The tables of RESULTS.md -------------------------------------------------------------------------

def _impls(file: str, names: list[str], run_index: int = -1) -> Callable:
  """Rows: the lines of implementations `names` in one run of `file`."""
  def rows(runs):
    run = runs[file][run_index]
    return [{"line": run.impl(n), "lines": [run.header, run.impl(n)]} for n in names]
  return rows


def _shakespeare_rows(runs):
  """Both implementations; the lower val loss (computed, not asserted) in bold."""
  run = runs["shakespeare_quality.jsonl"][-1]
  lines = [run.impl("fmjax"), run.impl("hf_torch")]
  best = min(x["val_loss"] for x in lines)
  return [{"line": x, "lowest": x["val_loss"] == best, "lines": [x]} for x in lines]


TRAIN_SPEED = {  # model -> (command's description, target)
    "gpt_small": ("(4×256, vocab 8192, 16×256)", "≥ 1.3"),
    "gpt_base": ("(gpt2_small, 4×256)", "≥ 1.15"),
    "bert_small": ("(4×256, 16×128)", "≥ 1.3"),
    "bert_base": ("(bert-base, 8×128)", "≥ 1.15"),
}


def _target(ratio: float, target: str) -> str:
  met = ratio >= float(target.split()[-1])
  return f"{target} (met)" if met else f"{target} — **not met**"


def _train_speed_rows(runs):
  by_model = {run.summary["model"]: run for run in runs["train_speed.jsonl"]}
  return [{"model": m, "run": by_model[m], "lines": by_model[m].lines} for m in TRAIN_SPEED]


def _generate_rows(runs):
  rows = []
  for file in ("generate_speed_b1.jsonl", "generate_speed_b1_9rounds.jsonl",
               "generate_speed_b8.jsonl"):
    run = runs[file][-1]
    rows.append({"run": run, "lines": run.lines})
  return rows


GENERATE_TARGETS = {1: "≥ 2", 8: "≥ 1.5"}


def _long_context_rows(runs):
  lines = runs["long_context.jsonl"][-1].lines
  by = {(x["impl"], x["seq_len"]): x for x in lines}
  lengths = sorted({x["seq_len"] for x in lines})
  return [{"seq_len": n, "chunked": by.get(("fmjax-chunked", n)), "xla": by.get(("fmjax-xla", n)),
           "lines": [by[k] for k in by if k[1] == n]} for n in lengths]


def _seconds(x: float) -> str:
  return f"{x:.2g}" if x < 10 else f"{x:.1f}"


def _long_cell(line, what: str) -> str:
  if line is None:
    return DASH
  if "skipped" in line:
    return "skipped: " + line["skipped"] if what == "s" else DASH
  if "failed" in line:
    return "failed: " + line["failed"] if what == "s" else DASH
  return _seconds(line["step_seconds"]) if what == "s" else f"{line['peak_rss_gb']:.2f} GiB"


TRANSLATE_STEPS = (500, 1000, 1500, 2000, 2500, 2800)


def _translate_rows(runs):
  metrics = runs["translate_multi30k.jsonl"][-1].lines
  final = runs["translate_multi30k_eval_results.json"][0].lines[0]
  bleu = {x["step"]: x["eval/bleu"] for x in metrics if "eval/bleu" in x}
  test = final["test/bleu_detail"]
  detail = "/".join(f"{test[f'precision_{i}']:.1f}" for i in range(1, 5))
  return [
      {"split": "val (greedy, during training)",
       "decoding": "steps " + " / ".join(num(s) for s in TRANSLATE_STEPS),
       "bleu": " / ".join(num(bleu[s], 2) for s in TRANSLATE_STEPS)},
      {"split": "val", "decoding": f"beam {final['num_beams']}",
       "bleu": num(final["eval/bleu"], 2)},
      {"split": "**test_2016_flickr**", "decoding": f"beam {final['num_beams']}",
       "bleu": f"**{num(final['test/bleu'], 2)}** ({detail}, BP {test['brevity_penalty']:.3f})"},
  ]


CAPTION_STEPS = (300, 600, 900, 1200)


def _caption_rows(runs):
  by_step = {x["step"]: x for x in runs["caption_shapes.jsonl"][-1].lines}
  last = CAPTION_STEPS[-1]
  cell = lambda key, digits: lambda s: (
      f"**{by_step[s][key]:.{digits}f}**" if s == last and key == "eval/accuracy"
      else f"{by_step[s][key]:.{digits}f}")
  return [{"label": "eval/accuracy (next caption token, teacher forced, 512 held-out scenes)",
           "cell": cell("eval/accuracy", 3)},
          {"label": "eval/exact_match (greedy caption == reference)",
           "cell": cell("eval/exact_match", 2)}]


def _finetune_columns():
  line = lambda r: r["line"]
  evals = lambda r: " / ".join(f"{a:.3f}" for _, a, _ in line(r)["evals"])
  hit = lambda r: (f"{num(line(r)['time_to_target_s'])} s (step {line(r)['target_step']}, "
                   f"accuracy ≥ {line(r)['target_accuracy']:.3f})"
                   if line(r)["time_to_target_s"] is not None else "not reached")
  steps = lambda r: "/".join(str(s) for s, _, _ in line(r)["evals"])
  return (("impl", lambda r: {"fmjax": "fmjax", "hf_torch": "transformers"}[line(r)["impl"]]),
          ("wall s", lambda r: num(line(r)["wall_s"], 1)),
          ("train s", lambda r: num(line(r)["train_s"], 1)),
          ("padded tokens", lambda r: num(line(r)["padded_tokens"])),
          ("padded tokens/s", lambda r: num(line(r)["padded_tokens_per_second"])),
          ("real tokens/s", lambda r: num(line(r)["tokens_per_second"])),
          ("accuracy at steps", lambda r: f"{evals(r)} ({steps(r)})"),
          ("time to target", hit))


def _smollm2_rows(runs):
  rows = []
  for file in ("generate_speed_smollm2_b1_quiet.jsonl", "generate_speed_smollm2_b8_quiet.jsonl"):
    run = runs[file][-1]
    rows.append({"run": run, "lines": run.lines})
  return rows


def _valid(summary: dict, fmjax: dict) -> str:
  if summary.get("valid"):
    return "yes"
  cores = _machine_of(fmjax).get("cores", DASH)
  return f"no (load {summary['max_load_average']:.2f} > {cores})"


def _sft_rows(runs):
  run = runs["sft_smollm2.jsonl"][-1]
  base = run.impl("fmjax_base")
  out = []
  for name, label in (("fmjax_base", "base (SmolLM2-135M-Instruct)"),
                      ("fmjax_lora", "LoRA rank {lora_rank}, q/k/v/o, lr {lr}"),
                      ("fmjax_full", "full finetuning, lr {lr}")):
    line = run.impl(name)
    mantissa, exponent = f"{line['learning_rate']:.0e}".split("e")
    out.append({"label": label.format(lora_rank=line["lora_rank"],
                                      lr=f"{mantissa}e{int(exponent)}"), "line": line, "base": base,
                "lines": [run.header, line]})
  return out


def _sft_trainable(r) -> str:
  line = r["line"]
  if line["impl"] == "fmjax_base":
    return DASH
  share = line["trainable_params"] / line["total_params"]
  text = num(line["trainable_params"])
  return text if share == 1 else f"{text} (**{pct(share, 2)}**)"


def _sft_loss(r) -> str:
  line, base = r["line"], r["base"]
  if line is base:
    return num(line["eval_loss"], 3)
  cut = f"{num(line['eval_loss'], 3)} (−{pct(1 - line['eval_loss'] / base['eval_loss'])})"
  return f"**{cut}**" if line["impl"] == "fmjax_lora" else cut


def _startup_rows(runs):
  """One row per (config, cache) of the last run: its summary line, its measurements."""
  run = runs["startup.jsonl"][-1]
  measured = [x for x in run.lines if "first_step_s" in x]
  return [{"line": x, "lines": [m for m in measured
                                if (m["config"], m["cache"]) == (x["config"], x["cache"])]}
          for x in run.lines if "median_first_step_s" in x]


def _t2i_rows(runs):
  """One row per measurement of the last run of the digits bench."""
  return [{"line": x, "lines": [x]} for x in runs["text_to_image_digits.jsonl"][-1].lines]


def _t2i_result(line: dict) -> str:
  what = line["what"]
  if what == "train end to end":
    return f"{num(line['wall_s'] / 60, 1)} min (target {num(line['target_s'] / 60)} min)"
  if what == "image tokenizer":
    return (f"held-out PSNR {num(line['eval/psnr'], 1)} dB, "
            f"{pct(line['eval/usage'])} of the codes used in a batch, "
            f"perplexity {num(line['eval/perplexity'])} (step {num(line['step'])})")
  if what == "generated digits":
    return (f"**{num(line['prompted_digit_share'], 3)}** read as the prompted digit (target "
            f"{line['target']}; {line['prompts']} unseen prompts x {line['samples_per_prompt']}, "
            f"guidance {line['guidance']}, per digit "
            f"{min(line['per_digit'].values()):.2f}-{max(line['per_digit'].values()):.2f}); "
            f"same-prompt spread {num(line['same_prompt_spread_vs_real'], 2)} of real "
            f"digits', {pct(line['distinct_share'])} distinct; classifier "
            f"{num(line['classifier_heldout_accuracy'], 4)} on held-out MNIST")
  if what == "zero-shot MNIST":
    return (f"zero-shot accuracy {num(line['eval/zero_shot_accuracy'], 4)} on 2,000 held-out "
            f"digits (step {num(line['step'])})")
  return DASH


TABLES = (
    Table("train_speed", ("train_speed.jsonl",), _train_speed_rows, (
        ("command", lambda r: f"`{r['run'].command.split('train_speed.py ')[-1]}` "
                              f"{TRAIN_SPEED[r['model']][0]}"),
        ("fmjax tokens/s", lambda r: num(r["run"].impl("fmjax")["tokens_per_second"])),
        ("HF torch tokens/s", lambda r: num(r["run"].impl("hf_torch")["tokens_per_second"])),
        ("ratio", lambda r: num(r["run"].summary["ratio"], 2)),
        ("target", lambda r: _target(r["run"].summary["ratio"], TRAIN_SPEED[r["model"]][1])))),
    Table("shakespeare_quality", ("shakespeare_quality.jsonl",), _shakespeare_rows, (
              ("impl", lambda r: {"fmjax": "fmjax (2 host devices)",
                                  "hf_torch": "HF GPT2LMHeadModel"}[r["line"]["impl"]]),
              ("val loss", lambda r: (f"**{num(r['line']['val_loss'], 3)}**" if r["lowest"]
                                      else num(r["line"]["val_loss"], 3))),
              ("steps", lambda r: num(r["line"]["steps"])),
              ("train seconds", lambda r: num(r["line"]["train_seconds"], 1)),
              ("tokens/s", lambda r: num(r["line"]["tokens_per_second"])))),
    Table("generate_speed_gpt2",
          ("generate_speed_b1.jsonl", "generate_speed_b1_9rounds.jsonl", "generate_speed_b8.jsonl"),
          _generate_rows, (
              ("batch", lambda r: f"{r['run'].impl('fmjax')['batch']} "
                                  f"({r['run'].impl('fmjax')['rounds']} rounds)"),
              ("fmjax tokens/s", lambda r: num(r["run"].impl("fmjax")["tokens_per_second"], 1)),
              ("HF PyTorch tokens/s",
               lambda r: num(r["run"].impl("hf_torch")["tokens_per_second"], 1)),
              ("ratio", lambda r: f"**{num(r['run'].summary['ratio'], 2)}**"),
              ("target", lambda r: _target(r["run"].summary["ratio"],
                                           GENERATE_TARGETS[r["run"].summary["batch"]])))),
    Table("long_context", ("long_context.jsonl",), _long_context_rows, (
        ("seq_len", lambda r: num(r["seq_len"])),
        ("chunked: s/step", lambda r: _long_cell(r["chunked"], "s")),
        ("chunked: peak RSS", lambda r: _long_cell(r["chunked"], "rss")),
        ("xla: s/step", lambda r: _long_cell(r["xla"], "s")),
        ("xla: peak RSS", lambda r: _long_cell(r["xla"], "rss")))),
    Table("translate_multi30k",
          ("translate_multi30k.jsonl", "translate_multi30k_eval_results.json"),
          _translate_rows, (
              ("split", lambda r: r["split"]),
              ("decoding", lambda r: r["decoding"]),
              ("BLEU (sacrebleu default: 13a, exp smoothing, cased)", lambda r: r["bleu"]))),
    Table("caption_shapes", ("caption_shapes.jsonl",), _caption_rows, (
        ("step", lambda r: r["label"]),
        *((num(s), (lambda s: lambda r: r["cell"](s))(s)) for s in CAPTION_STEPS))),
    Table("finetune_speed_one_device", ("finetune_speed.jsonl",),
          _impls("finetune_speed.jsonl", ["fmjax", "hf_torch"], run_index=1), _finetune_columns()),
    Table("finetune_speed_two_devices", ("finetune_speed.jsonl",),
          _impls("finetune_speed.jsonl", ["fmjax", "hf_torch"], run_index=0), _finetune_columns()),
    Table("generate_speed_smollm2",
          ("generate_speed_smollm2_b1_quiet.jsonl", "generate_speed_smollm2_b8_quiet.jsonl"),
          _smollm2_rows, (
              ("batch", lambda r: str(r["run"].impl("fmjax")["batch"])),
              ("fmjax tokens/s", lambda r: (
                  f"{num(r['run'].impl('fmjax')['tokens_per_second'], 1)} "
                  f"({num(statistics.median(r['run'].impl('fmjax')['seconds_per_call']), 2)} s per "
                  f"call)")),
              ("transformers `generate` tokens/s",
               lambda r: num(r["run"].impl("hf_torch")["tokens_per_second"], 1)),
              ("ratio", lambda r: f"**{num(r['run'].summary['ratio'], 2)}x**"),
              ("valid", lambda r: _valid(r["run"].summary, r["run"].impl("fmjax"))))),
    Table("sft_smollm2", ("sft_smollm2.jsonl",), _sft_rows, (
        ("run", lambda r: r["label"]),
        ("trainable params", _sft_trainable),
        ("held-out response loss", _sft_loss),
        ("answers in the taught format", lambda r: pct(r["line"]["format_ok"])),
        ("sentiment right", lambda r: pct(r["line"]["sentiment_accuracy"])),
        ("s/step", lambda r: num(r["line"]["seconds_per_step"], 1)),
        ("peak RSS", lambda r: f"{r['line']['peak_rss_gb']:.2f} GB"))),
    Table("text_to_image_digits", ("text_to_image_digits.jsonl",), _t2i_rows, (
        ("measured", lambda r: f"{r['line']['model']}: {r['line']['what']}"),
        ("result", lambda r: _t2i_result(r["line"]))), optional=True),
    Table("startup", ("startup.jsonl",), _startup_rows, (
        ("program", lambda r: f"`configs/gpt.py:{r['line']['config']}`"),
        ("compilation cache", lambda r: r["line"]["cache"]),
        ("rounds", lambda r: str(r["line"]["rounds"])),
        ("launch to first step, s (median)", lambda r: num(r["line"]["median_first_step_s"], 1)),
        ("of which compiling the step, s", lambda r: num(r["line"]["median_compile_s"], 1)),
        ("whole process, s", lambda r: num(r["line"]["median_process_s"], 1))),
          optional=True),
)


def main(argv=None) -> int:
  """Rewrites (or with --check, checks) the generated tables of RESULTS.md.

  Args:
    argv: command-line arguments (default sys.argv[1:]).

  Returns:
    the exit status: 0, or 1 when --check found stale tables.
  """
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true", help="exit 1 if any table is stale")
  p.add_argument("--results_md", default=RESULTS_MD, help=argparse.SUPPRESS)
  p.add_argument("--results_dir", default=RESULTS_DIR, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  with open(args.results_md, encoding="utf-8") as f:
    text = f.read()
  new, stale = update(text, TABLES, args.results_dir)
  if args.check:
    for name in stale:
      print(f"stale: the table <!-- report:{name} --> in {args.results_md} differs from its "
            f"results files; run python bench/report.py", file=sys.stderr)
    return 1 if stale else 0
  if new != text:
    with open(args.results_md, "w", encoding="utf-8") as f:
      f.write(new)
  print(f"{len(TABLES)} tables; rewritten: {', '.join(stale) or 'none'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
