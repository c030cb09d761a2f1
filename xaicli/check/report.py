"""Reports of `xai check`: JUnit XML for CI and a rich table for the terminal."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from .measure import Outcome
from .rules import _fmt


def junit_xml(outcomes: Sequence[Outcome], suite: str = "xai check", time_s: float = 0.0) -> bytes:
    """JUnit XML: one <testcase> per rule, a <failure> carrying the measured value when it fails."""
    failures = sum(1 for o in outcomes if not o.passed)
    root = ET.Element("testsuites", name=suite, tests=str(len(outcomes)), failures=str(failures), errors="0",
                      time=f"{time_s:.3f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(outcomes)), failures=str(failures),
                       errors="0", skipped="0", time=f"{time_s:.3f}")
    for o in outcomes:
        tc = ET.SubElement(ts, "testcase", classname=f"xai.check.{o.rule.kind}", name=o.rule.name, time="0")
        text = f"measured {_fmt(o.measured)}, expected {o.rule.bounds.describe()}: {o.detail}"
        if not o.passed:
            msg = (f"measured {_fmt(o.measured)}, expected {o.rule.bounds.describe()}" if o.measured is not None
                   else o.detail)
            fail = ET.SubElement(tc, "failure", message=msg, type="ExpectationFailed")
            fail.text = text
        else:
            ET.SubElement(tc, "system-out").text = text
    ET.indent(root)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def table(outcomes: Sequence[Outcome], title: str = "xai check") -> Any:
    """A rich table: rule, PASS/FAIL, measured value, bound, how it was measured."""
    from rich.markup import escape
    from rich.table import Table

    from ..errors import printable

    t = Table(title=escape(printable(title)))
    for col, just in (("rule", "left"), ("result", "left"), ("measured", "right"), ("bound", "left"),
                      ("detail", "left")):
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for o in outcomes:
        t.add_row(escape(printable(o.rule.name)), "[bold green]PASS[/]" if o.passed else "[bold red]FAIL[/]",
                  _fmt(o.measured), o.rule.bounds.describe(), escape(printable(o.detail)))
    return t
