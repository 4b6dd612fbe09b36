"""``bastion sandbox``: which backend this host gives, and a quick run in it."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bastion.settings import Settings

sandbox_app = typer.Typer(
    help="The sandbox for untrusted code and tool calls.", no_args_is_help=True
)


@sandbox_app.command("probe")
def probe_command(
    all_backends: Annotated[
        bool, typer.Option("--all", help="also try the opt-in backends (gvisor, firecracker)")
    ] = False,
) -> None:
    """Try each backend (strongest first) and print the one the worker would use."""
    from bastion.safety.sandbox import Sandbox, SandboxConfig, SandboxUnavailable
    from bastion.safety.sandbox.service import BACKENDS

    config = SandboxConfig.from_settings(Settings())
    if all_backends:
        config = dataclasses.replace(config, candidates=BACKENDS)
    table = Table("backend", "isolation", "works here", "why not")
    for status in Sandbox.survey(config):
        table.add_row(
            status.name,
            status.isolation.name.lower(),
            "yes" if status.available else "no",
            status.reason,
        )
    Console().print(table)
    try:
        chosen = Sandbox.probe(config)
    except SandboxUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"sandbox: {chosen.name} ({chosen.isolation.name.lower()} isolation)")


@sandbox_app.command("status")
def status_command(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print the measured table as a markdown page")
    ] = False,
) -> None:
    """Measure which guarantees each backend available here gives, by running attacks.

    Every backend that works on this host (the opt-in ones included) runs a few
    probes per guarantee class (a few seconds each); nothing is taken on trust.
    """
    import platform

    from bastion.safety.sandbox import Sandbox, SandboxConfig
    from bastion.safety.sandbox.cgroups import Layout
    from bastion.safety.sandbox.guarantees import NOT_ISOLATED, measure, to_markdown
    from bastion.safety.sandbox.service import BACKENDS, build_backend

    config = dataclasses.replace(SandboxConfig.from_settings(Settings()), candidates=BACKENDS)
    measured = {}
    for status in Sandbox.survey(config):
        if status.available:
            measured[status.name] = measure(Sandbox(build_backend(status.name, config), config))
        elif not markdown:
            print(f"{status.name}: not available here ({status.reason})", file=sys.stderr)
    if not measured:
        print("error: no sandbox backend works here", file=sys.stderr)
        raise typer.Exit(1)
    if markdown:
        host = (
            f"Linux {platform.release()} ({platform.machine()}), "
            f"cgroup v{Layout().version}, backends: {', '.join(measured)}"
        )
        sys.stdout.write(to_markdown(host, measured))
        return
    console = Console()
    table = Table("guarantee", *measured)
    first = next(iter(measured.values()))
    for row, guarantee in enumerate(first):
        cells = [
            "[green]holds[/]" if checks[row].holds else "[red]does not hold[/]"
            for checks in measured.values()
        ]
        table.add_row(guarantee.title, *cells)
    console.print(table)
    for name, checks in measured.items():
        console.print(f"[bold]{name}[/]")
        for guarantee in checks:
            mark = "holds" if guarantee.holds else "DOES NOT HOLD"
            console.print(f"  {mark:>13}  {guarantee.title}: {guarantee.evidence}", highlight=False)
        for line in NOT_ISOLATED.get(name, ()):
            console.print(f"  not isolated  {line}", highlight=False)


@sandbox_app.command("run")
def run_command(code: Annotated[str, typer.Argument(help="Python code to run isolated")]) -> None:
    """Run a Python snippet in the sandbox and print its outcome and output."""
    from bastion.safety.sandbox import Sandbox, SandboxConfig, SandboxUnavailable

    try:
        sandbox = Sandbox.probe(SandboxConfig.from_settings(Settings()))
    except SandboxUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    result = sandbox.run(sandbox.python(code))
    sys.stdout.write(result.text())
    print(
        f"[{result.backend}] outcome={result.outcome} exit={result.exit_code} "
        f"wall={result.wall_seconds * 1000:.0f}ms {result.detail}".rstrip(),
        file=sys.stderr,
    )
    raise typer.Exit(0 if result.ok else 1)
