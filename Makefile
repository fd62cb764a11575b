# blockhorn — `make demo`, `make test`, `make bench` each run `make setup` first.
# setup is idempotent: apt packages are installed only when missing (one apt-get update),
# the venv is built with Debian's python3 (the interpreter nbdkit embeds) so the plugin and
# the CLI share one set of dependencies. libfuse3-dev, pkg-config, gcc and patch build pyfuse3
# from its sdist plus patches/pyfuse3-fallocate.patch (scripts/setup.sh).

PY_SYS   := /usr/bin/python3
VENV     := .venv
PY       := $(VENV)/bin/python
APT_PKGS := nfs-ganesha nfs-ganesha-vfs libnfs-utils \
            nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd nbd-client fuse3 \
            e2fsprogs fio util-linux python3 python3-venv python3-dev systemd procps psmisc \
            libfuse3-dev pkg-config gcc patch mount iproute2 etcd-server etcd-client rpcbind \
            python3-cryptography openssl qemu-system-x86
STAMP    := $(VENV)/.setup-stamp

.PHONY: setup demo demo-cluster test bench fuzz lint clean vm

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh patches/pyfuse3-fallocate.patch
	APT_PKGS="$(APT_PKGS)" PY_SYS="$(PY_SYS)" VENV="$(VENV)" bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

# Many hosts on one machine (root): namespace hosts with node daemons on etcd, one volume
# across them, a host killed, the volume healthy again (README, "Many hosts").
demo-cluster: setup
	$(PY) scripts/demo_cluster.py

# The real-kernel tier (tests/t7_vm_*.py, pytest marker `vm`) boots QEMU guests with Debian's
# kernel built by `make vm`; `make test VM=0` skips it (and the image build).
VM ?= 1
# Test files run PYTEST_JOBS at a time (pytest-xdist; a file's tests stay together in one
# worker, so a module's cluster site or VM image is set up once). Most tests wait on leases,
# timeouts and processes rather than compute: two at once on this 2-core machine took the
# suite from 27 to 16 min. Every test makes its own names, ports, namespaces and homes, so
# files never meet. PYTEST_JOBS=0: one at a time, in one process.
PYTEST_JOBS ?= 2
test: setup lint $(if $(filter 0,$(VM)),,vm)
	$(VENV)/bin/pytest -q -ra --durations=25 -n $(PYTEST_JOBS) --dist loadfile \
	    $(if $(filter 0,$(VM)),-m "not vm",) $(PYTEST_ARGS)

# The guest kernel + initramfs under .vm/, from Debian packages (apt-get download, unpacked,
# never installed). Idempotent: a stamp skips it when built (no network at test time).
vm:
	$(PY_SYS) scripts/build_vm.py

lint: setup
	$(VENV)/bin/ruff check blockhorn tests scripts
	$(VENV)/bin/mypy blockhorn

bench: setup
	$(PY) scripts/bench.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_snapshots.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_failover.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_verify.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_frames.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_transport.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_backup.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_resync.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_engine_survival.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_vm.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_scheduler.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_faults.py $(if $(QUICK),--quick,)
	$(PY) scripts/bench_cluster.py $(if $(QUICK),--quick,)

# The fuzz tests of `make test` (tests/t0_proto_fuzz.py, tests/t2_replica_fuzz.py), run longer.
FUZZ_EXAMPLES ?= 5000
fuzz: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q -ra -p no:cacheprovider \
	    tests/t0_proto_fuzz.py tests/t2_replica_fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .vm
