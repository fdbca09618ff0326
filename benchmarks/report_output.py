"""The benchmarks' common ending: the report as JSON, a blank line, its Markdown table, and optionally a JSON file."""

import json
from pathlib import Path


def emit(report: dict, table: str, json_out: Path | None) -> None:
    """Print the JSON report and its table; also write the JSON to json_out when given."""
    text = json.dumps(report, indent=2)
    print(text)
    print()
    print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
