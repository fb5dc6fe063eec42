# blindperso — see README.md. Every target works on a fresh Debian 12
# machine: the ones that need system packages install them first (make deps).

GO      ?= go
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the build, the tests and the demo need.
DEBS    := gcc pkg-config libpcsclite-dev pcscd vsmartcard-vpcd opensc \
           softhsm2 libnss3 libnss3-tools opencryptoki openssl util-linux mount postgresql-15 curl \
           libp11-kit-dev
FUZZTIME ?= 10s

.PHONY: all deps build test vet fuzz demo bench clean

all: build

## deps: install the Debian packages that are missing (idempotent; root or sudo)
deps:
	@missing=$$(for p in $(DEBS); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# opencryptoki's clients must be in group pkcs11 (its package makes the
	@# group and adds root; a user who installs with sudo is added here, from
	@# the next login on). The tests run its token in a private mount
	@# namespace (hsm/hsmtest), which needs root.
	@getent group pkcs11 >/dev/null || $(SUDO) groupadd --system pkcs11
	@u=$$(id -un); id -nG "$$u" | tr ' ' '\n' | grep -qx pkcs11 || { \
		echo "adding $$u to group pkcs11 (for opencryptoki; effective at the next login)"; \
		$(SUDO) usermod -a -G pkcs11 "$$u"; }

## build: bin/issuer, bin/perso, bin/vcard, bin/insider (an attack tool for the demo),
## and bin/libp11fault.so (the fault-injecting PKCS#11 module of the tests: p11fault/)
build: bin/libp11fault.so
	$(GO) build -o bin/ ./cmd/issuer ./cmd/perso ./cmd/vcard ./cmd/insider ./cmd/receiver

# The types come from p11-kit's pkcs11.h (Debian's libp11-kit-dev); hsm/hsmtest
# compiles the same way when this file is missing or older than the source.
bin/libp11fault.so: p11fault/p11fault.c
	@mkdir -p bin
	$(CC) -shared -fPIC -O2 -Wall -Werror -fvisibility=hidden \
		$$(pkg-config --cflags p11-kit-1 2>/dev/null || echo -I/usr/include/p11-kit-1) \
		-o $@ p11fault/p11fault.c -ldl -lpthread

vet:
	$(GO) vet ./...

## test: every test (real pcscd, vpcd, virtual cards), then a short fuzz run
test: deps build vet
	$(GO) test -count=1 ./...
	$(MAKE) fuzz

fuzz:
	$(GO) test ./card -run '^$$' -fuzz FuzzTransmit -fuzztime $(FUZZTIME) -fuzzminimizetime 1s
	$(GO) test ./batch -run '^$$' -fuzz FuzzParseRecord -fuzztime $(FUZZTIME) -fuzzminimizetime 1s

## demo: the main job end to end, then the active insider (Fig. 2); artifacts in demo-out/.
## Settings from the environment or the command line, e.g. make demo DEMO_TOKEN=nss
## (NSS softokn, rsa-raw-sha1), DEMO_CARDS=20, DEMO_ATTACKED=3: see scripts/demo.sh --help.
demo: deps build
	./scripts/demo.sh

## bench: benchmarks with their in-run baselines; see docs/BENCHMARKS.md
bench: deps
	$(GO) test -run '^$$' -bench . -benchtime 2s ./internal/pcscd ./card ./hsm
	$(GO) test -run '^$$' -bench 'CardAlone|StationLocal' -benchtime 1000x ./perso
	$(GO) test -run '^$$' -bench StationPCSC -benchtime 10x ./perso
	$(GO) test -run '^$$' -bench 'IssuerImport$$' -benchtime 8000x ./issuer
	$(GO) test -run '^$$' -bench IssuerImportAttested -benchtime 8000x ./issuer
	$(GO) test -run '^$$' -bench Check -benchtime 5000x ./attest
	$(GO) test -run '^$$' -bench IssuerVerify -benchtime 20000x ./issuer
	$(GO) test -run '^$$' -bench APILoad -benchtime 20000x -timeout 30m ./issuer/server
	$(GO) test -run '^$$' -bench KEKRotate -benchtime 8000x ./issuer
	$(GO) test -run '^$$' -bench 'BenchmarkExport$$' -benchtime 8000x ./issuer
	$(GO) test -run '^$$' -bench PGThreeInstances -benchtime 3000x ./issuer
	$(GO) test -run '^$$' -bench GroupImport -benchtime 12000x ./issuer
	$(GO) test -run '^$$' -bench IssuerNaive -benchtime 1x ./issuer
	@echo 'the 100k/1M-record import: BLINDPERSO_BENCH_BIG=1 $(GO) test -run ^$$ -bench IssuerImportBig -benchtime 1x -timeout 60m ./issuer'
	@echo 'the 1M-verification soak of issuer serve (RSS flat): BLINDPERSO_BENCH_SOAK=1 $(GO) test -run TestServeSoak -v -timeout 180m ./e2e'

clean:
	rm -rf bin demo-out
