"""task=search, and the Python API every other reader uses:

    import engine.search
    hits = engine.search.open("out").search(text="a red car", k=10)
"""

from engine.search.searcher import (
    CapabilityError,
    FilterError,
    Searcher,
    SearchError,
    UnknownClipError,
    format_table,
    open,
    run,
    sql_string,
)

__all__ = ["CapabilityError", "FilterError", "SearchError", "Searcher", "UnknownClipError", "format_table",
           "open", "run", "sql_string"]
