"""Converts WikiText (tokenized `wiki.*.tokens` files) into BERT's pretraining input format.

  python -m train.prepare_wikitext ../shared/data/wikitext-2/valid.txt workdirs/wikitext2_sentences.txt

BERT's create_pretraining_data.py wants one sentence per line and a blank line between
documents. WikiText has one paragraph per line, ` = Title = ` lines starting articles and
` = = Heading = = ` lines inside them. This step: a new document at each title; headings
and empty lines dropped; `@-@`, `@,@`, `@.@` joined back into `-`, `,`, `.`; paragraphs split
into sentences after the tokens `.`, `?` and `!` (WikiText already separates punctuation).
"""

import re
import sys

TITLE = re.compile(r"^ = [^=].* = $")
HEADING = re.compile(r"^ (= )+.* (= )+$")
SENTENCE_END = re.compile(r"(?<= [.?!]) ")


def convert(lines):
  """WikiText lines -> list of documents, each a list of sentences."""
  documents, current = [], []
  for line in lines:
    line = line.rstrip("\n")
    if TITLE.match(line):
      if current:
        documents.append(current)
      current = []
      continue
    if not line.strip() or HEADING.match(line):
      continue
    text = " " + line.strip().replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    current += [s.strip() for s in SENTENCE_END.split(text) if s.strip()]
  if current:
    documents.append(current)
  return documents


def write_documents(path: str, documents) -> None:
  """BERT's input format: one sentence per line, a blank line between documents."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n\n".join("\n".join(doc) for doc in documents) + "\n")
  print(f"{path}: {len(documents)} documents, {sum(map(len, documents))} sentences")


def main(argv):
  if len(argv) != 3:
    print(__doc__, file=sys.stderr)
    sys.exit(2)
  with open(argv[1], encoding="utf-8") as f:
    documents = convert(f)
  write_documents(argv[2], documents)


if __name__ == "__main__":
  main(sys.argv)
