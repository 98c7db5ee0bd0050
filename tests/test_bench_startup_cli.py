"""bench/startup_cli.py --tiny: the harness runs every row it reports (figures are not asserted)."""
from __future__ import annotations

import json

from bench import startup_cli


def test_tiny_run_reports_every_row(capsys):
    result = startup_cli.main(["--tiny", "--repeats", "1"])
    rows = result["rows"]
    assert set(rows) == {"ti-fast --help", "ti-fast train --help", "ti-fast create (warm cache)",
                         "ti-fast create (cold cache)", "missing tokenizer, hub not answering"}
    assert all(r["s"] > 0 and r["rss_mib"] > 0 for r in rows.values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
