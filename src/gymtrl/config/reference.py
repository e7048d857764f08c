"""The configuration reference (docs/configuration.md), generated from schema.py's source.

Every dataclass field of schema.py is a key. The `#` comment lines right above a field (and a `#`
comment at the end of its line) are its description. A field whose type is another dataclass of
schema.py becomes a section of its own: `vllm.launch`, `data.train[]` (a list of entries),
`prepare.sources[].hf`. The source is read with `ast`, not imported, so this runs without the
trainer's packages.

    python -m gymtrl.config.reference > docs/configuration.md     # regenerate
    python -m gymtrl.config.reference --check                     # exit 1 when the file is stale
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = Path(__file__).with_name("schema.py")
DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
ROOT_CLASS = "Config"

HEADER = """\
# Configuration reference

<!-- Generated from src/gymtrl/config/schema.py by `python -m gymtrl.config.reference >
docs/configuration.md`. Do not edit by hand; tests/test_config_reference.py checks it. -->

Every key `gymtrl train` and `gymtrl prepare-data` read, with its type and default, generated from
the comments in `src/gymtrl/config/schema.py`.

- Unknown keys are errors that name the closest valid key.
- `key=value` arguments after `--config FILE` override the file (`grpo.max_steps=100`).
- `${oc.env:NAME}` and `${oc.env:NAME,default}` read environment variables.
- The `grpo` section is passed to `trl.GRPOConfig` and checked against its real fields; gymtrl's own
  defaults for it are listed in [the guide](guide.md#grpo-defaults).
- *required*: the key has no default and must be set.
"""


@dataclass
class Field:
    name: str
    type: str
    default: str
    doc: str
    ref: str | None = None        # a schema dataclass this field holds
    ref_kind: str = ""            # "" (the dataclass itself), "[]" (a list of them), "?" (optional)


@dataclass
class Klass:
    name: str
    bases: list[str]
    doc: str
    fields: list[Field] = field(default_factory=list)


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (without '#')."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _is_dataclass(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def _yaml(value) -> str:
    """A Python literal as it would be written in the YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value and not value[0] in "[{'\"&*!|>%@`" else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(node: ast.expr | None) -> str:
    if node is None or (isinstance(node, ast.Name) and node.id == "MISSING"):
        return "*required*"
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return _default(kw.value)
            if kw.arg == "default_factory":
                f = kw.value
                if isinstance(f, ast.Name) and f.id in ("list", "dict", "tuple", "set"):
                    return {"list": "`[]`", "dict": "`{}`", "tuple": "`[]`", "set": "`[]`"}[f.id]
                if isinstance(f, ast.Lambda):
                    return _default(f.body)
                return ""
        return "*required*"
    try:
        return f"`{_yaml(ast.literal_eval(node))}`"
    except ValueError:
        return f"`{ast.unparse(node)}`"


def _type(node: ast.expr | None) -> str:
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):   # a quoted annotation
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return node.value
    return ast.unparse(node)


def _ref(node: ast.expr | None, classes: set[str]) -> tuple[str | None, str]:
    """The schema dataclass a field's type holds: X, list[X] or Optional[X] (and X | None)."""
    if node is None:
        return None, ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None, ""
    if isinstance(node, ast.Name):
        return (node.id, "") if node.id in classes else (None, "")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        for side in (node.left, node.right):
            if not (isinstance(side, ast.Constant) and side.value is None):
                name, kind = _ref(side, classes)
                if name:
                    return name, kind or "?"
        return None, ""
    if isinstance(node, ast.Subscript):
        outer = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
        inner = node.slice
        if outer == "Optional":
            name, kind = _ref(inner, classes)
            return (name, kind or "?") if name else (None, "")
        if outer in ("list", "List", "Sequence", "tuple"):
            name, kind = _ref(inner, classes)
            return (name, "[]") if name and not kind else (None, "")
    return None, ""


def parse(source: str) -> dict[str, Klass]:
    """The dataclasses of a schema module's source, in order, each with its fields' docs."""
    tree = ast.parse(source)
    comments = _comments(source)
    lines = source.splitlines()
    nodes = [n for n in tree.body if isinstance(n, ast.ClassDef) and _is_dataclass(n)]
    names = {n.name for n in nodes}
    classes: dict[str, Klass] = {}
    for node in nodes:
        k = Klass(node.name, [ast.unparse(b) for b in node.bases], ast.get_docstring(node) or "")
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if getattr(stmt.annotation, "id", "") == "ClassVar" or ast.unparse(stmt.annotation).startswith(
                    ("ClassVar", "typing.ClassVar")):
                continue
            doc = []
            line = stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                doc.insert(0, comments.get(line, lines[line - 1].strip().lstrip("#").strip()))
                line -= 1
            trailing = comments.get(stmt.end_lineno)
            if trailing is not None and not lines[stmt.end_lineno - 1].strip().startswith("#"):
                doc.append(trailing)
            ref, kind = _ref(stmt.annotation, names)
            k.fields.append(Field(stmt.target.id, _type(stmt.annotation), _default(stmt.value),
                                  " ".join(d for d in doc if d), ref, kind))
        classes[node.name] = k
    return classes


def all_fields(name: str, classes: dict[str, Klass]) -> list[Field]:
    """A dataclass's fields with those of its schema base classes first, as dataclasses order them."""
    k = classes[name]
    out: dict[str, Field] = {}
    for base in k.bases:
        if base in classes:
            for f in all_fields(base, classes):
                out[f.name] = f
    for f in k.fields:
        out[f.name] = f
    return list(out.values())


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _type_cell(f: Field) -> str:
    """The type as a reader of YAML needs it: `Optional[X]` as "`X` or `null`", a section as "section"."""
    if not f.type:
        return ""
    if f.ref and not f.ref_kind:
        return "section"
    try:
        node = ast.parse(f.type, mode="eval").body
    except SyntaxError:
        return f"`{_cell(f.type)}`"
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Optional", "typing.Optional"):
        return f"`{_cell(ast.unparse(node.slice))}` or `null`"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [p for p in (node.left, node.right) if not (isinstance(p, ast.Constant) and p.value is None)]
        if len(parts) == 1:
            return f"`{_cell(ast.unparse(parts[0]))}` or `null`"
    return f"`{_cell(f.type)}`"


def _anchor(path: str) -> str:
    """GitHub's heading anchor for a section title made of one key path."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _row(key: str, f: Field, desc: str) -> str:
    return f"| `{key}` | {_type_cell(f)} | {f.default} | {_cell(desc)} |"


def render(source: str) -> str:
    """The whole reference as markdown."""
    classes = parse(source)
    if ROOT_CLASS not in classes:
        raise ValueError(f"schema has no dataclass {ROOT_CLASS!r}")
    out = [HEADER]
    placed: dict[str, str] = {}      # class -> the section it is documented in

    def table(rows: list[str]) -> None:
        out.append("| key | type | default | description |")
        out.append("|---|---|---|---|")
        out.extend(rows)
        out.append("")

    def rows_of(name: str, prefix: str) -> tuple[list[str], list[tuple[str, str]]]:
        rows, nested = [], []
        for f in all_fields(name, classes):
            key = prefix + f.name
            if not f.ref:
                rows.append(_row(key, f, f.doc))
                continue
            sub = key + ("[]" if f.ref_kind == "[]" else "")
            if f.ref not in placed:
                placed[f.ref] = sub
                nested.append((f.ref, sub))
            target = placed[f.ref]
            what = {"[]": "a list of entries, ", "?": "an entry or `null`, "}.get(f.ref_kind, "")
            what += f"see [`{target}`](#{_anchor(target)})"
            rows.append(_row(key, f, f"{f.doc} ({what})" if f.doc else what[0].upper() + what[1:]))
        return rows, nested

    def section(name: str, path: str) -> None:
        out.append(f"## {path}\n")
        doc = classes[name].doc.strip()
        if doc:
            out.append(doc + "\n")
        rows, nested = rows_of(name, path + ".")
        table(rows)
        for sub_name, sub_path in nested:
            section(sub_name, sub_path)

    out.append("## Sections\n")
    rows, nested = rows_of(ROOT_CLASS, "")
    table(rows)
    for name, path in nested:
        section(name, path)

    for name in classes:
        if name != ROOT_CLASS and name not in placed and not any(
                name in classes[c].bases for c in placed):
            out.append(f"## {name} (not reachable from `{ROOT_CLASS}`)\n")
            table([_row(f.name, f, f.doc) for f in all_fields(name, classes)])
    return "\n".join(out).rstrip("\n") + "\n"


def generate(schema: Path = SCHEMA) -> str:
    return render(schema.read_text())


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gymtrl.config.reference",
                                description="Print the configuration reference generated from schema.py.")
    p.add_argument("--check", nargs="?", const=str(DOC), metavar="FILE",
                   help=f"compare FILE (default: {DOC}) with the generated text; exit 1 when it differs")
    args = p.parse_args(argv)
    text = generate()
    if args.check:
        path = Path(args.check)
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is stale: regenerate it with `python -m gymtrl.config.reference > {path}`",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
