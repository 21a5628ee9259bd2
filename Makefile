# The two commands of the README do all set-up on a fresh machine:
#   make demo   - run the embedded demo kernel, then two of it connected (ping-pong,
#                 grants, timer: examples/pingpong.toml), then the device models
#                 (examples/devices.toml)
#   make test   - run the whole test suite on real KVM
.PHONY: setup demo test bench lint

GUEST_TARGET := x86_64-unknown-none

setup:
	@rustup target list --installed | grep -qx $(GUEST_TARGET) || rustup target add $(GUEST_TARGET)

demo: setup
	cargo run --release -p hv-core --bin hv -- run
	cargo run --release -p hv-core --bin hv -- run --config examples/pingpong.toml
	cargo run --release -p hv-core --bin hv -- run --config examples/devices.toml

test: setup
	cargo test --release --no-fail-fast

bench: setup
	cargo run --release -p hv-core --bin hv -- bench

lint: setup
	cargo fmt --all -- --check
	cargo clippy --release --all-targets -- -D warnings
	cargo clippy --release -p guest-kernel-demo -p test-guest --target $(GUEST_TARGET) -- -D warnings
