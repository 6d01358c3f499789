"""Builds a BERT pretraining corpus (one sentence per line, a blank line between documents)
from WikiText files and from a text column of table files (unlabelled task text).

  python -m train.prepare_corpus workdirs/sst2_corpus.txt \\
      --table=../shared/data/sst2/train.tsv:sentence \\
      --wikitext=../shared/data/wikitext-2/valid.txt

WikiText is converted as train/prepare_wikitext.py does (an article per document). Table
rows have no documents; every --per_document consecutive rows make one (next-sentence
prediction then mostly learns topic, as RoBERTa's FULL-SENTENCES inputs do). Pretraining on
the task's own unlabelled text (domain-adaptive pretraining, Gururangan et al. 2020) is what
gives a small CPU-pretrained encoder a visible gain on SST-2 (bench/RESULTS.md).
"""

import argparse
import sys

from fmjax.data import glue
from train import prepare_wikitext


def group(sentences, per_document: int) -> list[list[str]]:
  """Consecutive sentences, per_document to a document (the last may be shorter)."""
  return [sentences[i:i + per_document] for i in range(0, len(sentences), per_document)]


def table_documents(spec: str, per_document: int) -> list[list[str]]:
  path, _, column = spec.rpartition(":")
  if not path:
    raise ValueError(f"--table={spec!r}: give FILE:COLUMN, e.g. train.tsv:sentence")
  fmt = glue.TableFormat(text_columns=(column,), label_column="")
  sentences = [" ".join(e.texts[0].split()) for e in glue.read_examples(path, fmt, labelled=False)]
  sentences = [s for s in sentences if s]
  return group(sentences, per_document)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("output")
  p.add_argument("--wikitext", action="append", default=[], help="a WikiText .tokens/.txt file")
  p.add_argument("--table", action="append", default=[], help="FILE:COLUMN of a TSV/CSV/JSONL")
  p.add_argument("--per_document", type=int, default=10, help="table rows per document")
  args = p.parse_args(argv)
  documents = []
  try:
    for path in args.wikitext:
      with open(path, encoding="utf-8") as f:
        documents += prepare_wikitext.convert(f)
    for spec in args.table:
      documents += table_documents(spec, args.per_document)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not documents:
    print("error: no text: give --wikitext and/or --table", file=sys.stderr)
    sys.exit(2)
  prepare_wikitext.write_documents(args.output, documents)


if __name__ == "__main__":
  main()
