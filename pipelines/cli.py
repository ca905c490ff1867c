"""`llmopt run | validate | verify | promote | pull | compare`: exit 0 on success, 2 on bad input
(nothing written), 1 when a stage fails, a bundle or a download does not verify, or gates fail."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path

from llmopt.errors import RecipeError, StageError

EXIT_BAD_INPUT = 2
EXIT_STAGE_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except RecipeError as e:  # one line per problem (a recipe's schema errors all at once)
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageError as e:
        print(f"error: {e}" + (f" (log: {e.log_file})" if e.log_file else ""), file=sys.stderr)
        return EXIT_STAGE_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmopt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('llmopt')}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a recipe (name in recipes/ or a path to a YAML file)")
    run.add_argument("recipe")
    force = run.add_mutually_exclusive_group()
    force.add_argument("--force", action="store_true", help="recompute every stage, ignoring cached outputs")
    force.add_argument("--force-stage", metavar="NAME", help="recompute this stage and every stage after it")
    run.add_argument("--cache-dir", type=Path, help="stage cache (default: $LLMOPT_CACHE_DIR or .cache/llmopt)")
    run.add_argument("--mlruns", type=Path, help="local MLflow store (default: $LLMOPT_MLRUNS_DIR or mlruns)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(command=_run)

    validate = commands.add_parser(
        "validate", help="check recipes without running them (default: all in recipes/); exit 2 on an invalid one, "
        "a note for one this machine cannot run")
    validate.add_argument("recipes", nargs="*")
    validate.set_defaults(command=_validate)

    verify = commands.add_parser(
        "verify", help="check a TensorRT-LLM bundle: every file against its manifest's sha256, the checkpoint "
        "schemas, and whether this machine can load it; exit 1 when the bundle is damaged")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--require-loadable", action="store_true",
                        help="also exit 1 when this machine cannot load the bundle")
    verify.set_defaults(command=_verify)

    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--mlruns", type=Path, help="local MLflow store (default: $MLFLOW_TRACKING_URI, else "
                       "$LLMOPT_MLRUNS_DIR or mlruns)")
    promote = commands.add_parser("promote", parents=[store], help="re-check a registered version's gates and move "
                                  "an alias to it")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    promote.add_argument("--force", action="store_true", help="move the alias although gates fail (needs --reason)")
    promote.add_argument("--reason", help="why the gates are overridden (recorded on the version)")
    promote.set_defaults(command=_promote)

    pull = commands.add_parser("pull", parents=[store], help="download a registered version (NAME@ALIAS or "
                               "NAME/VERSION) and verify every file's sha256")
    pull.add_argument("ref")
    pull.add_argument("--dest", type=Path, required=True)
    pull.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    pull.set_defaults(command=_pull)

    compare = commands.add_parser("compare", parents=[store], help="the latest run of each recipe side by side, "
                                  "and a Pareto plot of quality against latency")
    compare.add_argument("recipes", nargs="*", help="recipe names (MLflow experiments); default: all")
    compare.add_argument("--out", type=Path, default=Path("compare"), help="where the table and plot go")
    compare.set_defaults(command=_compare)
    return parser


def _tracker(args: argparse.Namespace):
    from llmopt.tracking import Tracker, check_reachable

    tracker = Tracker(args.mlruns)
    try:
        check_reachable(tracker.uri)
    except ConnectionError as e:
        raise RecipeError(str(e)) from None
    return tracker


def _promote(args: argparse.Namespace) -> int:
    from llmopt import registry

    try:
        registry.check_promotion_alias(args.alias)
    except ValueError as e:
        raise RecipeError(f"--alias: {e}") from None
    if args.force and not args.reason:
        raise RecipeError("--force needs --reason: say why the gates are overridden (it is recorded on the version)")
    tracker = _tracker(args)
    try:
        registry.resolve(tracker, f"{args.name}/{args.version}")
    except ValueError as e:
        raise RecipeError(str(e)) from None
    failed = registry.promote_version(tracker, args.name, args.version, args.alias, args.force, args.reason)
    if failed and not args.force:
        print(f"not promoted: {args.name} version {args.version} fails its gates: " + "; ".join(failed))
        return EXIT_STAGE_FAILED
    forced = f" (forced past: {'; '.join(failed)})" if failed else ""
    print(f"{args.name}@{args.alias} -> version {args.version}{forced}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from llmopt import registry

    tracker = _tracker(args)
    try:
        mv, problems = registry.pull(tracker, args.ref, args.dest, args.overwrite)
    except (ValueError, FileExistsError) as e:
        raise RecipeError(f"pull {args.ref}: {e}") from None
    if problems:
        print(f"REFUSED  {args.ref} (version {mv.version}): the download does not match its manifest")
        for problem in problems:
            print(f"    {problem}")
        return EXIT_STAGE_FAILED
    print(f"{args.ref} -> version {mv.version} in {args.dest}: every file matches its sha256 "
          f"(card: {args.dest / registry.CARD})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from llmopt.compare import compare

    tracker = _tracker(args)
    try:
        table, plot = compare(tracker, args.recipes, args.out)
    except ValueError as e:
        raise RecipeError(f"compare: {e}") from None
    print(table)
    print(f"table: {args.out / 'compare.md'}; Pareto plot: {plot}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from llmopt.export import manifest

    if not args.bundle.is_dir():
        raise RecipeError(f"{args.bundle}: no such directory")
    report = manifest.verify(args.bundle)
    if report.structure:
        print(f"DAMAGED  {args.bundle}")
        for problem in report.structure:
            print(f"    {problem}")
        return EXIT_STAGE_FAILED
    print(f"ok  {args.bundle}: {report.files} files match the manifest's sha256; checkpoint schema ok")
    if report.environment:
        print("    cannot load on this machine: " + "; ".join(report.environment))
        return EXIT_STAGE_FAILED if args.require_loadable else 0
    print("    loadable on this machine")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from llmopt.recipe import default_recipes_dir, find_recipe, load_recipe

    paths = [find_recipe(r) for r in args.recipes] or sorted(default_recipes_dir().glob("*.yaml"))
    if not paths:
        raise RecipeError(f"no recipes found in {default_recipes_dir()}")
    from llmopt.validate import check_machine, check_recipe, offline_models

    for path in paths:
        recipe = load_recipe(path)
        check_recipe(recipe, path)
        print(f"ok  {path}  ({recipe.name}: {' -> '.join(s.name for s in recipe.stages)})")
        notes = offline_models(recipe)
        try:  # a recipe written for another machine (GPUs, extras, the hub) is valid, just not runnable here
            check_machine(recipe, path)
        except RecipeError as e:
            notes.insert(0, str(e).removeprefix(f"{path}: "))
        for note in notes:
            print(f"    not runnable on this machine: {note}")
    return 0


NOT_A_TERMINAL_WIDTH = 1000  # columns for output to a file or pipe: tables keep one row per line


def run_console():
    """rich's console for `run`'s output: a terminal's own width; written to a file or a pipe (CI logs,
    `| tee`), $COLUMNS if set, else wide enough that no table wraps (rich would take 80)."""
    from rich.console import Console

    columns = os.environ.get("COLUMNS", "")
    return Console(width=None if sys.stdout.isatty() or columns.isdigit() else NOT_A_TERMINAL_WIDTH)


def _run(args: argparse.Namespace) -> int:
    from llmopt.cache import default_cache_dir
    from llmopt.recipe import find_recipe, load_recipe

    path = find_recipe(args.recipe)
    recipe = load_recipe(path)
    if args.force_stage and args.force_stage not in {s.name for s in recipe.stages}:
        names = ", ".join(s.name for s in recipe.stages)
        raise RecipeError(f"{path}: --force-stage {args.force_stage!r} is not a stage of this recipe (stages: {names})")

    from llmopt.report import print_stage, print_summary
    from llmopt.runner import run_recipe
    from llmopt.validate import preflight

    preflight(recipe, path)
    if args.mlruns is None and os.environ.get("MLFLOW_TRACKING_URI"):  # a server: it must answer before any work
        from llmopt.tracking import check_reachable

        try:
            check_reachable(os.environ["MLFLOW_TRACKING_URI"])
        except ConnectionError as e:
            raise RecipeError(str(e)) from None

    console = run_console()
    console.print(f"[bold]llmopt[/] run [cyan]{recipe.name}[/] ({path})")
    summary = run_recipe(
        recipe, path, args.cache_dir or default_cache_dir(), args.mlruns, force=args.force,
        force_stage=args.force_stage, progress=not args.no_progress,
        on_stage=lambda outcome: print_stage(console, outcome),
    )
    print_summary(console, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
