"""Tables logged as markdown read back as the same cells."""

from __future__ import annotations

from mcis_cli import reporting


def test_markdown_escapes_a_bar_inside_a_cell():
    text = reporting.markdown(reporting.table(("metric", "value"), [("max |ORT - PyTorch| logit", "0.0000")]))
    header, rule, row = text.splitlines()
    assert header == "| metric | value |" and rule == "|---|---|"
    assert row == "| max \\|ORT - PyTorch\\| logit | 0.0000 |"
    assert len(row.replace("\\|", "").split("|")) == len(header.split("|"))
