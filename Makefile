.PHONY: setup demo test lint typecheck unit bench fuzz soak clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

lint: setup
	.venv/bin/ruff format --check src tests bench scripts/build-guest.py scripts/guest_debian.py
	.venv/bin/ruff check src tests bench scripts/build-guest.py scripts/guest_debian.py

typecheck: setup
	.venv/bin/mypy
	.venv/bin/mypy --strict scripts/build-guest.py scripts/guest_debian.py

unit: setup
	.venv/bin/pytest -q

test: lint typecheck unit

bench: setup
	.venv/bin/python bench/run.py

# Thousands of generated pull cases (tests/test_pull_differential.py); not part of `make test`.
# BARGE_FUZZ_EXAMPLES sets the count (default 3000); a failure prints its reproduction blob.
fuzz: setup
	BARGE_FUZZ=1 .venv/bin/pytest -q --timeout=0 --hypothesis-show-statistics \
		tests/test_pull_differential.py -k generated

# the reliability suite in full (tests/test_soak.py; `make test` runs its short form):
# BARGE_SOAK_SEED=N replays a run
soak: setup
	BARGE_SOAK=full .venv/bin/pytest -q -rxs -p no:cacheprovider tests/test_soak.py

clean:
	rm -rf .venv .demo bench/out
