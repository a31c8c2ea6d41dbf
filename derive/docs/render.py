"""Render the documentation model through the Jinja templates in ``templates/docs/``.

Two renderings of the same pages: Markdown (``docs/*.md``, math in ``$...$`` and ```` ```math ````
blocks, for a code host) and static HTML (``docs/html/``, math as MathML that browsers render
natively, inline CSS, no script, no URL: it opens from the file system with no network).
"""
from __future__ import annotations

import posixpath
import re

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from derive.docs import mathtex
from derive.resources import templates_dir
from derive.docs.model import Docs

TEMPLATES = templates_dir() / "docs"

MD, HTML = "md", "html"


def page_path(key: str, fmt: str) -> str:
    """Path of a page under docs/: "README" is the index."""
    if fmt == MD:
        return f"{key}.md"
    return "html/" + ("index" if key == "README" else key) + ".html"


def _rel(target: str, current: str) -> str:
    return posixpath.relpath(target, posixpath.dirname(current) or ".")


def _md_cell(text) -> str:
    """Text for a Markdown table cell: no line breaks, no bare pipes."""
    return re.sub(r"\s+", " ", str(text)).replace("|", "\\|")


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-")


def _tidy(text: str) -> str:
    """No runs of blank lines, no trailing spaces, one newline at the end."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def environment(fmt: str) -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=(fmt == HTML),
    )
    env.globals["fmt"] = fmt
    env.filters["slug"] = _slug
    if fmt == MD:
        env.filters["m"] = mathtex.md_inline
        env.filters["dm"] = mathtex.md_block
        env.filters["code"] = lambda t: mathtex.md_code(str(t))
        env.filters["cell"] = _md_cell
        env.filters["prose"] = str
    else:
        env.filters["m"] = lambda m: Markup(mathtex.html_inline(m))
        env.filters["dm"] = lambda m: Markup(mathtex.html_block(m))
        env.filters["code"] = lambda t: Markup(f"<code>{escape(str(t))}</code>")
        env.filters["cell"] = lambda t: t
        env.filters["prose"] = lambda t: Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(str(t)))))
    return env


def render_all(docs: Docs, figures: list) -> dict:
    """{path under docs/: text} for every page, both renderings."""
    pages = [("README", "index", {}), ("stable_rewrites", "stable_rewrites", {}), ("kernels", "kernels", {}),
             ("plots", "plots", {})]
    pages += [(p.key, "derivation", {"page": p}) for p in docs.pages]
    pages += [(k.key, "kernel", {"k": k}) for k in docs.kernels]
    figs = {f.stem: f for f in figures}
    out = {}
    for fmt in (MD, HTML):
        env = environment(fmt)
        for key, template, extra in pages:
            current = page_path(key, fmt)

            def url(target, anchor=None, _cur=current, _fmt=fmt):
                return _rel(page_path(target, _fmt), _cur) + (f"#{anchor}" if anchor else "")

            def alt_url(target, _cur=current, _fmt=fmt):
                return _rel(page_path(target, HTML if _fmt == MD else MD), _cur)

            def img(name, _cur=current):
                return _rel(f"img/{name}", _cur)

            def repo(path, line=None, _cur=current, _fmt=fmt):
                rel = _rel(posixpath.join("..", path), _cur)
                return rel + (f"#L{line}" if line and _fmt == MD else "")

            tpl = env.get_template(f"{fmt}/{template}.{fmt}.j2")
            text = tpl.render(docs=docs, figures=figures, figs=figs, url=url, alt_url=alt_url, img=img, repo=repo,
                              key=key, **extra)
            out[current] = _tidy(text)
    return out
