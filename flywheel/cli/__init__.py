"""The `flywheel` command line: one typer app (`flywheel.cli.main.app`), one module per stage registered on it with
`add_typer` (`system`, `fleet`, `ingest`, `shadow`, `sql`, `retrain`, `jobs`, `models`); `common` holds what they
share (the console, the effective settings). Stage modules never import `main`, so there is no import circle."""
