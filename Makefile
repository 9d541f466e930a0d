# Familiar entry points for operators of the Go GateSvr; each is a thin
# wrapper over cargo or a script in this repo.
.PHONY: build run test verify fix bench certs docker fmt lint clean help

help:
	@echo "build   release binaries (gatesvr, gatectl, gate-client, gate-upstream)"
	@echo "run     gatesvr dev: the whole system on this machine"
	@echo "test    every test (scripts/test)"
	@echo "verify  what CI runs: fmt check, clippy, tests (.ci/run)"
	@echo "fix     cargo fmt + clippy --fix"
	@echo "bench   gate-bench scenarios (see docs/benchmarks.md)"
	@echo "certs   dev CA, server and role certificates (spiffe://gatesvr/<role>/<id>) in certs/dev"
	@echo "docker  build the container image (deploy/build-image.sh)"
	@echo "clean   cargo clean and the dev data directory"

# The shipped binaries only (not --workspace: the tests crate turns on the data plane's
# and the SDK's test-hooks feature for every package built with it).
build:
	cargo build --release --bins -p gatesvr -p gatesvr-controlplane -p gate-upstream -p gatesvr-sdk -p gate-bench

run:
	cargo run --release --bin gatesvr -- dev

test:
	scripts/test

verify:
	.ci/run

fix:
	cargo fmt --all
	cargo clippy --workspace --all-targets --fix --allow-dirty -- -D warnings

bench:
	cargo run --release --bin gate-bench -- all

certs:
	cargo run --release --bin gatesvr -- certs --out certs/dev

docker:
	deploy/build-image.sh

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean
	rm -rf .gatesvr-dev
