"""The package layout: every code folder is mapped, imports go through `jaxrepro`, and a
built wheel works from outside the checkout (STYLE.md section 5a)."""

import ast
import os
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOTS = ("algorithms", "models", "sharding", "launch", "configs")


def pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_every_package_folder_is_in_the_mapping():
  tool = pyproject()["tool"]["setuptools"]
  listed = set(tool["packages"])
  for root in ROOTS:
    assert tool["package-dir"][f"jaxrepro.{root}"] == root
    for folder, _, files in os.walk(os.path.join(REPO, root)):
      if "__init__.py" in files:
        rel = os.path.relpath(folder, REPO).replace(os.sep, ".")
        name = "jaxrepro." + rel
        assert name in listed, f"{name} is missing from [tool.setuptools] packages"
  for root in ROOTS:
    assert os.path.exists(os.path.join(REPO, root, "__init__.py")), root


def python_files():
  for top in ROOTS + ("src", "tests"):
    for folder, _, files in os.walk(os.path.join(REPO, top)):
      for name in files:
        if name.endswith(".py"):
          yield os.path.join(folder, name)


def test_no_bare_imports_of_the_code_folders():
  offenders = []
  for path in python_files():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      elif isinstance(node, ast.ImportFrom) and node.level > 0:
        offenders.append(f"{path}:{node.lineno} relative import")
      offenders += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in ROOTS]
  assert not offenders, offenders


def test_no_tensorflow_import_in_the_library():
  for path in python_files():
    if f"{os.sep}tests{os.sep}" in path:
      continue
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        assert not any(a.name.split(".")[0] == "tensorflow" for a in node.names), path
      if isinstance(node, ast.ImportFrom) and node.module:
        assert node.module.split(".")[0] != "tensorflow", path


def test_ruff_is_clean():
  ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
  if not os.path.exists(ruff):
    pytest.fail("ruff is part of the test extra; install with pip install -e '.[test]'")
  result = subprocess.run([ruff, "check", "--quiet", REPO], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_imports_from_outside_the_checkout(tmp_path):
  wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
  build = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
       "-w", str(wheel_dir), REPO], capture_output=True, text=True)
  assert build.returncode == 0, build.stderr[-2000:]
  (wheel,) = wheel_dir.glob("jaxrepro-*.whl")
  install = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
       str(wheel)], capture_output=True, text=True)
  assert install.returncode == 0, install.stderr[-2000:]
  code = ("import jaxrepro, jaxrepro.algorithms, jaxrepro.models, jaxrepro.sharding, "
          "jaxrepro.configs, jaxrepro.launch.main\n"
          "from jaxrepro.launch import experiment\n"
          "assert len(experiment.catalog()) == 62\n"
          "from jaxrepro.launch import pretrained_lms\n"
          "assert pretrained_lms.load('synthlang_draft').params is not None\n"
          "print(jaxrepro.algorithms.__file__)")
  env = dict(os.environ, PYTHONPATH=str(site))
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip().startswith(str(site))
