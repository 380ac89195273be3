"""Publish Python values to Observable JS (OJS) cells, the way Quarto does.

Quarto defines ``ojs_define`` only while it executes a document itself, so a
notebook that calls it raises ``NameError`` in plain Jupyter and on Colab. This
module provides the same function everywhere: it displays the very HTML output
Quarto's own helper displays, a ``<script type="ojs-define">`` element holding
``{"contents": [{"name": ..., "value": ...}]}`` with the output metadata
``{"ojs_define": true}``. Quarto reads that stored output when it renders the
notebook (even without re-executing it) and hands the values to the page's OJS
cells; in Jupyter and Colab the script element is inert and shows nothing.
"""

import json
import math

from IPython.display import HTML, display

__all__ = ["ojs_define", "ojs_define_html"]


def _check_finite(value, path):
    """Reject NaN/inf: json.dumps would write NaN, which browsers' JSON.parse rejects."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"ojs_define: {path} is {value!r}; JSON has no NaN or infinity")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{path}[{index}]")


def ojs_define_html(**values):
    """Return the ``<script type="ojs-define">`` HTML that publishes ``values`` to OJS.

    Each keyword becomes an OJS variable of that name. Values must be
    JSON-serialisable (numbers, strings, booleans, None, lists, dicts); convert
    numpy arrays and tensors with ``.tolist()`` first.
    """
    if not values:
        raise ValueError("ojs_define: pass at least one name=value pair")
    contents = []
    for name, value in values.items():
        _check_finite(value, name)
        try:
            json.dumps(value)
        except TypeError as error:
            raise TypeError(
                f"ojs_define: {name} is a {type(value).__name__}, which JSON cannot hold; "
                "convert it first (for arrays and tensors: .tolist())"
            ) from error
        contents.append({"name": name, "value": value})
    payload = json.dumps({"contents": contents})
    # "</" inside a string would end the <script> element early; "<\/" is the same JSON string.
    return '<script type="ojs-define">' + payload.replace("</", "<\\/") + "</script>"


def ojs_define(**values):
    """Publish ``values`` to the OJS cells of the rendered page, exactly like Quarto's helper.

    Displays the HTML from :func:`ojs_define_html` with metadata
    ``{"ojs_define": True}``. Harmless (an invisible script element) in Jupyter and Colab.
    """
    display(HTML(ojs_define_html(**values)), metadata={"ojs_define": True})
