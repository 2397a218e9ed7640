from flywheel.cli.main import app

app()
