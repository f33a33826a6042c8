.PHONY: setup demo test lint typecheck unit bench clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

lint: setup
	.venv/bin/ruff format --check src tests bench
	.venv/bin/ruff check src tests bench

typecheck: setup
	.venv/bin/mypy

unit: setup
	.venv/bin/pytest -q

test: lint typecheck unit

bench: setup
	.venv/bin/python bench/run.py

clean:
	rm -rf .venv .demo bench/out
