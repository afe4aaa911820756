"""Every example in README.md and docs/*.md runs as pasted, and prints what the doc shows.

One test per document (new documents are picked up): its examples run in document order in a
fresh folder holding copies of models/ and tools/, so a file one example writes (runs/digits,
model.onnx) is there for the next. How commands run and how output is compared:
tests/docs_testing.py. A block the suite cannot run (an install, a GPU, minutes of training)
is marked `<!-- skip: next "reason" -->` in the document, and the reason shows in the report.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sybil", reason="the docs test needs sybil (the dev extra)")
from docs_testing import ROOT, doc_paths, output_matches, parse_block, prepare_folder, run_document


@pytest.mark.slow
@pytest.mark.parametrize("doc", doc_paths(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_of_the_document_runs_as_pasted(doc, tmp_path):
    prepare_folder(tmp_path)
    outcome = run_document(doc, tmp_path)
    print(f"{doc.name}: ran {outcome.ran} examples")
    for line in outcome.skipped:
        print("skipped", line)
    assert not outcome.failures, f"{len(outcome.failures)} failed:\n" + "\n".join(outcome.failures)


def test_output_is_compared_by_format_with_numbers_free():
    shown = ["wrote a.onnx (89,418 bytes, opset 18)", "...", "  data    1.5e-06  ok"]
    assert output_matches(shown, ["wrote a.onnx (1,024 bytes, opset 21)", "data 3e-07   ok"])
    assert output_matches(shown, ["wrote a.onnx (7 bytes, opset 18)", "x", "y", "data 0 ok"])
    assert not output_matches(shown, ["wrote a.onnx (7 bytes, opset 18)", "data 0 FAIL"])
    assert not output_matches(shown, ["wrote a.onnx (7 bytes)", "data 0 ok"])
    assert not output_matches(["a 1"], ["a 1", "an extra line"])
    assert output_matches(['{"outputs":[[6.99,-4.17,...]]}'], ['{"outputs":[[1.5,2,3.25]]}'])
    assert output_matches(["model  batch", "-----  -----"], ["model   batch", "------  -----"])


def test_blocks_split_into_commands_with_their_output_and_line():
    source = "$ bn-onnx a \\\n    --b 1\nout 1\nout 2\n$ curl -d '{\"x\":\n  1}'\n"
    first, second = parse_block(source, 10, prompt=True)
    assert (first.text, first.line, first.expected) == ("bn-onnx a --b 1", 10, ["out 1", "out 2"])
    assert (second.text, second.line, second.expected) == ("curl -d '{\"x\":\n1}'", 14, [])
    bash = parse_block("# a comment\nbn-onnx x  # note\n\nbn-onnx y\n", 1, prompt=False)
    assert [(c.text, c.line) for c in bash] == [("bn-onnx x  # note", 2), ("bn-onnx y", 4)]


@pytest.mark.parametrize("doc", doc_paths(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_example_hides_in_an_indented_block(doc):
    # An indented code block is not run: a `$ ` command or a tools/ script in one belongs
    # in a fence (```console / ```bash), or behind a skip marker that says why.
    import re

    hidden = [
        f"{doc.name}:{n}: {line.strip()}"
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if re.match(r" {4,}(\$ |python3? tools/|pip install )", line)
    ]
    assert not hidden, "\n".join(hidden)
