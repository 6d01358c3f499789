"""Builds the HTML API reference of fmjax with pdoc; a pdoc warning about fmjax fails the build.

  python docs/build.py                  # -> docs/api/index.html (what `make docs` runs)
  python docs/build.py --output /tmp/x

Every public module is documented (each module under fmjax/ whose dotted name has no part
starting with "_"), not only the submodules a package lists in `__all__`, which is all that
`pdoc fmjax` would follow. Docstrings are read as Google style (`Args:`, `Returns:`).

Warnings as errors, ours only: every warning raised while pdoc imports, inspects and renders is
recorded. One whose message names an fmjax object (`fmjax.` in the text: a type annotation pdoc
cannot resolve, a module that does not import, a broken docstring) fails the build, unless it
matches `THIRD_PARTY` below, a short list of warnings that name an fmjax object but come from a
library's code, each with the reason. Warnings about other libraries' objects (e.g. the members
that `tensorflow_datasets.core.BuilderConfig` contributes to fmjax's configs) are printed, not
fatal: they are not ours to fix. tests/test_docs.py runs this script.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import pkgutil
import re
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Warnings that name an fmjax object but whose cause is a third party's code, with the reason.
THIRD_PARTY = (
    # tfds' BuilderConfig dataclass annotates `version: utils.VersionOrStr | None` under
    # `from __future__ import annotations`; the `__init__` that @dataclass generates for our
    # subclasses (LocalTextConfig, BertPretrainingConfig) carries that string, which cannot be
    # evaluated in our module, where tfds' `utils` is not imported.
    re.compile(r"Error parsing type annotation (list\[)?utils\.VersionOrStr.* for "
               r"fmjax\.data\.[\w.]+Config\.__init__\. Import of utils failed"),
)


def public_modules(package: str = "fmjax") -> list[str]:
  """Names of the public modules of `package`, the package first, then sorted.

  Args:
    package: the importable package to walk, e.g. "fmjax".

  Returns:
    Dotted module names, e.g. ["fmjax", "fmjax.attention", ..., "fmjax.hf.tables", ...]: the
    package and every module below it with no name part starting with "_".
  """
  root = importlib.import_module(package)

  def fail(name):
    raise ImportError(f"cannot import {name} while listing the modules of {package}")

  names = [m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.", onerror=fail)]
  return [package] + sorted(n for n in names if not any(p.startswith("_") for p in n.split(".")))


def is_ours(message: str) -> bool:
  """Whether a pdoc warning is about fmjax's own code (and so fails the build).

  Args:
    message: the warning's text.

  Returns:
    True when the text names an fmjax object and matches no `THIRD_PARTY` pattern.
  """
  return "fmjax." in message and not any(p.search(message) for p in THIRD_PARTY)


def build(output: pathlib.Path) -> list[str]:
  """Writes the HTML reference of every public fmjax module under `output`.

  Args:
    output: the directory to write; `index.html` and one page per module (e.g.
      `fmjax/attention.html`) go there.

  Returns:
    The warnings about fmjax's own code (see `is_ours`), as text; empty when the build is clean.
    Every other warning is printed to stderr.
  """
  import pdoc.doc
  import pdoc.render

  pdoc.render.configure(docformat="google", show_source=True, search=True)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    names = public_modules()
    for name in names:
      # pdoc looks the names of `__all__` up in the module's __dict__, where a name that the
      # package imports on first use (PEP 562 `__getattr__`, as fmjax.hf does) is not yet.
      module = importlib.import_module(name)
      for member in getattr(module, "__all__", ()):
        getattr(module, member)
    modules = {name: pdoc.doc.Module.from_name(name) for name in names}
    # What pdoc.pdoc() does, minus its walk of submodules: it would follow `__all__` only, and
    # warn about each module named twice.
    for module in modules.values():
      page = output / f"{module.fullname.replace('.', '/')}.html"
      page.parent.mkdir(parents=True, exist_ok=True)
      page.write_text(pdoc.render.html_module(module, modules), encoding="utf-8")
    (output / "index.html").write_text(pdoc.render.html_index(modules), encoding="utf-8")
    (output / "search.js").write_text(pdoc.render.search_index(modules), encoding="utf-8")
  ours = []
  for w in caught:
    text = f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
    if is_ours(str(w.message)):
      ours.append(text)
    else:
      print(f"warning (not fmjax's, ignored): {text}", file=sys.stderr)
  return ours


def main(argv=None) -> int:
  """Command line: build into `--output` (default docs/api/); exit status 1 on a warning of ours.

  Args:
    argv: the arguments, without the program name; None reads sys.argv.

  Returns:
    The exit status: 0 when the reference is built with no warning about fmjax, else 1.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", "-o", type=pathlib.Path, default=ROOT / "docs" / "api")
  args = parser.parse_args(argv)
  sys.path.insert(0, str(ROOT))  # document this checkout's fmjax, installed or not
  start = time.perf_counter()
  ours = build(args.output)
  if ours:
    print(f"docs/build.py: {len(ours)} pdoc warning(s) about fmjax; fix them:", file=sys.stderr)
    print("\n".join(f"  {w}" for w in ours), file=sys.stderr)
    return 1
  print(f"API reference: {args.output / 'index.html'} ({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
