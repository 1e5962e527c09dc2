"""Reading a rendered results file the way a person does: a markdown table's
rows by its column headers, never by position."""


def table(text: str) -> list[dict]:
    """The rows of the markdown table in `text`, as dicts keyed by its header
    (cells stripped; the |---| rule skipped). `text` holds one table."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return [dict(zip(header, (c.strip() for c in line.split("|")[1:-1]))) for line in lines[1:]]


def row(rows: list[dict], **match) -> dict:
    """The one row whose cells equal `match` (column header: cell text)."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} rows match {match}: {rows}"
    return found[0]
