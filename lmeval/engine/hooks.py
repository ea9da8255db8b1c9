"""Pages written from a finished run's folder by the layers above the engine.

The engine writes a run's tables; the HTML report (`lmeval.view.report`) reads them back
into one page. The view layer sits above the engine, so the engine cannot import it: the
package wires the report in here instead (`lmeval/__init__.py`), and `engine.run` calls each
writer once run.json is written, inside the replacement of the folder's previous results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# (output folder, the run's Config, doc_id -> text) -> None; each decides from the config
# whether it writes (output.report)
RUN_PAGES: list[Callable[[Path, object, Callable[[str], str | None]], None]] = []
