from barge.cli import run

run()
