"""The API reference: every public callable documented (Args/Returns), and the pdoc build clean.

What is public is what `docs/build.py` (`make docs`) documents: every module under fmjax/ with no
name part starting with "_", and in it the names of its `__all__`, or, without one, its names not
starting with "_". Of those, each function and class defined in fmjax is checked where it is
defined, with its public methods, `__call__` and `__init__`:
- a docstring (a method may instead override a documented method of a base class, whose
  docstring pdoc shows; a property needs only a docstring);
- when it takes arguments (besides self/cls), a Google-style `Args:` section naming each one
  (`__init__`'s may be in the class docstring);
- when it returns a value (a `return <value>` in its own body, or a return annotation other
  than None), a `Returns:` section (`Yields:` for a generator).
Sections as pdoc renders them: the header alone on a line, e.g. `Returns:`, then indented lines.
"""

import ast
import importlib
import importlib.util
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fmjax_docs_build", ROOT / "docs" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

PROPERTY_DECORATORS = {"property", "cached_property", "classproperty"}


def _decorator_names(node):
  names = set()
  for d in node.decorator_list:
    d = d.func if isinstance(d, ast.Call) else d
    names.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
  return names


def _index(tree):
  """qualname -> def node for the module's functions and classes (not those inside functions)."""
  index = {}

  def visit(body, prefix):
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        index[prefix + node.name] = node
        if isinstance(node, ast.ClassDef):
          visit(node.body, f"{prefix}{node.name}.")

  visit(tree.body, "")
  return index


def _section(doc, name):
  """The entry lines of a Google-style section (`name:` alone on a line), or None if absent."""
  lines = doc.splitlines()
  for i, line in enumerate(lines):
    if line == f"{name}:":
      body = []
      for line in lines[i + 1:]:
        if line.strip() and not line[0].isspace():
          break
        body.append(line)
      indents = [len(l) - len(l.lstrip()) for l in body if l.strip()]
      return [l.strip() for l in body if l.strip() and len(l) - len(l.lstrip()) == min(indents)]
  return None


def _documented_names(entries):
  names = set()
  for entry in entries:
    key = re.sub(r"\(.*?\)", "", entry.split(":", 1)[0])
    names.update(k.strip().lstrip("*") for k in key.split(","))
  return names


def _params(node, is_method):
  a = node.args
  params = [p.arg for p in a.posonlyargs + a.args]
  if is_method and "staticmethod" not in _decorator_names(node) and params:
    params = params[1:]  # self / cls
  params += [p.arg for p in a.kwonlyargs]
  params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
  return params


def _own_nodes(node):
  """The nodes of a function's body, not descending into nested functions, lambdas or classes."""
  todo = list(node.body)
  while todo:
    n = todo.pop()
    yield n
    if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
      todo.extend(ast.iter_child_nodes(n))


def _returns(node):
  """"Yields" for a generator, "Returns" for a function that returns a value, else None."""
  nodes = list(_own_nodes(node))
  if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in nodes):
    return "Yields"
  if any(isinstance(n, ast.Return) and n.value is not None
         and not (isinstance(n.value, ast.Constant) and n.value.value is None) for n in nodes):
    return "Returns"
  r = node.returns
  if r is not None and not (isinstance(r, ast.Constant) and r.value in (None, "None")) and not (
      isinstance(r, (ast.Name, ast.Attribute)) and getattr(r, "id", getattr(r, "attr", ""))
      in ("None", "NoReturn", "Never")):
    return "Returns"
  return None


def _check_function(node, is_method, class_doc=None):
  """What a function's docstring lacks, as a list of short phrases."""
  doc = ast.get_docstring(node) or ""
  problems = []
  if not doc and not (node.name == "__init__" and class_doc):
    problems.append("docstring")
  params = _params(node, is_method)
  if params:
    args = _section(doc, "Args")
    if args is None and node.name == "__init__" and class_doc:
      args = _section(class_doc, "Args")
    if args is None:
      problems.append(f"Args: ({', '.join(params)})")
    else:
      missing = [p for p in params if p not in _documented_names(args)]
      if missing:
        problems.append(f"Args entries for {', '.join(missing)}")
  kind = _returns(node) if node.name != "__init__" else None
  if kind and _section(doc, kind) is None and _section(doc, "Returns") is None:
    problems.append(f"{kind}:")
  return problems


def _inherits_doc(cls, name):
  """Whether a base class of `cls` defines `name` with a docstring (pdoc shows that one)."""
  for base in cls.__mro__[1:]:
    member = base.__dict__.get(name)
    if member is not None and inspect.getdoc(getattr(member, "__func__", member)):
      return True
  return False


def _public_objects():
  """(module name, qualname) -> object, for the functions and classes the reference documents."""
  found = {}
  for name in build.public_modules():
    module = importlib.import_module(name)
    names = getattr(module, "__all__", None)
    if names is None:
      names = [n for n in vars(module) if not n.startswith("_")]
    for n in names:
      obj = inspect.unwrap(getattr(module, n))
      if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        continue
      if str(getattr(obj, "__module__", "")).split(".")[0] == "fmjax":
        found[(obj.__module__, obj.__qualname__)] = obj
  return found


def _relpath(module):
  return pathlib.Path(module.__file__).resolve().relative_to(ROOT).as_posix()


def find_offenders():
  """Every missing docstring, Args or Returns of the public API: "file:line name: missing ..."."""
  offenders = []
  trees = {}

  def tree_of(modname):
    if modname not in trees:
      module = sys.modules[modname]
      source = pathlib.Path(module.__file__).read_text()
      trees[modname] = (_relpath(module), _index(ast.parse(source)))
    return trees[modname]

  for modname in build.public_modules():
    module = importlib.import_module(modname)
    path, _ = tree_of(modname)
    if not inspect.getdoc(module) or module.__doc__ is None:
      offenders.append(f"{path}:1 module {modname}: missing docstring")

  for (modname, qualname), obj in sorted(_public_objects().items()):
    path, index = tree_of(modname)
    node = index.get(qualname)
    if node is None:
      continue  # made at run time (no def in the source): nothing to read
    report = lambda n, name, problems: offenders.append(
        f"{path}:{n.lineno} {name}: missing {'; '.join(problems)}")
    if isinstance(node, ast.ClassDef):
      class_doc = ast.get_docstring(node)
      if not class_doc:
        report(node, qualname, ["class docstring"])
      for child in node.body:
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
          continue
        name = child.name
        decorators = _decorator_names(child)
        if (name.startswith("_") and name not in ("__init__", "__call__")) or (
            decorators & {"setter", "deleter", "overload"}):
          continue
        if not ast.get_docstring(child) and name != "__init__" and _inherits_doc(obj, name):
          continue
        if decorators & PROPERTY_DECORATORS:
          problems = [] if ast.get_docstring(child) else ["docstring"]
        else:
          problems = _check_function(child, is_method=True, class_doc=class_doc)
        if problems:
          report(child, f"{qualname}.{name}", problems)
    else:
      problems = _check_function(node, is_method=False)
      if problems:
        report(node, qualname, problems)
  def where(offender):
    path, line = offender.split(" ", 1)[0].split(":")
    return path, int(line)

  return sorted(offenders, key=where)


def test_checker_reads_google_sections():
  src = '''
def good(x, *, y=1, **kw) -> int:
  """Doc.

  Args:
    x: (B, T) int32 ids.
    y (int): a count.
    **kw: passed on.

  Returns:
    (B,) the sums.
  """
  return 1

def inline(x):
  """Doc. Returns: inline is not a section.

  Args:
    x, y: grouped.
  """
  return x

def gen(a):
  """Doc.

  Args:
    b: the wrong name.
  """
  yield a

class C:
  def m(self, x):
    return None
'''
  index = _index(ast.parse(src))
  assert _check_function(index["good"], is_method=False) == []
  assert _check_function(index["inline"], is_method=False) == ["Returns:"]
  assert _check_function(index["gen"], is_method=False) == ["Args entries for a", "Yields:"]
  assert _check_function(index["C.m"], is_method=True) == ["docstring", "Args: (x)"]


def test_every_public_callable_has_args_and_returns():
  offenders = find_offenders()
  by_file = {}
  for o in offenders:
    by_file.setdefault(o.split(":", 1)[0], []).append(o)
  summary = ", ".join(f"{f} ({len(v)})" for f, v in sorted(by_file.items()))
  if offenders:
    pytest.fail(
        f"{len(offenders)} public callables lack docs, in {summary}. Write Google-style "
        "sections (a line `Args:` / `Returns:` alone, then indented `name: (B, T, D) float32 "
        "...` lines; shape key: B batch, T length, S key length, D width, F MLP width, "
        "N heads, K kv heads, H head dim, V vocab):\n" + "\n".join(offenders), pytrace=False)


def test_api_reference_builds_without_warnings(tmp_path):
  """`make docs` in a temporary directory: a pdoc warning about an fmjax object fails it."""
  result = subprocess.run(
      [sys.executable, str(ROOT / "docs" / "build.py"), "--output", str(tmp_path)],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
  expected = {f"{m.replace('.', '/')}.html" for m in build.public_modules()} | {"index.html"}
  assert pages == expected
  attention = (tmp_path / "fmjax" / "attention.html").read_text()
  assert "dot_product_attention" in attention and "Arguments:" in attention  # Google sections


def test_warning_filter_errors_on_ours_only():
  assert build.is_ours("Error parsing type annotation Foo for fmjax.attention.f. Import failed")
  assert build.is_ours("Found 'x' in fmjax.hf.__all__, but it does not resolve")
  assert not build.is_ours("Error parsing type annotation utils.VersionOrStr | None for "
                           "tensorflow_datasets.core.dataset_builder.BuilderConfig.version.")
  assert not build.is_ours("Error parsing type annotation list[utils.VersionOrStr] for "
                           "fmjax.data.text.LocalTextConfig.__init__. Import of utils failed: "
                           "name 'utils' is not defined")
