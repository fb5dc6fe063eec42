#!/usr/bin/env bash
# make demo: the main job end to end on embedded defaults.
#
# 1. Issuer: a fresh SoftHSM2 token in demo-out/token; the issuer key and
#    the KEK are generated in it (the KEK marked trusted by the security
#    officer); the public key is exported with its fingerprint.
# 2. Card bureau: a private pcscd with vsmartcard's vpcd driver; blank
#    virtual cards fed one after another into its reader; the perso
#    station personalizes each under the issuer public key and writes the
#    batch (Id, c) before locking the card.
# 3. Issuer: the station uploads the batch to the issuer service (TLS,
#    bearer token); the token derives every card's K_I from its c and
#    wraps it under the KEK; each card then answers a fresh challenge and its MAC is
#    verified in the token.
# K_I exists only in the cards (their state files) and inside the token.
#
# Settings (environment): DEMO_CARDS (5), DEMO_PROFILE (rsa-oaep-aes),
# DEMO_OUT (demo-out). Everything the run makes is left in DEMO_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

cards=${DEMO_CARDS:-5}
profile=${DEMO_PROFILE:-rsa-oaep-aes}
out=${DEMO_OUT:-demo-out}
case $profile in
	ecdh-*) kind=p256 ;;
	*) kind=rsa2048 ;;
esac

rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
# pcscd's socket path must stay short (sun_path is 108 bytes).
pcdir=$(mktemp -d /tmp/bp-pcscd.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	cp "$pcdir"/*.log "$out"/ 2>/dev/null || true
	rm -rf "$pcdir"
}
trap cleanup EXIT

echo "== issuer: SoftHSM2 token, keys generated in it"
mkdir -p "$out/token/objects"
sed "s|@TOKENDIR@|$out/token/objects|" softhsm-config/softhsm2.conf.in >"$out/token/softhsm2.conf"
export SOFTHSM2_CONF="$out/token/softhsm2.conf"
# Demo PINs; a real ceremony reads them from the operators.
printf 'demo-user-pin' >"$out/token/user.pin"
printf 'demo-so-pin' >"$out/token/so.pin"
softhsm2-util --init-token --free --label blindperso-demo \
	--pin "$(cat "$out/token/user.pin")" --so-pin "$(cat "$out/token/so.pin")" >/dev/null
export BLINDPERSO_TOKEN="pkcs11:token=blindperso-demo?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:$out/token/user.pin"
bin/issuer probe >"$out/probe.txt"
if ! grep -q "^$profile.*runnable" "$out/probe.txt" || grep -q "^$profile.*not runnable" "$out/probe.txt"; then
	cat "$out/probe.txt"
	echo "profile $profile cannot run in-token on SoftHSM2" >&2
	exit 1
fi
echo "== key ceremony: examples/ceremony-softhsm2.yaml"
export BLINDPERSO_SO_PIN_FILE="$out/token/so.pin" CEREMONY_OUT="$out/ceremony"
bin/issuer ceremony run examples/ceremony-softhsm2.yaml >"$out/ceremony.log" 2>&1 ||
	{ cat "$out/ceremony.log"; exit 1; }
bin/issuer ceremony verify "$out/ceremony/transcript.json" | sed 's/^/   /'
case $kind in
	p256) key=issuer-2026-ec ;;
	*) key=issuer-2026-rsa ;;
esac
kek=kek-2026
cp "$out/ceremony/$key.pub.pem" "$out/issuer.pub.pem"
fp=$(bin/issuer fingerprint "$out/issuer.pub.pem")
echo "   issuer key $key ($kind) sha256 $fp; KEK $kek (trusted); transcript $out/ceremony/transcript.json"

echo "== private pcscd with a vpcd reader"
bin/vcard pcscd --dir "$pcdir" >"$out/pcscd.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^slot 1' "$out/pcscd.out" && break; sleep 0.1; done
grep -q '^slot 1' "$out/pcscd.out" || { cat "$out/pcscd.out"; exit 1; }
export "$(head -1 "$out/pcscd.out")"
addr=$(awk '/^slot 0/ {print $3}' "$out/pcscd.out")
reader=$(sed -n 's/^slot 0: [^ ]* "\(.*\)"$/\1/p' "$out/pcscd.out")
echo "   reader \"$reader\" (vpcd at $addr), $PCSCLITE_CSOCK_NAME"

echo "== manufacture $cards blank virtual cards"
bin/vcard manufacture --dir "$out/cards" --count "$cards" >/dev/null
bin/vcard feed --reader "$addr" "$out"/cards/*.json 2>"$out/vcard.log" &
pids+=($!)

echo "== perso station: profile $profile"
start=$(date +%s.%N)
bin/perso run --issuer-key "$out/issuer.pub.pem" --profile "$profile" \
	--expect-fingerprint "$fp" --reader "$reader" --count "$cards" \
	--batch "$out/batch.ndjson" --station demo --progress off 2>"$out/perso.log"

echo "== (Id, c) per card: $out/batch.ndjson, manifest $out/batch.ndjson.manifest.json"
sed -E 's/.*"id":"([^"]+)","c":"([^"]+)".*/\1  \2/' "$out/batch.ndjson" |
	awk '{ printf "   %s  %s…%s (%d bytes)\n", $1, substr($2, 1, 24), substr($2, length($2)-7), length($2)/2 }'

echo "== issuer: derive and wrap every K_I in the token"
# The issuer service: TLS with a throwaway certificate, a bearer token of
# the perso role (stored only hashed), the SQLite store under demo-out.
mkdir -p "$out/api"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
	-keyout "$out/api/server.key" -out "$out/api/server.pem" -subj /CN=localhost \
	-addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
head -c 32 /dev/urandom | base64 >"$out/api/perso.token"
echo "perso $(bin/issuer serve token-hash <"$out/api/perso.token")" >"$out/api/tokens"
port=$((20000 + RANDOM % 20000))
bin/issuer serve --addr "127.0.0.1:$port" --tls-cert "$out/api/server.pem" --tls-key "$out/api/server.key" \
	--tokens "$out/api/tokens" --key "$key" --kek "$kek" --db "$out/issuer-data" 2>"$out/issuer-serve.log" &
serve=$!
pids+=($serve)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
echo "   issuer service at https://127.0.0.1:$port; the station uploads its batch"
bin/perso upload --url "https://127.0.0.1:$port" --batch "$out/batch.ndjson" \
	--ca "$out/api/server.pem" --token-file "$out/api/perso.token" >"$out/import.json"
imported=$(grep -o '"imported": *[0-9]*' "$out/import.json" | head -1 | grep -o '[0-9]*$')
echo "   $imported cards imported into the store $out/issuer-data/issuer.db (report: $out/import.json)"
# One process per SoftHSM2 token: the service stops before the CLI below
# opens the token.
kill "$serve"
wait "$serve" 2>/dev/null || true

echo "== issuer: challenge every card, verify its MAC in the token"
ok=0
for c in "$out"/cards/*.json; do
	id=$(bin/vcard status "$c" | sed -E 's/.*"id":"([^"]+)".*/\1/')
	ch=$(bin/issuer cards challenge "$id" --db "$out/issuer-data")
	mac=$(bin/vcard authenticate --challenge "$ch" "$c")
	if res=$(bin/issuer cards verify "$id" --challenge "$ch" --mac "$mac" \
		--key "$key" --kek "$kek" --db "$out/issuer-data" 2>>"$out/verify.log"); then
		ok=$((ok + 1))
	fi
	echo "   $id  challenge $ch  MAC $mac  $res"
done
end=$(date +%s.%N)

printf '== %d cards personalized, %d K_I derived and wrapped in-token, %d of %d authenticated in-token, %.1f s; artifacts in %s\n' \
	"$(grep -c . "$out/batch.ndjson")" "$imported" "$ok" "$cards" \
	"$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "$out"
[ "$ok" = "$cards" ]
