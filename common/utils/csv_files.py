"""Reading a CSV file so that every failure names the file and what was expected."""
from __future__ import annotations

from pathlib import Path

ENCODING = "utf-8"


def read_csv(path: str | Path, what: str, **kwargs):
    """pandas.read_csv of `path` (UTF-8); ValueError naming the file, `what` it should be, and the fix otherwise."""
    import pandas as pd
    path = Path(path)
    try:
        return pd.read_csv(path, encoding=ENCODING, **kwargs)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not {ENCODING.upper()} text (byte {err.start}: {err.reason}); expected {what} "
                         f"encoded as UTF-8: re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path} could not be read as a CSV ({err}); expected {what}") from err
