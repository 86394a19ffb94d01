"""Reading data files into rows: JSON, JSON Lines, CSV / TSV, Parquet, and `datasets.save_to_disk` folders.

Every row comes with `where`, the place a person would look for it ("train.jsonl:17", "data.json:40 (row 7)",
"data.parquet row 12"), so that any later error about the row can name it. Parquet needs pyarrow and
save_to_disk folders need `datasets`; both are imported only when such a file is read.
"""

import csv
import json
from pathlib import Path

from ..errors import DataError

SUFFIXES = {
    ".json": "JSON array (or JSON Lines)",
    ".jsonl": "JSON Lines",
    ".ndjson": "JSON Lines",
    ".csv": "CSV with a header row",
    ".tsv": "tab-separated, with a header row",
    ".parquet": "Parquet (needs pyarrow)",
}

Row = tuple[str, dict]  # (where, row)


def read_rows(path) -> list[Row]:
    """All rows of a data file (or save_to_disk folder), in file order, each a dict of column -> value."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".jsonl", ".ndjson"):
            return _read_json_lines(path, path.read_text(encoding="utf-8"))
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    supported = ", ".join(f"{s} ({what})" for s, what in SUFFIXES.items())
    raise DataError(f"{path}: unknown data file type {suffix!r}; supported: {supported}, or a save_to_disk folder")


def _read_json(path: Path) -> list[Row]:
    """A JSON array of objects; a .json file that holds one object per line is read as JSON Lines, as the
    `datasets` library does (many published ".json" files are JSON Lines)."""
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return []
    if text[start] == "{":
        return _read_json_lines(path, text)
    if text[start] != "[":
        raise DataError(f"{path}:{_line_of(text, start)}: expected a JSON array of objects or JSON Lines")
    return _read_json_array(path, text, start + 1)


def _read_json_array(path: Path, text: str, pos: int) -> list[Row]:
    """Decodes the array one element at a time so that each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    line, counted_to = 1, 0  # newlines are counted incrementally: a count from the start each time is quadratic

    def line_at(i: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]" and not rows:
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        where = f"{path}:{line_at(pos)} (row {len(rows) + 1})"
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        rows.append((where, value))
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            break
        else:
            where = f"{path}:{line_at(min(pos, len(text)))}"
            raise DataError(f"{where}: not valid JSON (expected ',' or ']' after row {len(rows)})")
    if _skip_space(text, pos + 1) != len(text):
        raise DataError(f"{path}:{line_at(pos + 1)}: not valid JSON (text after the closing ']')")
    return rows


def _read_json_lines(path: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no row
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        rows.append((f"{path}:{number}", value))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: drop the byte-order mark spreadsheets write
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
            end_of_previous = reader.line_num
            for row in reader:
                where = f"{path}:{end_of_previous + 1}"  # a quoted field may span lines: name the first one
                end_of_previous = reader.line_num
                if None in row:
                    raise DataError(f"{where}: {len(header) + len(row[None])} fields, but the header has {len(header)}")
                missing = [k for k, v in row.items() if v is None]
                if missing:
                    raise DataError(f"{where}: {len(header) - len(missing)} fields, but the header has {len(header)}")
                rows.append((where, row))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file; all mean "not readable"
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path) -> list[Row]:
    """A folder written by `datasets.Dataset.save_to_disk` (or DatasetDict's: its "train" split)."""
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk; give a data file instead")
    try:
        import datasets
    except ImportError:
        hint = "needs the datasets package (pip install datasets)"
        raise DataError(f"{path}: reading a save_to_disk folder {hint}") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded, path = loaded["train"], path / "train"
        elif len(splits) == 1:
            loaded, path = loaded[splits[0]], path / splits[0]
        else:
            raise DataError(f"{path}: has splits {', '.join(splits)} but no 'train' split to train on")
    return [(f"{path} row {i}", dict(row)) for i, row in enumerate(loaded, start=1)]


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1
