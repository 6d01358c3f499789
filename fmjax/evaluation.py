"""Task metrics computed on the host from predictions: GLUE's and SQuAD v1.1's.

  accuracy, f1 (binary, of the positive class), matthews_corrcoef (CoLA), pearson and
  spearman (STS-B), and SQuAD v1.1's exact match and F1 over answer strings.

corpus_bleu is sacrebleu's default BLEU (Papineni et al. 2002; Post 2018): 13a tokenization,
n-grams up to 4, clipped counts summed over the corpus, the brevity penalty with the closest
reference length, and "exp" smoothing of zero n-gram matches; a percentage.

The SQuAD functions follow the official v1.1 evaluation script: answers are compared after
lower-casing and removing punctuation, the articles a/an/the and extra whitespace; a
prediction scores the maximum over its ground-truth answers; EM and F1 are percentages.
"""

import collections
import math
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np


def accuracy(predictions, labels) -> float:
  """The fraction of predictions equal to their label.

  Args:
    predictions: (B,) predicted class ids (any array-like).
    labels: (B,) true class ids.

  Returns:
    The accuracy in [0, 1] (NaN for B == 0).
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  return float(np.mean(predictions == labels))


def f1(predictions, labels, positive: int = 1) -> float:
  """F1 of the `positive` class (GLUE's MRPC/QQP F1); 0 when it is never predicted or present.

  Args:
    predictions: (B,) predicted class ids.
    labels: (B,) true class ids.
    positive: the class whose F1 is computed.

  Returns:
    2 * true positives / (predicted positives + actual positives), in [0, 1].
  """
  p, y = np.asarray(predictions) == positive, np.asarray(labels) == positive
  tp = float(np.sum(p & y))
  denominator = float(np.sum(p) + np.sum(y))
  return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation for any number of classes (Gorodkin's R_K); 0 when undefined.

  Args:
    predictions: (B,) predicted class ids.
    labels: (B,) true class ids.

  Returns:
    The correlation in [-1, 1] (GLUE's CoLA metric); 0 when all predictions or all labels
    are one class.
  """
  p, y = np.asarray(predictions), np.asarray(labels)
  classes = np.union1d(p, y)
  # confusion[i, j]: how often class i was predicted where class j was true
  confusion = (p[:, None] == classes).T.astype(np.float64) @ (y[:, None] == classes)
  n = confusion.sum()
  correct = np.trace(confusion)
  predicted, true = confusion.sum(1), confusion.sum(0)
  cov_py = correct * n - predicted @ true
  cov_pp = n * n - predicted @ predicted
  cov_yy = n * n - true @ true
  if cov_pp == 0 or cov_yy == 0:
    return 0.0
  return float(cov_py / np.sqrt(cov_pp * cov_yy))


def pearson(predictions, labels) -> float:
  """Pearson's correlation coefficient (STS-B), computed in float64.

  Args:
    predictions: (B,) predicted scores.
    labels: (B,) true scores.

  Returns:
    The correlation in [-1, 1]; 0 when either side is constant.
  """
  x = np.asarray(predictions, np.float64)
  y = np.asarray(labels, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt((x * x).sum() * (y * y).sum())
  return float((x * y).sum() / denominator) if denominator else 0.0


def _ranks(x) -> np.ndarray:
  """Ranks from 1, ties sharing their average rank (as scipy.stats.rankdata)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  sorted_x = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def spearman(predictions, labels) -> float:
  """Spearman's rank correlation: Pearson's of the (tie-averaged) ranks.

  Args:
    predictions: (B,) predicted scores.
    labels: (B,) true scores.

  Returns:
    The rank correlation in [-1, 1]; 0 when either side is constant.
  """
  return pearson(_ranks(predictions), _ranks(labels))


# SQuAD v1.1 ----------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
  """Lower case, drop punctuation, the articles a/an/the and extra whitespace (official v1.1).

  Args:
    text: an answer string.

  Returns:
    The normalised string, words joined by single spaces.
  """
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
  """Token-overlap F1 of one prediction against one ground-truth answer (official v1.1).

  Args:
    prediction: the predicted answer text.
    truth: a ground-truth answer text.

  Returns:
    F1 in [0, 1] over the words of the normalised strings (`normalize_answer`).
  """
  pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, truth: str) -> float:
  """Whether a prediction equals a ground-truth answer after `normalize_answer`.

  Args:
    prediction: the predicted answer text.
    truth: a ground-truth answer text.

  Returns:
    1.0 or 0.0.
  """
  return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_scores(predictions: Mapping[str, str],
                 answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
  """Official SQuAD v1.1 scores in percent over every question of `answers`.

  Args:
    predictions: question id -> predicted answer text. A question without one scores 0.
    answers: question id -> its ground-truth answer texts.
  Returns:
    {"exact_match": ..., "f1": ...}, each in [0, 100].
  """
  em = f1_total = 0.0
  for qid, truths in answers.items():
    if qid not in predictions:
      continue
    em += max(squad_exact_match(predictions[qid], t) for t in truths)
    f1_total += max(squad_f1(predictions[qid], t) for t in truths)
  n = max(len(answers), 1)
  return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1_total / n}


# Translation ---------------------------------------------------------------------------------

_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless after a digit
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless before a digit
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]  # a dash after a digit


def tokenize_13a(line: str) -> str:
  """mteval-v13a's tokenization, as sacrebleu's default tokenizer ("13a") does it.

  Args:
    line: one detokenized segment.

  Returns:
    The segment with punctuation split off, tokens separated by single spaces.
  """
  line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
  if "&" in line:
    line = (line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
            .replace("&gt;", ">"))
  line = f" {line} "
  for pattern, replacement in _13A:
    line = pattern.sub(replacement, line)
  return " ".join(line.split())


def _ngrams(words: list[str], max_order: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for n in range(1, max_order + 1)
                             for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
                max_order: int = 4) -> dict[str, float]:
  """Corpus BLEU equal to `sacrebleu.corpus_bleu(hypotheses, [references]).score`.

  Args:
    hypotheses: one detokenized output per segment.
    references: one reference per segment, or per segment a list of references.
    max_order: the longest n-gram counted.

  Returns:
    {"bleu": percent, "brevity_penalty", "precision_1".."precision_<max_order>" (percent),
     "hyp_len", "ref_len"}, all floats.

  Raises:
    ValueError: a different number of hypotheses and references.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; "
                     "give one (or a list of) reference(s) per hypothesis")
  correct, total = [0] * max_order, [0] * max_order
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    refs = [refs] if isinstance(refs, str) else list(refs)
    words = tokenize_13a(hyp).split()
    ref_words = [tokenize_13a(r).split() for r in refs]
    hyp_len += len(words)
    # The closest reference length, the shorter one on a tie.
    ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    ref_counts = collections.Counter()
    for r in ref_words:
      ref_counts |= _ngrams(r, max_order)  # per n-gram, the most any reference has
    for gram, count in _ngrams(words, max_order).items():
      total[len(gram) - 1] += count
      correct[len(gram) - 1] += min(count, ref_counts[gram])
  precisions, smooth = [0.0] * max_order, 1.0
  for n in range(max_order):
    if total[n] == 0:
      break
    if correct[n] == 0:  # "exp" smoothing: 1 / 2^k for the k-th order without a match
      smooth *= 2
      precisions[n] = 100.0 / (smooth * total[n])
    else:
      precisions[n] = 100.0 * correct[n] / total[n]
  bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
  log = lambda p: math.log(p) if p > 0 else -9999999999.0
  bleu = bp * math.exp(sum(log(p) for p in precisions) / max_order)
  out = {"bleu": bleu, "brevity_penalty": bp, "hyp_len": float(hyp_len), "ref_len": float(ref_len)}
  out.update({f"precision_{n + 1}": p for n, p in enumerate(precisions)})
  return out


# By task kind --------------------------------------------------------------------------------

def classification_metrics(predictions, labels, num_labels: int) -> dict[str, float]:
  """accuracy and Matthews correlation; F1 of class 1 too when there are two classes.

  Args:
    predictions: (B,) predicted class ids.
    labels: (B,) true class ids.
    num_labels: the number of classes; 2 adds "f1".

  Returns:
    {"accuracy": ..., "mcc": ...} plus "f1" for two classes, floats.
  """
  out = {"accuracy": accuracy(predictions, labels),
         "mcc": matthews_corrcoef(predictions, labels)}
  if num_labels == 2:
    out["f1"] = f1(predictions, labels)
  return out


def regression_metrics(predictions, labels) -> dict[str, float]:
  """Pearson's and Spearman's correlations (GLUE's STS-B metrics).

  Args:
    predictions: (B,) predicted scores.
    labels: (B,) true scores.

  Returns:
    {"pearson": ..., "spearman": ...}, floats in [-1, 1].
  """
  return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}

