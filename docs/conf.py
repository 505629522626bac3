"""Sphinx configuration for the flask-chatkit documentation (`make docs`).

Built with ``-W -n`` (warnings are errors, every cross-reference must resolve). The
build is offline: no intersphinx, so references into other packages' types are
listed in ``nitpick_ignore_regex`` below instead of being linked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sphinx.application import Sphinx

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))  # bench_chart.py

import bench_chart  # noqa: E402

import flask_chatkit  # noqa: E402

project = "flask-chatkit"
author = "flask-chatkit contributors"
copyright = "flask-chatkit contributors"
release = flask_chatkit.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_click",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.md", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # `[text](#a-heading)` links within and across pages

html_theme = "furo"
html_title = f"flask-chatkit {release}"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"  # else browsers ask for /favicon.ico and log a 404
html_show_sourcelink = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# Members are listed on each directive in reference/api.md: the stores also carry the
# SDK's own methods, documented by the SDK.
autodoc_default_options: dict[str, object] = {}
add_module_names = False

# Types of other packages (ChatKit, Flask, SQLAlchemy, pydantic, the standard
# library, ...) appear in signatures; without network access for intersphinx they
# cannot be linked, so they are accepted unlinked. Names of flask_chatkit itself are
# not in this list: an unresolved one fails the build. Internal modules (web,
# bridge, storage) are not part of the documented API and may be named by docstrings.
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(chatkit|flask|werkzeug|sqlalchemy|pydantic|pydantic_core|blinker|click|asgiref"
        r"|typing|typing_extensions|collections|collections\.abc|datetime|asyncio|concurrent"
        r"|contextvars|io|os|pathlib|types|logging|gevent)(\..*)?",
    ),
    (r"py:.*", r"flask_chatkit\.(web|bridge|storage)\..*"),
    (
        r"py:.*",
        r"(Any|Callable|Iterable|Iterator|AsyncIterator|Awaitable|TypeVar|Literal"
        r"|BinaryIO|IO|ParamSpec|P|R|T|T_co|TContext|Engine|MetaData|Store"
        r"|AttachmentStore|ChatKitServer|Flask|FlaskClient|Request|Response"
        r"|ThreadStreamEvent|Thread|ThreadItem|Page|Attachment|ChatKitReq|NamedSignal"
        r"|Path|datetime|timedelta|Exception|BaseException|URL|Namespace|~?P"
        r"|AttachmentTooLarge|ThreadMetadata)",
    ),
    (r"py:.*", r"(None|int|str|bytes|float|bool|dict|list|tuple|set|frozenset|type|object)"),
    # A dataclass field's `dict[str, Any] = <factory>` default is split at its comma by
    # Sphinx's signature parser (RequestContext.metadata).
    (r"py:class", r"dict\[str"),
]


def _write_bench_chart(app: Sphinx) -> None:
    """The benchmark charts, drawn from bench/RESULTS.md at every build."""
    bench_chart.write_charts(ROOT / "bench" / "RESULTS.md", DOCS / "_generated")


def setup(app: Sphinx) -> None:
    app.connect("builder-inited", _write_bench_chart)
