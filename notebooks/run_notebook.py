"""Executes a notebook headlessly with some parameters replaced, the way CI runs the Colab notebooks.

    .venv/bin/python notebooks/run_notebook.py notebooks/colab_tpu.ipynb --output=executed.ipynb \
        STRATEGY=auto DATA=synthetic ARGS="--smoke" SHOW_TENSORBOARD=False

Each KEY=VALUE becomes `KEY = VALUE` in a cell inserted after the cell tagged "parameters"
(papermill's convention): VALUE is read as a Python literal when it is one (False, 3, 0.5),
else as a string. The notebook runs on a local kernel of this Python with the repository root as
its working folder; the executed copy, outputs included, is written to --output even when a
cell fails. Exit status 0 when every cell ran, 1 when one failed (its error is printed), 2 for
bad arguments.
"""

import argparse
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def usage_error(message):
    print(f"run_notebook: {message}", file=sys.stderr)
    sys.exit(2)


def parse_parameters(pairs):
    parameters = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            usage_error(f"{pair!r}: expected KEY=VALUE with KEY a Python name")
        try:
            parameters[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parameters[key] = text
    return parameters


def with_parameters(book, parameters):
    """`book` with a cell setting `parameters` inserted after its "parameters" cell."""
    import nbformat

    tagged = [i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", [])]
    if not tagged:
        usage_error("the notebook has no cell tagged 'parameters'; expected one to override")
    source = "# Injected by notebooks/run_notebook.py\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    book.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return book


def execute(path, parameters, output, timeout=3600, env=None):
    """Runs the notebook at `path` with `parameters`; writes the executed copy to `output`.

    Returns the executed notebook; raises nbclient's CellExecutionError when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient

    book = with_parameters(nbformat.read(path, as_version=4), parameters)
    client = NotebookClient(
        book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": REPO}}, env=env
    )
    try:
        client.execute()
    finally:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        nbformat.write(book, output)
    return book


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--output", required=True, help="where the executed notebook is written")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run")
    parser.add_argument("parameters", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(argv)
    if not os.path.isfile(args.notebook):
        usage_error(f"{args.notebook}: no such file; expected a .ipynb")
    from nbclient.exceptions import CellExecutionError

    try:
        execute(args.notebook, parse_parameters(args.parameters), args.output, timeout=args.timeout)
    except CellExecutionError as e:
        print(f"run_notebook: a cell failed; the executed notebook is in {args.output}\n{e}", file=sys.stderr)
        return 1
    print(f"run_notebook: every cell ran; executed notebook: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
