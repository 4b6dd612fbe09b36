"""``bastion deploy``: render Kubernetes manifests from a values file.

Exit status: 0 when written, 2 when the values are refused (the message says
where and why, never repeating a value) or the output cannot be written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from bastion.deploy.kustomize import kustomize
from bastion.deploy.render import dump, render
from bastion.deploy.values import ValuesError, load_values, values_schema

deploy_app = typer.Typer(
    help="Kubernetes manifests for api, gateway and worker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@deploy_app.command("render")
def render_command(
    values: Annotated[Path, typer.Option(help="the values file (YAML)")],
    out: Annotated[Path, typer.Option(help="directory to write (replaced if it exists)")],
    kustomize_layout: Annotated[
        bool,
        typer.Option(
            "--kustomize",
            help="write a Kustomize base and an overlays/<environment> (image, replicas)",
        ),
    ] = False,
) -> None:
    """Write one YAML file per object under OUT/<namespace>/.

    With --kustomize: the same files under OUT/base/ with its kustomization.yaml,
    and OUT/overlays/<environment>/kustomization.yaml."""
    try:
        parsed = load_values(values)
        objects = render(parsed)
        files = kustomize(parsed, objects) if kustomize_layout else dump(objects)
    except ValuesError as error:
        for where, what in error.problems:
            print(f"error: {where}: {what}", file=sys.stderr)
        raise typer.Exit(2) from None
    if out.exists():
        if not (out / ".bastion-deploy").is_file():
            print(f"error: {out} exists and was not written by bastion deploy", file=sys.stderr)
            raise typer.Exit(2)
        shutil.rmtree(out)
    for relative, text in files.items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    (out / ".bastion-deploy").write_text("rendered by bastion deploy render\n", encoding="utf-8")
    print(f"{len(objects)} objects written to {out}", file=sys.stderr)


@deploy_app.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of the values file."""
    sys.stdout.write(json.dumps(values_schema(), indent=2, sort_keys=True) + "\n")
