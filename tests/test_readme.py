"""The README's Python examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
  # The trained-tokenizer example needs a trained run: tests/test_export.py runs it on one.
  text = re.sub(r"<!-- example: trained-tokenizer -->\s*```python\n.*?```", "",
                README.read_text(), flags=re.S)
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "the README lost its Python examples"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
