#!/usr/bin/env bash
# make demo: the main job end to end, then the active insider of the
# paper's Fig. 2, on embedded defaults. Everything it makes stays in
# DEMO_OUT (demo-out/).
#
#  1. Issuer: a throwaway token in demo-out/token — SoftHSM2 by default, an
#     NSS softokn database with --nss — and the example key ceremony run on
#     it (issuer keys, KEK and a transcript signed in the token; verified).
#  2. Card bureau: a private pcscd with vsmartcard's vpcd driver and its
#     two readers; DEMO_CARDS blank virtual cards fed into them by two
#     feeders; the perso station personalizes them over both readers under
#     the issuer public key (live display on a terminal, a line per card
#     otherwise) and writes the batch (Id, c) and its manifest.
#  3. Issuer: the service (TLS, bearer tokens stored hashed, SQLite store)
#     imports the batch the station uploads — the token derives and wraps
#     every K_I in-token — and then authenticates every card through its
#     API: challenge, the card's AES-CMAC, verified in the token.
#     Every card is attested (docs/PROTOCOL.md §10): a test chip vendor's
#     CA (vcard chip-ca) certified its attestation key at manufacture, the
#     ceremony records the vendor's root, and the service imports only
#     records whose chip attestation verifies (--attestation required).
#  4. Active insider (paper Fig. 2): a station that sends DEMO_ATTACKED
#     more cards its own key PK′, re-encrypts what it learns under the
#     genuine PK and uploads a batch that looks genuine. The chips signed
#     the key they were given: the issuer refuses every record at import,
#     "personalized under another issuer key".
#  5. Active insider, record replacement and injection: the station
#     personalizes two more cards; the insider replaces one's record by
#     (Id, c*) for an emulated clone whose K* she knows (insider clone) and
#     injects a record for an Id no chip carries. The issuer refuses both at
#     import ("the record was replaced", "requires one"); the other card
#     lands. The clone gets no challenge.
#  6. A summary table. The script exits non-zero unless every honest card
#     authenticated and every attack was caught at import.
#
# K_I exists only in the cards (their state files) and inside the token:
# the e2e test (e2e/demo_test.go) searches every other file of the run.
#
# Usage: scripts/demo.sh [--nss]
# Settings (environment):
#   DEMO_TOKEN     softhsm2 (default) or nss (same as --nss): NSS softokn
#                  with the paper-exact SHA-1 profile rsa-raw-sha1 and
#                  examples/ceremony-nss.yaml
#   DEMO_CARDS     honest cards (20)       DEMO_ATTACKED  attacked cards (3)
#   DEMO_PROFILE   softhsm2: rsa-oaep-aes (or ecdh-p256-aes);
#                  nss: rsa-raw-sha1 (or rsa-oaep-sha1, ecdh-p256-x963,
#                  rsa-oaep-kbkdf, ecdh-p256-kbkdf)
#   DEMO_OUT       output directory (demo-out), emptied first
#   BIN            directory of the issuer, perso, vcard, insider binaries (bin)
#   DEMO_TIMEOUT   longest run of one station, in seconds (120)
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$(date +%s.%N)
token_kind=${DEMO_TOKEN:-softhsm2}
for arg in "$@"; do
	case $arg in
	--nss) token_kind=nss ;;
	--softhsm2) token_kind=softhsm2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
	esac
done
cards=${DEMO_CARDS:-20}
attacked=${DEMO_ATTACKED:-3}
out=${DEMO_OUT:-demo-out}
bin=$(cd "${BIN:-bin}" 2>/dev/null && pwd) || bin=${BIN:-bin}
for c in issuer perso vcard insider; do
	[ -x "$bin/$c" ] || { echo "demo.sh: no $bin/$c: run make build (make demo does)" >&2; exit 1; }
done
station_timeout=${DEMO_TIMEOUT:-120}
max_failures=3 # the issuer blocks a card after this many failures in a row
for n in "$cards" "$attacked" "$station_timeout"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "demo.sh: DEMO_CARDS, DEMO_ATTACKED and DEMO_TIMEOUT must be positive integers" >&2; exit 2; }
done

# Token family → ceremony script, default profile, and which of the
# ceremony's keys serves the profile.
case $token_kind in
softhsm2)
	ceremony_script=examples/ceremony-softhsm2.yaml
	profile=${DEMO_PROFILE:-rsa-oaep-aes}
	kek=kek-2026
	case $profile in
	rsa-oaep-aes) key=issuer-2026-rsa kind=rsa2048 ;;
	ecdh-p256-aes) key=issuer-2026-ec kind=p256 ;;
	*) echo "demo.sh: SoftHSM2 runs rsa-oaep-aes and ecdh-p256-aes in-token, not $profile (try --nss)" >&2; exit 2 ;;
	esac
	;;
nss)
	ceremony_script=examples/ceremony-nss.yaml
	profile=${DEMO_PROFILE:-rsa-raw-sha1}
	kek=kek-2026-nss
	case $profile in
	rsa-raw-sha1 | rsa-oaep-sha1 | rsa-oaep-kbkdf) key=issuer-2026-nss-rsa kind=rsa2048 ;;
	ecdh-p256-x963 | ecdh-p256-kbkdf) key=issuer-2026-nss-ec kind=p256 ;;
	*) echo "demo.sh: $ceremony_script makes keys for rsa-raw-sha1, rsa-oaep-sha1, rsa-oaep-kbkdf, ecdh-p256-x963 and ecdh-p256-kbkdf, not $profile" >&2; exit 2 ;;
	esac
	;;
*) echo "demo.sh: DEMO_TOKEN must be softhsm2 or nss, got $token_kind" >&2; exit 2 ;;
esac

rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
mkdir -p "$out/logs" "$out/api" "$out/station" "$out/insider" "$out/cards" "$out/clone"
# pcscd's socket path must stay short (sun_path is 108 bytes).
pcdir=$(mktemp -d /tmp/bp-pcscd.XXXXXX)
pids=() # every background process, for the trap
cleanup() {
	local rc=$?
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	cp "$pcdir"/*.log "$out/logs/" 2>/dev/null || true
	rm -rf "$pcdir"
	if [ "$rc" != 0 ]; then
		echo "demo.sh: failed (exit $rc); logs in $out/logs" >&2
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for PID...: wait for background processes that should end on their
# own (card feeders), killing them after 15 s.
wait_for() {
	local p
	for _ in $(seq 150); do
		for p in "$@"; do kill -0 "$p" 2>/dev/null && break; done
		kill -0 "$p" 2>/dev/null || break
		sleep 0.1
	done
	for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

# feed LOGNAME CARD...: feed the cards into the two readers, alternately,
# with one feeder per reader; the feeders' PIDs go to $feeders.
feed() {
	local name=$1 i
	shift
	local even=() odd=()
	for ((i = 1; i <= $#; i++)); do
		if ((i % 2)); then even+=("${!i}"); else odd+=("${!i}"); fi
	done
	feeders=()
	"$bin/vcard" feed --reader "$addr0" "${even[@]}" 2>"$out/logs/feed-$name-0.log" &
	feeders+=($!)
	pids+=($!)
	if [ ${#odd[@]} -gt 0 ]; then
		"$bin/vcard" feed --reader "$addr1" "${odd[@]}" 2>"$out/logs/feed-$name-1.log" &
		feeders+=($!)
		pids+=($!)
	fi
}

# api METHOD PATH ROLE: a request to the issuer API with ROLE's bearer
# token (read by curl from a header file, never on a command line).
api() {
	curl -fsS --cacert "$out/api/server.pem" -H @"$out/api/$3.header" -X "$1" "$url$2"
}

# json_field FIELD: the first "FIELD": value of the (indented) JSON on
# stdin. (No "| head" after a producer anywhere: with pipefail, its
# SIGPIPE would fail the script.)
json_field() {
	sed -n -E "/\"$1\": */{s/.*\"$1\": *(\"([^\"]*)\"|([^,}]*)).*/\2\3/p;q}"
}

echo "== issuer: $token_kind token in $out/token, keys generated in it"
mkdir -p "$out/token"
case $token_kind in
softhsm2)
	mkdir -p "$out/token/objects"
	sed "s|@TOKENDIR@|$out/token/objects|" softhsm-config/softhsm2.conf.in >"$out/token/softhsm2.conf"
	export SOFTHSM2_CONF="$out/token/softhsm2.conf"
	# Demo PINs; a real ceremony reads them from the operators.
	printf 'demo-user-pin' >"$out/token/user.pin"
	printf 'demo-so-pin' >"$out/token/so.pin"
	softhsm2-util --init-token --free --label blindperso-demo \
		--pin "$(cat "$out/token/user.pin")" --so-pin "$(cat "$out/token/so.pin")" >/dev/null
	export BLINDPERSO_TOKEN="pkcs11:token=blindperso-demo?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:$out/token/user.pin"
	export BLINDPERSO_SO_PIN_FILE="$out/token/so.pin"
	;;
nss)
	# An NSS softokn database with an empty password: its "NSS Certificate
	# DB" token needs no login (docs/HSM.md).
	certutil -N -d "sql:$out/token" --empty-password
	nss_module=
	for m in /usr/lib/*/libsoftokn3.so /usr/lib/libsoftokn3.so; do
		[ -e "$m" ] && { nss_module=$m; break; }
	done
	[ -n "$nss_module" ] || { echo "demo.sh: libsoftokn3.so not found (make deps installs libnss3)" >&2; exit 1; }
	export BLINDPERSO_TOKEN="pkcs11:token=NSS%20Certificate%20DB?module-path=$nss_module&x-nss-configdir=$out/token"
	;;
esac
# The probe, then the PIN-holder matrix: throwaway keys made as the
# ceremony makes them, attacked with the user PIN (the SO PIN, where the
# token needs it, marks the throwaway KEK trusted as the ceremony does).
"$bin/issuer" probe ${BLINDPERSO_SO_PIN_FILE:+--so-pin-file "$BLINDPERSO_SO_PIN_FILE"} >"$out/probe.txt" 2>"$out/logs/probe.log"
pin_closed=$(sed -n 's/^closed \([0-9]*\) of \([0-9]*\).*/\1 of \2/p' "$out/probe.txt")
pin_open=$(sed -n 's/^open  \([^:]*\):.*/\1/p' "$out/probe.txt" | paste -sd, -)
if ! grep -q "^$profile .*runnable" "$out/probe.txt" || grep -q "^$profile .*not runnable" "$out/probe.txt"; then
	cat "$out/probe.txt"
	echo "demo.sh: profile $profile cannot run in-token on this $token_kind token" >&2
	exit 1
fi
echo "   probe: $(grep "^$profile " "$out/probe.txt" | sed -E 's/ +/ /')"

echo "== chip vendor: a test CA (root and intermediate) that certifies each chip's attestation key at manufacture"
"$bin/vcard" chip-ca init --out "$out/chip-vendor" >"$out/chip-vendor.txt"
sed 's/^/   /' "$out/chip-vendor.txt"

echo "== key ceremony: $ceremony_script, trusting the chip vendor's root for attestation"
export CEREMONY_OUT="$out/ceremony"
{ cat "$ceremony_script"; printf '\nchip-attestation:\n  roots: %s\n' "$out/chip-vendor/root.pem"; } >"$out/ceremony.yaml"
"$bin/issuer" ceremony run "$out/ceremony.yaml" >"$out/logs/ceremony.log" 2>&1 ||
	{ cat "$out/logs/ceremony.log"; exit 1; }
tkey=$(sed -n 's/.*signing key sha256 \([0-9a-f]\{64\}\).*/\1/p' "$out/logs/ceremony.log" | tail -1)
"$bin/issuer" ceremony verify --expect-key-fingerprint "$tkey" "$out/ceremony/transcript.json" >"$out/ceremony/verify.txt" 2>&1 ||
	{ cat "$out/ceremony/verify.txt"; exit 1; }
sed 's/^/   /' "$out/ceremony/verify.txt"
cp "$out/ceremony/$key.pub.pem" "$out/issuer.pub.pem"
fp=$("$bin/issuer" fingerprint "$out/issuer.pub.pem")
echo "   issuer key $key ($kind) sha256 $fp; KEK $kek; profile $profile"

echo "== card bureau: private pcscd with two vpcd readers"
"$bin/vcard" pcscd --dir "$pcdir" >"$out/logs/pcscd.out" 2>&1 &
pids+=($!)
for _ in $(seq 200); do grep -q '^slot 1' "$out/logs/pcscd.out" && break; sleep 0.1; done
grep -q '^slot 1' "$out/logs/pcscd.out" || { cat "$out/logs/pcscd.out"; exit 1; }
export "$(head -1 "$out/logs/pcscd.out")" # PCSCLITE_CSOCK_NAME=…
addr0=$(awk '/^slot 0:/ {print $3}' "$out/logs/pcscd.out")
addr1=$(awk '/^slot 1:/ {print $3}' "$out/logs/pcscd.out")
reader0=$(sed -n 's/^slot 0: [^ ]* "\(.*\)"$/\1/p' "$out/logs/pcscd.out")
reader1=$(sed -n 's/^slot 1: [^ ]* "\(.*\)"$/\1/p' "$out/logs/pcscd.out")
echo "   \"$reader0\" (vpcd $addr0), \"$reader1\" (vpcd $addr1); $PCSCLITE_CSOCK_NAME"

echo "== $cards blank virtual cards, fed into both readers"
"$bin/vcard" manufacture --dir "$out/cards/honest" --count "$cards" --first-id B100000000000001 --chip-ca "$out/chip-vendor" >/dev/null
honest=("$out"/cards/honest/*.json)
feed honest "${honest[@]}"

echo "== perso station: $profile over both readers (progress below; log $out/logs/perso.log)"
t1=$(date +%s.%N)
timeout --foreground --signal=INT "$station_timeout" "$bin/perso" run --issuer-key "$out/issuer.pub.pem" --profile "$profile" \
	--expect-fingerprint "$fp" --reader "$reader0" --reader "$reader1" --count "$cards" \
	--batch "$out/station/batch.ndjson" --station demo-station --progress on --log "$out/logs/perso.log"
wait_for "${feeders[@]}"
personalized=$(grep -c . "$out/station/batch.ndjson" || true)
echo "   $personalized cards locked in $(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s;" \
	"batch $out/station/batch.ndjson, manifest beside it"
head -4 "$out/station/batch.ndjson" | sed -E 's/.*"id":"([^"]+)","c":"([^"]+)".*"reader":"([^"]+)".*/\1 \2 \3/' |
	awk '{ r = $0; sub(/^[^ ]+ [^ ]+ /, "", r)
		printf "   %s  c = %s…%s (%d bytes)  %s\n", $1, substr($2, 1, 16), substr($2, length($2) - 7), length($2) / 2, r }'
[ "$personalized" -gt 4 ] && echo "   … $((personalized - 4)) more"

echo "== issuer service: TLS, bearer tokens (stored hashed), SQLite store"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
	-keyout "$out/api/server.key" -out "$out/api/server.pem" -subj /CN=localhost \
	-addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
: >"$out/api/tokens"
for role in perso verifier admin; do
	head -c 32 /dev/urandom | base64 >"$out/api/$role.token"
	printf 'Authorization: Bearer %s\n' "$(cat "$out/api/$role.token")" >"$out/api/$role.header"
	"$bin/issuer" serve token-hash --role "$role" <"$out/api/$role.token" >>"$out/api/tokens"
done
chmod 600 "$out"/api/*.token "$out"/api/*.header
for _ in 1 2 3 4 5; do
	port=$((20000 + RANDOM % 20000))
	url=https://127.0.0.1:$port
	"$bin/issuer" serve --addr "127.0.0.1:$port" --tls-cert "$out/api/server.pem" --tls-key "$out/api/server.key" \
		--tokens "$out/api/tokens" --key "$key" --kek "$kek" --db "$out/issuer-data" \
		--chip-roots "$out/ceremony/chip-roots.pem" --attestation required \
		--max-failures "$max_failures" 2>>"$out/logs/issuer-serve.log" &
	serve=$!
	for _ in $(seq 100); do
		curl -fsS --cacert "$out/api/server.pem" "$url/healthz" >/dev/null 2>&1 && break
		kill -0 "$serve" 2>/dev/null || break
		sleep 0.1
	done
	kill -0 "$serve" 2>/dev/null && break # else the port was taken: another one
done
kill -0 "$serve" 2>/dev/null || { cat "$out/logs/issuer-serve.log"; exit 1; }
pids+=($serve)
echo "   $url (key $key, KEK $kek, --max-failures $max_failures, --attestation required)"
if [ "$token_kind" = nss ]; then
	# NSS's database takes several processes at once (SoftHSM2's file
	# store does not: there, the service is the token's only process).
	"$bin/issuer" probe --no-attack >"$out/probe-while-serving.txt" 2>>"$out/logs/probe.log"
	echo "   NSS: the CLI opens the token while the service runs (issuer probe: ok)"
fi
echo "   the station uploads its batch"
"$bin/perso" upload --url "$url" --batch "$out/station/batch.ndjson" \
	--ca "$out/api/server.pem" --token-file "$out/api/perso.token" >"$out/api/import-station.json"
imported=$(json_field imported <"$out/api/import-station.json")
unattested=$(json_field unattested <"$out/api/import-station.json")
attested=$((imported - unattested))
echo "   $imported cards imported, $attested with a verified chip attestation: the token derived and wrapped each K_I in-token (report $out/api/import-station.json)"

echo "== issuer: authenticate every card through the API (challenge, card's MAC, verified in the token)"
"$bin/vcard" authenticate --issuer "$url" --ca "$out/api/server.pem" --token-file "$out/api/verifier.token" \
	"${honest[@]}" >"$out/api/auth-honest.txt" 2>>"$out/logs/auth.log" || true
ok=$(grep -c ' ok$' "$out/api/auth-honest.txt" || true)
head -4 "$out/api/auth-honest.txt" | sed 's/^/   /'
[ "$cards" -gt 4 ] && echo "   … $((cards - 4)) more (all in $out/api/auth-honest.txt)"
echo "   $ok of $cards cards authenticated"

echo "== active insider (paper Fig. 2): a station that sends $attacked more cards its own key PK′"
"$bin/vcard" manufacture --dir "$out/cards/attacked" --count "$attacked" --first-id A100000000000001 --chip-ca "$out/chip-vendor" >/dev/null
victims=("$out"/cards/attacked/*.json)
"$bin/insider" keygen --kind "$kind" --issuer-key "$out/issuer.pub.pem" \
	--out "$out/insider/attacker.pem" --pub-out "$out/insider/attacker.pub.pem" | sed 's/^/   /'
feed attacked "${victims[@]}"
timeout --foreground --signal=INT "$station_timeout" "$bin/insider" run --attacker-key "$out/insider/attacker.pem" \
	--issuer-key "$out/issuer.pub.pem" --profile "$profile" --reader "$reader0" --reader "$reader1" \
	--count "$attacked" --batch "$out/insider/batch.ndjson" --station demo-station --progress on \
	--log "$out/logs/insider.log"
wait_for "${feeders[@]}"
forged=$(grep -c . "$out/insider/batch.ndjson" || true)
case $profile in
ecdh-*) how="forwarded c′ (a Diffie-Hellman secret cannot be re-encrypted)" ;;
*) how="opened c′ with its key, re-encrypted S under PK" ;;
esac
echo "   $forged cards locked under PK′; the insider $how;"
echo "   its manifest names the genuine key: $(json_field issuer_fingerprint <"$out/insider/batch.ndjson.manifest.json")"
# The upload exits non-zero: the issuer rejects the records.
"$bin/perso" upload --url "$url" --batch "$out/insider/batch.ndjson" \
	--ca "$out/api/server.pem" --token-file "$out/api/perso.token" >"$out/api/import-insider.json" 2>>"$out/logs/upload.log" || true
imported_forged=$(json_field imported <"$out/api/import-insider.json")
substituted=$(grep -c 'personalized under another issuer key' "$out/api/import-insider.json" || true)
echo "   the issuer imports $imported_forged of them; $substituted refused at import, before any token work:"
grep -m1 '"reason"' "$out/api/import-insider.json" | sed -E 's/^ *"reason": "(.*)",?$/   \1/'

echo "== active insider: record replacement and injection (an emulated clone whose K* the insider knows)"
"$bin/vcard" manufacture --dir "$out/cards/clone-victims" --count 2 --first-id C100000000000001 --chip-ca "$out/chip-vendor" >/dev/null
cvictims=("$out"/cards/clone-victims/*.json)
feed clone "${cvictims[@]}"
timeout --foreground --signal=INT "$station_timeout" "$bin/perso" run --issuer-key "$out/issuer.pub.pem" --profile "$profile" \
	--expect-fingerprint "$fp" --reader "$reader0" --reader "$reader1" --count 2 \
	--batch "$out/clone/batch.ndjson" --station demo-station --progress off --log "$out/logs/perso-clone.log"
wait_for "${feeders[@]}"
mkdir -p "$out/cards/insider-clones"
"$bin/insider" clone --batch "$out/clone/batch.ndjson" --issuer-key "$out/issuer.pub.pem" --id c100000000000001 \
	--keep-attestation --card-out "$out/cards/insider-clones/card-C100000000000001.json" >"$out/clone/replace.txt" 2>>"$out/logs/insider.log"
"$bin/insider" clone --batch "$out/clone/batch.ndjson" --issuer-key "$out/issuer.pub.pem" --id c1000000000000ff \
	--inject --card-out "$out/cards/insider-clones/card-C1000000000000FF.json" >"$out/clone/inject.txt" 2>>"$out/logs/insider.log"
echo "   card c100000000000001's record replaced by (Id, c*), its chip's attestation kept; c1000000000000ff injected"
"$bin/perso" upload --url "$url" --batch "$out/clone/batch.ndjson" \
	--ca "$out/api/server.pem" --token-file "$out/api/perso.token" >"$out/api/import-clone.json" 2>>"$out/logs/upload.log" || true
imported_clone=$(json_field imported <"$out/api/import-clone.json")
replaced=$(grep -c 'the record was replaced' "$out/api/import-clone.json" || true)
injected=$(grep -c 'requires one' "$out/api/import-clone.json" || true)
grep '"reason"' "$out/api/import-clone.json" | sed -E 's/^ *"reason": "(.*)",?$/   refused: \1/'
echo "   the genuine card beside them imported: $imported_clone"
clone_auth=$("$bin/vcard" authenticate --issuer "$url" --ca "$out/api/server.pem" --token-file "$out/api/verifier.token" \
	"$out/cards/insider-clones/card-C100000000000001.json" 2>&1 || true)
case $clone_auth in
*"404 Not Found"*) clone_auth="no challenge: the issuer has no card c100000000000001 (404)" ;;
esac
echo "   the clone at the issuer: $clone_auth"

echo "== issuer API (admin): card states"
caught=0 active=0
for c in "${victims[@]}" "${honest[@]}"; do
	id=$(basename "$c" .json)
	id=${id#card-}
	id=$(printf %s "$id" | tr A-F a-f) # card Ids are printed in lower-case hex everywhere
	api GET "/v1/cards/$id" admin >"$out/api/card-$id.json" 2>/dev/null || true
	state=$(json_field state <"$out/api/card-$id.json")
	case $c in
	*/attacked/*)
		[ -z "$state" ] && caught=$((caught + 1))
		echo "   $id  ${state:-not imported (refused at import)}"
		;;
	*) [ "$state" = active ] && [ "$(json_field attested <"$out/api/card-$id.json")" = true ] && active=$((active + 1)) ;;
	esac
done
echo "   honest cards active and attested: $active of $cards"

t9=$(date +%s.%N)
result=PASS
[ "$personalized" = "$cards" ] && [ "$imported" = "$cards" ] && [ "$attested" = "$cards" ] && [ "$ok" = "$cards" ] &&
	[ "$active" = "$cards" ] && [ "$forged" = "$attacked" ] && [ "$substituted" = "$attacked" ] && [ "$caught" = "$attacked" ] &&
	[ "$replaced" = 1 ] && [ "$injected" = 1 ] && [ "$imported_clone" = 1 ] || result=FAIL
{
	echo "== summary: $token_kind token, profile $profile"
	printf '   %-48s %s\n' \
		"cards personalized (honest station)" "$personalized of $cards" \
		"imported by the issuer (K_I derived in-token)" "$imported" \
		"with a verified chip attestation" "$attested of $imported" \
		"authenticated in-token (honest)" "$ok of $cards" \
		"attacked (personalized under the insider's key)" "$forged of $attacked" \
		"Fig. 2: refused at import (PK substitution)" "$substituted of $attacked" \
		"record replaced (emulated clone), refused" "$replaced of 1" \
		"record injected (no genuine chip), refused" "$injected of 1" \
		"honest cards still active" "$active of $cards" \
		"PIN holder's ways out the token closed" "$pin_closed (issuer probe)" \
		"still open (the token cannot close them)" "${pin_open:-none}" \
		"time taken" "$(awk -v a="$t0" -v b="$t9" 'BEGIN { printf "%.1f s", b - a }')" \
		"result" "$result"
	echo "   artifacts: $out"
} | tee "$out/summary.txt"
[ "$result" = PASS ]
